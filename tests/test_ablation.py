"""The ablation command trains labelled CBD-ENS variants on a run's teachers, outside metrics.json."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import yaml
from reliability_helpers import TINY, error_line, run_main, snapshot, tiny_settings
from shared_runs import copy_run

from cbdlib import __main__ as cli
from cbdlib.config import make_params
from cbdlib.engine import Experiment


@pytest.mark.slow
def test_ablation_rows_are_labelled_and_kept_out_of_metrics(teacher_run, tmp_path):
    run = copy_run(teacher_run, tmp_path)  # four trained teachers: vanilla 1 and 2, aug 1 and 2
    before = json.loads((run / "metrics.json").read_text())["methods"].keys()
    done = subprocess.run([sys.executable, "-m", "cbdlib", "ablate", str(run), "--epochs", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads((run / "ablation" / "ablation.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert len(rows) == 7
    assert rows["paper (alpha 0.4, beta 100, all teachers, projection)"]["teachers"] == [
        "teacher_vanilla_1", "teacher_vanilla_2", "teacher_aug_1", "teacher_aug_2"]
    assert rows["alpha 0 (no distillation)"]["alpha"] == 0.0
    assert rows["beta 10"]["beta"] == 10.0
    assert rows["1 vanilla teacher (CBD)"]["teachers"] == ["teacher_vanilla_1"]
    assert rows["2 vanilla teachers"]["teachers"] == ["teacher_vanilla_1", "teacher_vanilla_2"]
    assert rows["no projection"]["projection"] is False
    assert all(r["epochs"] == 1 and 0 <= r["all"] <= 1 for r in rows.values())
    assert "1 epochs per student" in (run / "ablation" / "ablation.md").read_text()
    assert json.loads((run / "metrics.json").read_text())["methods"].keys() == before


@pytest.mark.slow
def test_ablate_checks_epochs_and_can_replace_its_students(tmp_path, digits, capsys):
    out = tmp_path / "run"
    Experiment(tiny_settings(methods=["teacher_vanilla_1"], epochs=2), out, data=digits, quiet=True).run("teachers")
    before = snapshot(out)
    status, err = run_main(cli.main, ["ablate", str(out), "--epochs", "0"], capsys)
    assert status == 2 and error_line(err) == "error: --epochs must be >= 1 (epochs per ablation student), got 0"
    status, err = run_main(cli.main, ["ablate", str(out), "--seed", "7"], capsys)
    assert status == 2 and error_line(err) == f"error: --seed 7: {out} has training seeds [1]"
    assert snapshot(out) == before
    assert run_main(cli.main, ["ablate", str(out), "--epochs", "1"], capsys)[0] == 0
    ablation = snapshot(out / "ablation")
    status, err = run_main(cli.main, ["ablate", str(out), "--epochs", "2"], capsys)
    assert status == 2 and error_line(err) == (f"error: {out / 'ablation'} holds students of 1 epoch, not 2; rerun "
                                               f"with --epochs 1 to finish them, or with --overwrite to replace "
                                               f"them (the run itself is kept)")
    assert snapshot(out / "ablation") == ablation
    assert run_main(cli.main, ["ablate", str(out), "--epochs", "2", "--overwrite"], capsys)[0] == 0
    rows = json.loads((out / "ablation" / "ablation.json").read_text())["rows"]
    assert rows and all(r["epochs"] == 2 for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_ablate_on_a_cpu_names_the_gpu_run_and_its_option(tmp_path, capsys):
    run = tmp_path / "gpu_run"
    run.mkdir()
    (run / "params.yaml").write_text(yaml.safe_dump(dataclasses.asdict(make_params({**TINY, "device": "auto"}))
                                                    | {"device": "cuda"}))
    status, err = run_main(cli.main, ["ablate", str(run)], capsys)
    assert status == 2 and error_line(err) == (f"error: {run}/params.yaml: device 'cuda' asked for, but CUDA is not "
                                               f"available here; use device: auto or cpu (pass --device to choose "
                                               f"another)")
