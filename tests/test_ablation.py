"""The ablation command trains labelled CBD-ENS variants on a run's teachers, outside metrics.json."""
import json
import subprocess
import sys

import pytest
from shared_runs import copy_run


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
