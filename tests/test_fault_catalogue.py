"""Reliability, round two: the cases of docs/reliability.md ("Round two") that the first pass missed.

No silent wrong numbers (evaluate on other classes, aggregate of an unfinished run, smoke
replacing given values, ``methods: []``, wall times of resumed runs); every bad value refused
before any work; damaged run folders named or recomputed; a full disk and a second writer
during ``cbdlib run``; split-file labels; ``ablate``'s options; kernels that import the
command's own ``cbdlib``. Each test fails on the code before its fix.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from reliability_helpers import ROOT, TINY, cli_env, error_line, image_tree, tiny_settings, write_params
from test_pipeline import write_notebook

from cbdlib import CBDError, pipeline, runs, workbook
from cbdlib import __main__ as cli
from cbdlib import train as train_cli
from cbdlib.config import make_params, resolve
from cbdlib.data import load_long_tail
from cbdlib.data.stats import class_splits
from cbdlib.engine import Experiment, hooks
from cbdlib.metrics import split_accuracy, validate_metrics
from cbdlib.param_rules import ParameterError
from cbdlib.runs import checkpoint_path, evaluation_path
from cbdlib.text import format_seconds


@pytest.fixture(autouse=True)
def private_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CBD_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.delenv("CBD_SMOKE", raising=False)
    # workbook.configure_logging (a notebook's setup run in process) stops propagation; caplog needs it.
    monkeypatch.setattr(logging.getLogger("cbdlib"), "propagate", True)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes: "nothing changed" is ``snapshot(f) == before``.

    The lock file is left out: taking the lock writes the taker's pid into it.
    """
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def run_main(main, argv, capsys) -> tuple[int, str]:
    """An entry point in process: (exit status, stderr)."""
    capsys.readouterr()
    status = main(argv)
    return status, capsys.readouterr().err


# =========================================================================== 1. no silent wrong numbers


FOLDER_RUN = dict(TINY, dataset="folder", imbalance_ratio=2, val_per_class=1, image_size=8, methods=["ce"], epochs=1,
                  batch_size=8)  # the tree trains on about 24 images


def test_evaluate_refuses_data_whose_classes_differ(tmp_path, capsys):
    trained_on = image_tree(tmp_path / "abc")                       # ant, bee, cat
    other = image_tree(tmp_path / "abd")
    shutil.move(other / "train" / "cat", other / "train" / "dog")    # same counts, another class name
    shutil.move(other / "test" / "cat", other / "test" / "dog")
    out = tmp_path / "run"
    Experiment(resolve(make_params({**FOLDER_RUN, "data": str(trained_on)})), out, quiet=True).run("one_stage")
    model = checkpoint_path(out, 1, "ce")
    status, err = run_main(cli.main, ["evaluate", "--checkpoint", str(model), "--data", str(other)], capsys)
    assert status == 2
    assert error_line(err) == (f"error: checkpoint {model} was trained on other classes than the data at {other} has "
                               f"(1 of 3 differ; label 2: 'cat' vs 'dog'); evaluate it on the data it was trained on")
    assert run_main(cli.main, ["evaluate", "--checkpoint", str(model), "--data", str(trained_on)], capsys)[0] == 0


def test_evaluate_refuses_a_data_path_for_digits(tmp_path, digits, capsys):
    Experiment(tiny_settings(methods=["ce"], epochs=1), tmp_path / "run", data=digits, quiet=True).run("one_stage")
    model = checkpoint_path(tmp_path / "run", 1, "ce")
    status, err = run_main(cli.main, ["evaluate", "--checkpoint", str(model), "--data", str(tmp_path)], capsys)
    assert status == 2
    assert "dataset digits is built in and takes no data path" in error_line(err)


COUNTS = [40, 20, 10]


def fake_run(root: Path, name: str, seeds: list, evaluated: list, methods: list) -> Path:
    """A run folder whose params ask for ``methods`` and whose evaluations hold only ``evaluated``."""
    run = root / name
    splits = class_splits(COUNTS)
    evaluations = {}
    for method in evaluated:
        for seed in seeds:
            per_class = [0.9 - 0.2 * i + 0.01 * seed for i in range(3)]
            record = {"all": float(np.mean(per_class)), "per_class": per_class, "method": method, "seed": seed}
            record.update({k: split_accuracy(per_class, c) for k, c in splits.items()})
            runs.save_evaluation(run, seed, method, record)
            evaluations.setdefault(method, {})[seed] = record
    params = dataclasses.asdict(make_params({"run_name": name, "seeds": seeds, "methods": methods}))
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = runs.build_metrics(evaluations, dataset="digits", imbalance_ratio=10.0, class_counts=COUNTS,
                                 splits=splits, seeds=seeds, prov={"device": "cpu", "torch": "2", "git_commit": "x"})
    runs.write_metrics(run, metrics, ["a", "b", "c"])
    return run


def test_aggregate_refuses_an_unfinished_run_or_says_what_each_mean_covers(tmp_path, capsys, caplog):
    done = fake_run(tmp_path, "seed1", [1], ["ce", "cbd"], ["ce", "cbd"])
    killed = fake_run(tmp_path, "seed2", [2], ["ce"], ["ce", "cbd"])  # killed before cbd finished
    out = tmp_path / "merged"
    status, err = run_main(cli.main, ["aggregate", str(done), str(killed), "--out", str(out)], capsys)
    assert status == 2
    assert error_line(err) == (f"error: cannot merge {killed}: the run is unfinished (no evaluation of cbd (seed 2)); "
                               f"finish it with the command that made it, or pass --partial to merge what there is "
                               f"(each mean then says how many seeds it covers)")
    assert not out.exists()

    with caplog.at_level(logging.INFO, logger="cbdlib.pipeline"):
        pipeline.aggregate_runs([done, killed], out, partial=True, notebook=False)  # fake records: no figures
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["methods"]["ce"]["seeds"] == [1, 2] and metrics["methods"]["cbd"]["seeds"] == [1]
    assert metrics["partial"] == {"cbd": [1]}
    assert "warning: partial merge: cbd is the mean of 1 of 2 seeds (1)" in caplog.text
    assert "**partial merge** (`--partial`): `cbd` is the mean of 1 of 2 seeds (1)" in (out / "summary.md").read_text()


def test_smoke_names_the_given_values_it_replaces(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CBD_SMOKE", "1")
    params = write_params(tmp_path / "p.yaml", {**TINY, "smoke": None, "methods": ["teacher_vanilla_1"]})
    status, err = run_main(train_cli.main, ["--params", str(params), "--out", str(tmp_path / "run"), "--stage",
                                            "teachers", "-p", "epochs=5", "-p", "arch=resnet32"], capsys)
    assert status == 0, err
    # decoupled_epochs: 1 is the smoke value already, so it is not listed.
    assert (f"warning: the smoke profile (CBD_SMOKE or smoke: true) replaced given values: arch='resnet32' -> "
            f"'resnet_tiny' (-p), epochs=5 -> 2 (-p), batch_size=32 -> 64 ({params}), tsne_samples=50 -> 200 "
            f"({params})") in err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["seeds"] == [1]


def test_wall_times_are_summed_over_invocations_and_say_resumed(tmp_path, digits):
    from reliability_helpers import crash_after

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
    with runs.timed(ledger, "02_x.ipynb"):
        pass
    entry = runs.wall_times(ledger)["02_x.ipynb"]
    assert entry["invocations"] == 3 and entry["resumed"]
    assert 31.0 <= entry["s"] < 90  # 1 s + the 30 s of the killed invocation + this one


def test_summary_marks_resumed_notebooks_and_stages(tmp_path):
    metrics = json.loads((fake_run(tmp_path, "r", [1], ["ce"], ["ce"]) / "metrics.json").read_text())
    metrics.update(stage_times_s={"one_stage": 2.0, "decoupled": 3.0}, resumed_stages=["one_stage"])
    text = pipeline.summary_markdown(tmp_path, metrics, timings={"01_a.ipynb": 5.0, "02_b.ipynb": 75.0},
                                     wall_s=80.0, resumed={"02_b.ipynb", "total"})
    assert "| 01_a.ipynb | 5.0 s |" in text and "| 02_b.ipynb | 1 min 15 s (resumed) |" in text
    assert "| **total** | 1 min 20 s (resumed) |" in text
    assert ("Training stages (summed over every invocation of the engine): one_stage 2.0 s (resumed), "
            "decoupled 3.0 s") in text


FLAKY = ("import logging\nfrom cbdlib import runs, workbook\nworkbook.configure_logging()\n"
         "out = runs.run_dir_for(run_name)\n"
         "logging.getLogger('cbdlib.checkpoint')"
         ".warning('checkpoint x.pt fails its checksum; falling back to x.prev.pt')\n"
         "if not (out / 'failed_once').exists():\n"
         "    (out / 'failed_once').write_text('')\n"
         "    raise RuntimeError('interrupted')\n")


def test_cbdlib_run_sums_wall_times_and_relays_warnings(tmp_path, monkeypatch, caplog):
    """A notebook stopped once and rerun: the summary sums both invocations and says resumed; the
    recovery warning it printed reaches the command's console; smoke says what it replaced."""
    monkeypatch.setenv("CBD_SMOKE", "1")
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "01_flaky.ipynb", "run_name = 'default'\nsmoke = None\n", FLAKY)
    params = write_params(tmp_path / "p.yaml", {"run_name": "flaky", "dataset": "digits"})
    with pytest.raises(CBDError, match=r"01_flaky.ipynb failed in cell \d+: RuntimeError: interrupted"):
        pipeline.run_pipeline(params, {"epochs": 5}, progress=False, notebooks_dir=notebooks)
    with caplog.at_level(logging.INFO, logger="cbdlib.pipeline"):
        run = pipeline.run_pipeline(params, {"epochs": 5}, progress=False, notebooks_dir=notebooks)
    assert "replaced given values: epochs=5 -> 2 (-p)" in caplog.text
    assert "warning: checkpoint x.pt fails its checksum; falling back to x.prev.pt (01_flaky.ipynb)" in caplog.text
    times = runs.wall_times(run / runs.NOTEBOOK_TIMES)
    assert times["01_flaky.ipynb"]["invocations"] == 2 and times["01_flaky.ipynb"]["resumed"]
    summary = (run / "summary.md").read_text()
    shown = format_seconds(times["01_flaky.ipynb"]["s"])
    assert f"| 01_flaky.ipynb | {shown} (resumed) |" in summary


# =========================================================================== 2. every value checked up front


BAD_VALUES = [
    ("lr", -0.1, "lr must be > 0, got -0.1"),
    ("lr", 0, "lr must be > 0, got 0.0"),
    ("lr", float("nan"), "lr must be a finite number, got nan"),
    ("alpha", float("inf"), "alpha must be a finite number, got inf"),
    ("weight_decay", -1e-4, "weight_decay must be >= 0, got -0.0001"),
    ("momentum", 1.5, "momentum must be in [0, 1), got 1.5"),
    ("epochs", 0, "epochs must be >= 1, got 0"),
    ("decoupled_epochs", 0, "decoupled_epochs must be >= 1, got 0"),
    ("warmup_epochs", -1, "warmup_epochs must be >= 0, got -1"),
    ("val_per_class", 0, "val_per_class must be >= 1, got 0"),
    ("batch_size", 0, "batch_size must be >= 1, got 0"),
    ("cosine_scale", 0, "cosine_scale must be > 0, got 0.0"),
    ("beta", -1, "beta must be > 0, got -1.0"),
    ("logit_distill_temperature", 0, "logit_distill_temperature must be > 0, got 0.0"),
    ("projection_dim", 0, "projection_dim must be >= 1, got 0"),
    ("imbalance_ratio", 0.5, "imbalance_ratio must be >= 1, got 0.5"),
    ("lt_seed", -1, "lt_seed must be >= 0, got -1"),
    ("tsne_samples", 0, "tsne_samples must be >= 1, got 0"),
    ("methods", [], "methods must be null (every method) or a non-empty list of method names, got []"),
    ("arch", "resnet33", "unknown arch 'resnet33': arch must be one of resnet32, resnet20, resnet8, resnet_tiny"),
    ("device", "gpu", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("data", "some/folder", "data must be null for dataset digits (it is built in), got 'some/folder'"),
]
if not torch.cuda.is_available():
    BAD_VALUES.append(("device", "cuda", "device 'cuda' asked for, but CUDA is not available here; "
                                         "use device: auto or cpu"))


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_every_bad_value_is_refused_before_any_work(tmp_path, capsys, key, value, message):
    with pytest.raises(ParameterError, match="^" + re.escape(message)) as err:
        make_params({**TINY, key: value})
    assert err.value.key == key
    # cbdlib.train: one line, exit 2, no run folder.
    params = write_params(tmp_path / "p.yaml", {**TINY, key: value})
    out = tmp_path / "run"
    status, stderr = run_main(train_cli.main, ["--params", str(params), "--out", str(out)], capsys)
    assert status == 2 and message in error_line(stderr) and not out.exists()
    # A notebook's setup cell (notebook 02 declares every key).
    with pytest.raises(CBDError, match="^" + re.escape(message)):
        workbook.setup({**TINY, key: value}, notebook="02")


def test_a_gpu_the_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert make_params({"device": "cuda:0"}).device == "cuda:0"
    with pytest.raises(CBDError, match=r"^device 'cuda:3' asked for, but this machine has 1 GPU\(s\) \(cuda:0..\)$"):
        make_params({"device": "cuda:3"})


@pytest.mark.parametrize("override, message", [
    ("lr=-0.1", "error: -p lr=-0.1: lr must be > 0, got -0.1"),
    ("arch=resnet33", "error: -p arch=resnet33: unknown arch 'resnet33': arch must be one of resnet32"),
    ("val_per_class=0", "error: -p val_per_class=0: val_per_class must be >= 1, got 0"),
    ("methods=[]", "error: -p methods=[]: methods must be null (every method) or a non-empty list"),
])
def test_cbdlib_run_refuses_a_bad_value_before_notebook_01(tmp_path, capsys, override, message):
    status, err = run_main(cli.main, ["run", "--params", str(ROOT / "notebooks" / "params" / "smoke.yaml"),
                                      "-p", override], capsys)
    assert status == 2 and error_line(err).startswith(message), err
    assert not (tmp_path / "results").exists()  # no run folder, no index.csv


def test_a_refused_value_changes_nothing_in_an_existing_run(tmp_path, digits, capsys):
    out = tmp_path / "run"
    Experiment(tiny_settings(methods=["ce"], epochs=1), out, data=digits, quiet=True).run("one_stage")
    before = snapshot(out)
    params = write_params(tmp_path / "p.yaml", {**TINY, "methods": ["ce"], "epochs": 1})
    status, err = run_main(train_cli.main, ["--params", str(params), "--out", str(out), "-p", "lr=-1"], capsys)
    assert status == 2 and "lr must be > 0" in error_line(err)
    assert snapshot(out) == before


# =========================================================================== 3. damaged run folders


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


def test_aggregate_names_a_damaged_evaluation(tmp_path):
    run = fake_run(tmp_path, "r", [1], ["ce"], ["ce"])
    evaluation_path(run, 1, "ce").write_bytes(b"\x00\xff garbage")
    with pytest.raises(CBDError, match=r"^.*/evaluations/seed_1/ce.json is damaged \(not valid JSON: .*\); delete it "
                                       r"and rerun the stage that wrote it"):
        pipeline.aggregate_runs([run], tmp_path / "out")


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


# =========================================================================== 4. disk full during cbdlib run


def _one_notebook(tmp_path: Path, body: str = "x = 1\n", parameters: str = "run_name = 'default'\n") -> Path:
    folder = tmp_path / "notebooks"
    folder.mkdir(exist_ok=True)
    write_notebook(folder / "01_only.ipynb", parameters, body)
    return folder


def test_a_full_disk_while_the_executed_notebook_is_written_keeps_the_previous_copy(tmp_path, monkeypatch):
    from papermill.iorw import LocalHandler

    notebooks = _one_notebook(tmp_path)
    params = write_params(tmp_path / "p.yaml", {"run_name": "full"})
    run = pipeline.run_pipeline(params, {}, progress=False, notebooks_dir=notebooks)
    before = (run / "01_only.ipynb").read_bytes()
    real_write = LocalHandler.write

    def full_disk(self, buf, path):
        real_write(self, buf[: len(buf) // 2], path)  # half of it reaches the disk, then it is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(LocalHandler, "write", full_disk)
    with pytest.raises(CBDError, match="could not write the executed notebook") as err:
        pipeline.run_pipeline(params, {}, progress=False, notebooks_dir=notebooks)
    assert str(err.value) == (f"could not write the executed notebook {run / '01_only.ipynb'}: No space left on "
                              f"device (the previous copy is kept); free some space and rerun the same command "
                              f"to resume")
    assert (run / "01_only.ipynb").read_bytes() == before
    assert not list(run.glob(".partial_*"))
    monkeypatch.undo()
    pipeline.run_pipeline(params, {}, progress=False, notebooks_dir=notebooks)  # with space again
    json.loads((run / "01_only.ipynb").read_text())


@contextlib.contextmanager
def small_disk(path: Path, size: str = "3m"):
    """A real file system of ``size`` at ``path`` (tmpfs; needs root, else the test is skipped)."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


FILL = ("from cbdlib import runs\nout = runs.run_dir_for(run_name)\nif fill:\n"
        "    try:\n        with open(out / 'filler', 'wb') as handle:\n            while True:\n"
        "                handle.write(b'0' * 65536)\n                handle.flush()\n"
        "    except OSError as exc:\n        print('the disk is full:', exc.strerror)\n"
        "    print('one more epoch line\\n' * 1000)  # the executed notebook grows: its next write fails\n")


def test_a_really_full_disk_during_cbdlib_run(tmp_path, monkeypatch):
    """The notebook fills a small disk; papermill's write of the executed notebook then fails."""
    with small_disk(tmp_path / "disk") as disk:
        monkeypatch.setenv("CBD_RESULTS_DIR", str(disk))
        notebooks = _one_notebook(tmp_path, FILL, "run_name = 'default'\nfill = False\n")
        params = write_params(tmp_path / "p.yaml", {"run_name": "full"})
        run = pipeline.run_pipeline(params, {}, progress=False, notebooks_dir=notebooks)
        before = (run / "01_only.ipynb").read_bytes()
        with pytest.raises(CBDError, match=r"^could not write the executed notebook .*01_only.ipynb: No space left "
                                           r"on device \(the previous copy is kept\)"):
            pipeline.run_pipeline(params, {"fill": True}, progress=False, notebooks_dir=notebooks)
        assert (run / "01_only.ipynb").read_bytes() == before and not list(run.glob(".partial_*"))
        (run / "filler").unlink()
        pipeline.run_pipeline(params, {}, progress=False, notebooks_dir=notebooks)
        assert (run / "summary.md").exists()


# =========================================================================== 5. one writer for the whole pipeline


WAIT = ("import time\nfrom cbdlib import runs, workbook\nsettings, run_dir = workbook.setup(globals(), notebook='01')\n"
        "with runs.run_lock(run_dir):  # as Experiment does: the kernel works under the command's lock\n"
        "    (run_dir / 'started').write_text('')\n"
        "    deadline = time.monotonic() + 900\n"
        "    while not (run_dir / 'go').exists() and time.monotonic() < deadline:\n"
        "        time.sleep(0.05)\n")


@pytest.mark.slow
def test_one_writer_for_the_whole_pipeline(tmp_path):
    notebooks = _one_notebook(tmp_path, WAIT, "run_name = 'default'\nsmoke = None\n")
    params = write_params(tmp_path / "p.yaml", {"run_name": "busy", "dataset": "digits"})
    run = tmp_path / "results" / "busy"
    code = ("import sys; from cbdlib import pipeline; "
            f"pipeline.run_pipeline({str(params)!r}, {{}}, progress=False, notebooks_dir={str(notebooks)!r})")
    env = {**cli_env(tmp_path), "CBD_RESULTS_DIR": str(tmp_path / "results")}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 900  # a hang guard, not a speed requirement
        while not (run / "started").exists():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.05)
        busy = (rf"^{re.escape(str(run))} is in use by another process \(pid {first.pid}\); "
                r"wait for it to finish or stop it$")
        with pytest.raises(CBDError, match=busy):  # a second identical cbdlib run
            pipeline.run_pipeline(params, {}, progress=False, notebooks_dir=notebooks)
        with pytest.raises(CBDError, match=busy):  # the notebook opened by hand
            workbook.setup({"run_name": "busy"}, notebook="02")
        with pytest.raises(CBDError, match=busy):
            workbook.analysis_setup({"run_name": "busy"})
        (run / "go").write_text("")
        assert first.wait(timeout=900) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert len((tmp_path / "results" / "index.csv").read_text().splitlines()) == 2  # header + one run


# =========================================================================== 6. split files


def test_a_label_one_past_the_last_class_is_named(tmp_path):
    root = tmp_path / "lt"
    (root / "img").mkdir(parents=True)
    lines = []
    for label in range(10):
        for i in range(3):
            rel = f"img/{label}_{i}.png"
            Image.new("RGB", (8, 8), (label * 20, i * 40, 0)).save(root / rel)
            lines.append(f"{rel} {label}")
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    lines[5] = lines[5].rsplit(" ", 1)[0] + " 10"  # one past the last of 10 classes
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(CBDError, match="line 6: label 10 has no image in the test split") as err:
        load_long_tail("splitfile", str(root), imbalance_ratio=1, val_per_class=1, image_size=8)
    assert str(err.value) == (f"{root / 'train.txt'}, line 6: label 10 has no image in the test split test.txt, "
                              f"whose labels run 0..9; labels must run 0..C-1: is that line mistyped?")


def test_a_label_one_past_the_last_class_in_a_large_benchmark_is_named(tmp_path):
    from test_large_datasets import write_split_benchmark

    root = write_split_benchmark(tmp_path / "imagenet")  # three classes, 0..2 in every split
    train = root / "ImageNet_LT_train.txt"
    train.write_text(train.read_text() + "train/n000/train_0.JPEG 3\n")
    entry = len(train.read_text().splitlines())
    with pytest.raises(CBDError, match="label 3 .* has no image in the test split ImageNet_LT_test.txt") as err:
        load_long_tail("imagenet_lt", str(root), imbalance_ratio=1)
    assert str(err.value) == (f"{train}: label 3 (image {entry}) has no image in the test split ImageNet_LT_test.txt, "
                              f"whose labels run 0..2; labels must run 0..C-1")


# =========================================================================== 7. ablate


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


# =========================================================================== 8. kernels run the command's cbdlib


def test_a_kernel_with_another_cbdlib_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(pipeline.PACKAGE_ENV, str(tmp_path / "other" / "cbdlib"))
    here = Path(workbook.__file__).resolve().parent
    with pytest.raises(CBDError, match=rf"^this kernel imports cbdlib from {re.escape(str(here))}, but python -m "
                                       rf"cbdlib run runs {re.escape(str(tmp_path))}/other/cbdlib; start the command "
                                       rf"with the Python whose cbdlib"):
        workbook.setup({"run_name": "x"}, notebook="01")


def test_the_kernel_environment_names_the_commands_package_and_results(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    run = runs.ensure_run_dir(tmp_path / "results" / "r")
    with runs.run_lock(run), pipeline.kernel_environment(run):
        assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(pipeline.package_dir().parent), "/elsewhere"]
        assert os.environ["CBD_RESULTS_DIR"] == str((tmp_path / "results").resolve())
        assert os.environ[pipeline.PACKAGE_ENV] == str(pipeline.package_dir())
        assert os.environ[runs.LOCK_TOKEN_ENV] == runs.lock_token(run)
    assert os.environ["PYTHONPATH"] == "/elsewhere" and runs.LOCK_TOKEN_ENV not in os.environ


def _copy_checkout(target: Path) -> Path:
    """The package and its notebooks, as a second clone of the same commit would hold them."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    shutil.copytree(ROOT / "cbdlib", target / "cbdlib", ignore=ignore)
    shutil.copytree(ROOT / "notebooks", target / "notebooks", ignore=ignore)
    return target


@pytest.mark.slow
def test_cbdlib_run_from_a_second_checkout_uses_its_own_package(tmp_path):
    """``installed`` is on the kernels' path (as an editable install of another clone would be);
    the command runs in ``second``. Before the fix the kernels trained with ``installed``'s code,
    wrote into ``installed/results`` and the command found no metrics.json in its own folder."""
    installed = _copy_checkout(tmp_path / "installed")
    second = _copy_checkout(tmp_path / "second")
    env = {**cli_env(tmp_path), "PYTHONPATH": str(installed), "CBD_SMOKE": "1", "MPLBACKEND": "Agg"}
    env.pop("CBD_RESULTS_DIR")  # results/ of the checkout whose package runs
    proc = subprocess.run([sys.executable, "-m", "cbdlib", "run", "--params", "notebooks/params/smoke.yaml",
                           "-p", "teachers=[vanilla:1]", "--no-progress"], cwd=second, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote no metrics.json" not in proc.stderr
    metrics = json.loads((second / "results" / "smoke" / "metrics.json").read_text())
    assert "cbd_ens" in metrics["methods"]
    assert not (installed / "results").exists()
