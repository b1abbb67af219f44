"""Run folders (``cbdlib.runs``) across invocations: wall times summed over every start, a killed
one counted up to its last write; damaged ``params.yaml``, evaluations, ``metrics.json`` and
``history.jsonl`` lines named or recomputed."""
import json
import logging
import os
import re
import time

import pytest
import yaml
from reliability_helpers import (
    TINY,
    crash_after,
    error_line,
    private_folders,
    run_main,
    snapshot,
    tiny_settings,
    write_params,
)

from cbdlib import CBDError, runs, workbook
from cbdlib import train as train_cli
from cbdlib.config import make_params, resolve
from cbdlib.engine import Experiment, hooks
from cbdlib.metrics import validate_metrics
from cbdlib.runs import evaluation_path


@pytest.fixture(autouse=True)
def private(tmp_path, monkeypatch):
    private_folders(tmp_path, monkeypatch)


# --- wall times ------------------------------------------------------------------------------

def test_wall_times_are_summed_over_invocations_and_say_resumed(tmp_path, digits):
    settings = tiny_settings(methods=["ce"])
    with pytest.raises(KeyboardInterrupt), crash_after(len(digits.train_labels) // 32 + 1):  # killed in epoch 2
        Experiment(settings, tmp_path, data=digits, quiet=True).run("one_stage")
    first = runs.wall_times(tmp_path / runs.STAGE_TIMES)["one_stage"]
    assert first["invocations"] == 1 and first["resumed"] and first["s"] > 0
    metrics = Experiment(settings, tmp_path, data=digits, quiet=True).run("one_stage")
    both = runs.wall_times(tmp_path / runs.STAGE_TIMES)["one_stage"]
    assert both["invocations"] == 2 and both["s"] > first["s"]
    assert metrics["stage_times_s"]["one_stage"] == round(both["s"], 2)
    assert metrics["resumed_stages"] == ["one_stage"]


def test_a_killed_invocation_counts_up_to_its_last_write(tmp_path):
    """SIGKILL leaves the ledger entry open: the next start closes it at the newest file of the run."""
    ledger = tmp_path / runs.NOTEBOOK_TIMES
    started = time.time() - 100
    ledger.write_text(json.dumps({"02_x.ipynb": {"s": 1.0, "invocations": 1, "resumed": False, "open": started}}))
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    os.utime(tmp_path / "checkpoint.pt", (started + 30, started + 30))  # its last write: 30 s in
    os.utime(ledger, (started + 90, started + 90))  # the ledger itself does not count
    with runs.run_lock(tmp_path), runs.timed(ledger, "02_x.ipynb"):  # the next start, as cbdlib run does it
        pass
    entry = runs.wall_times(ledger)["02_x.ipynb"]
    assert entry["invocations"] == 3 and entry["resumed"]
    assert 31.0 <= entry["s"] < 90  # 1 s + the 30 s of the killed invocation + this one


# --- damaged run folders ---------------------------------------------------------------------

@pytest.fixture
def finished(tmp_path, digits):
    """A tiny run with a teacher and ce, both evaluated."""
    settings = tiny_settings(methods=["teacher_vanilla_1", "ce"], epochs=1)
    out = tmp_path / "run"
    exp = Experiment(settings, out, data=digits, quiet=True)
    exp.run("teachers")
    exp.run("one_stage")
    return settings, out


@pytest.mark.parametrize("garbage, problem", [("epochs: [1\n", "not valid YAML"), ("just text\n", "not a mapping")])
def test_a_damaged_params_yaml_is_named(finished, digits, capsys, garbage, problem):
    settings, out = finished
    (out / "params.yaml").write_text(garbage)
    before = snapshot(out)
    with pytest.raises(CBDError, match=rf"^{re.escape(str(out))}/params.yaml is damaged \({problem}.*\); restore it, "
                                       rf"or set overwrite: true to start this run again$"):
        Experiment(settings, out, data=digits, quiet=True)
    params = write_params(out.parent / "p.yaml", {**TINY, "methods": ["teacher_vanilla_1", "ce"], "epochs": 1})
    status, err = run_main(train_cli.main, ["--params", str(params), "--out", str(out)], capsys)
    assert status == 2 and "params.yaml is damaged" in error_line(err)
    assert snapshot(out) == before
    overwrite = resolve(make_params({**TINY, "methods": ["ce"], "epochs": 1, "overwrite": True}))
    Experiment(overwrite, out, data=digits, quiet=True).run("one_stage")  # starts the run again
    assert yaml.safe_load((out / "params.yaml").read_text())["methods"] == ["ce"]


def test_a_damaged_evaluation_is_recomputed_from_its_checkpoint(finished, digits, caplog):
    settings, out = finished
    path = evaluation_path(out, 1, "ce")
    good = json.loads(path.read_text())
    path.write_text(path.read_text()[:40])  # truncated
    started = []
    with caplog.at_level(logging.WARNING), hooks.on_start(lambda job, model: started.append(job.name)):
        metrics = Experiment(settings, out, data=digits, quiet=True).run("teachers")  # ce is not in this stage
    assert started == []  # ce's finished checkpoint is evaluated again; nothing trains
    assert f"warning: {path} was damaged (not valid JSON: " in caplog.text
    assert "recomputed it from the run's checkpoints" in caplog.text
    assert json.loads(path.read_text()) == good
    assert metrics["methods"]["ce"]["all"] == good["all"]


def test_a_damaged_evaluation_without_its_checkpoint_is_named(finished, digits):
    settings, out = finished
    path = evaluation_path(out, 1, "ce")
    path.write_text("{")
    for name in ("ce.pt", "ce.prev.pt"):
        (out / "checkpoints" / "seed_1" / name).unlink(missing_ok=True)
    with pytest.raises(CBDError, match=rf"^{re.escape(str(path))} is damaged \(not valid JSON: .*\) and cannot "
                                       rf"be recomputed: ce "
                                       rf"\(seed 1\) has no finished checkpoint; delete it and rerun its stage, or "
                                       rf"set overwrite: true$"):
        Experiment(settings, out, data=digits, quiet=True).run("teachers")


def test_a_damaged_metrics_json_is_rewritten(finished, digits):
    settings, out = finished
    (out / "metrics.json").write_text('{"methods": ')
    metrics = Experiment(settings, out, data=digits, quiet=True).run("one_stage")
    assert json.loads((out / "metrics.json").read_text()) == metrics
    validate_metrics(metrics)


def test_damaged_history_lines_are_skipped_and_named(tmp_path, caplog):
    lines = [b'{"model": "ce", "seed": 1, "stage": "one_stage", "epoch": 1, "loss": 2.0}', b"\xff\xfe\x00garbage",
             b"[1, 2]", b'{"model": "ce", "seed": 1, "stage": "one_stage", "epoch": 2, "loss": 1.0}',
             b'{"model": "ce", "seed": 1, "stage": "one_st']  # the last one torn by a kill: no warning for it
    (tmp_path / "history.jsonl").write_bytes(b"\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="cbdlib.runs"):
        records = runs.read_history(tmp_path)
        shown = workbook.history(tmp_path, stages=["one_stage"])
    assert [r["epoch"] for r in records] == [1, 2] and len(shown) == 2
    assert f"warning: {tmp_path / 'history.jsonl'}: skipped 2 unreadable lines (2, 3)" in caplog.text



def test_overwrite_clears_every_output_of_the_previous_run(tmp_path):
    out = tmp_path / "run"
    first = resolve(make_params({"run_name": "run", "epochs": 1}))
    runs.prepare_run_dir(out, first)
    outputs = [out / "checkpoints" / "seed_1" / "ce.pt", out / "evaluations" / "seed_1" / "ce.json",
               out / "analyses" / "seed_1" / "ce.json", out / "features" / "seed_1" / "ce.npz", out / "metrics.json",
               out / "plan.json"]
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    with pytest.raises(CBDError, match="different parameters"):
        runs.prepare_run_dir(out, resolve(make_params({"run_name": "run", "epochs": 2})))
    runs.prepare_run_dir(out, resolve(make_params({"run_name": "run", "epochs": 2, "overwrite": True})))
    assert [p for p in outputs if p.exists()] == []
    assert yaml.safe_load((out / "params.yaml").read_text())["epochs"] == 2
