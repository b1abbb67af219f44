"""The prepared GPU commands of tools/gpu/, run as their CPU dry runs (``DRY_RUN=1``), and the
sync check's bookkeeping (which step a synchronisation came from) on the CPU."""
import importlib.util
import json
import os
import subprocess
import tarfile
import warnings

import pytest

from cbdlib.config import project_root
from cbdlib.engine import hooks

ROOT = project_root()
TOOLS = ROOT / "tools" / "gpu"


def dry_run(script, out, timeout=900, **env):  # the timeout is a hang guard, not a speed requirement
    environment = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(TOOLS / script)], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def load_sync_check():
    spec = importlib.util.spec_from_file_location("sync_check", TOOLS / "sync_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sync_check_counts_what_happens_inside_the_counted_steps(tmp_path):
    """A stand-in for a CUDA sync warning, raised from inside every grouped step: the record counts
    the second epoch's 3 steps as in-step syncs and the first epoch's as warm-up."""
    sync_check = load_sync_check()

    def fake_sync(step, loss):
        if step.job.name == "teacher_aug_1":  # once per grouped step
            warnings.warn("called a synchronizing CUDA operation", UserWarning)

    with hooks.on_step(fake_sync):
        assert sync_check.main(["--device", "cpu", "--batch-size", "8", "--json", str(tmp_path / "s.json")]) == 0
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["checked"] is False and record["steps_counted"] == 3
    assert record["syncs_in_step"] == 3 and record["syncs_in_warmup_steps"] == 3
    assert record["syncs_outside_the_loop"] == 0


@pytest.mark.slow
def test_the_validation_command_dry_run_runs_every_step_and_writes_its_records(tmp_path):
    done = dry_run("validate.sh", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()[1:]]
    assert [(name, status) for name, status, _ in steps] == [
        ("versions", "0"), ("sync_check", "0"), ("cuda_tests", "0"), ("smoke", "0"), ("bench", "0")]
    assert json.loads((tmp_path / "sync_check.json").read_text())["syncs_in_step"] == 0
    bench = json.loads((tmp_path / "cpu-dry-run.json").read_text())
    assert bench["device"].startswith("cpu") and bench["engine_img_per_s"] > 0
    metrics = json.loads((tmp_path / "smoke" / "metrics.json").read_text())
    assert {"cbd_ens", "crt", "teacher_ensemble"} <= set(metrics["methods"])


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not os.environ.get("CBD_CIFAR10"), reason="set CBD_CIFAR10 to run the CIFAR-10 command's dry run")
def test_the_cifar10_command_stops_at_its_budget_resumes_and_archives_the_cbd_ens_model(tmp_path):
    stopped = dry_run("cifar10_lt_ir100.sh", tmp_path, BUDGET_S="25")
    assert stopped.returncode == 75, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "rerun" in (tmp_path / "progress.log").read_text()
    done = dry_run("cifar10_lt_ir100.sh", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with tarfile.open(tmp_path / "cifar10_lt_ir100.tar.gz") as archive:
        names = archive.getnames()
    assert "cifar10_lt_ir100/checkpoints/seed_1/cbd_ens.pt" in names
    assert [n for n in names if n.endswith(".pt")] == ["cifar10_lt_ir100/checkpoints/seed_1/cbd_ens.pt"]
    assert "cifar10_lt_ir100/metrics.json" in names and "cifar10_lt_ir100/summary.md" in names
