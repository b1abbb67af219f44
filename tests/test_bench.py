"""The benchmark's CPU smoke form: it runs and reports every key of the contract."""
import json
import subprocess
import sys

import pytest

CONTRACT_KEYS = {"device", "torch", "git_commit", "precision", "naive_img_per_s", "engine_img_per_s", "speedup",
                 "one_model_s", "four_together_s", "together_ratio", "full_cbd_ens_s", "full_cbd_ens_extrapolated"}


@pytest.mark.slow
def test_cpu_benchmark_reports_the_contract_keys(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "cbdlib.bench", "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert CONTRACT_KEYS <= set(result)
    assert json.loads(done.stdout) == result
    assert result["device"].startswith("cpu")
    assert result["size"] == "tiny" and result["precision"] in ("bf16", "fp32") and result["naive_workers"] == 0
    for key in ("naive_img_per_s", "engine_img_per_s", "one_model_s", "four_together_s", "full_cbd_ens_s"):
        assert result[key] > 0
    assert result["speedup"] == result["engine_img_per_s"] / result["naive_img_per_s"]
    assert result["together_ratio"] == result["four_together_s"] / result["one_model_s"]
    assert result["full_cbd_ens_extrapolated"] is True
