"""Tests of cbdlib.pipeline: ``run`` (notebooks through papermill) and ``aggregate`` (merging seeds).

The ``run`` tests use tiny fixture notebooks built here with nbformat; each one writes the
parameters it received into the run folder, so routing is checked from outside. The one
end-to-end test (marked slow) runs the real notebooks on the smoke settings when they exist.
"""
import contextlib
import csv
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

import nbformat
import numpy as np
import pytest
import yaml
from reliability_helpers import cli_env, error_line, fake_run, run_main, write_params

from cbdlib import __main__ as cli
from cbdlib import config, notebook_params, pipeline, runs, workbook
from cbdlib.data.stats import class_splits
from cbdlib.errors import CBDError
from cbdlib.metrics import split_accuracy, validate_metrics
from cbdlib.text import format_seconds

ROOT = config.project_root()
COUNTS = [500, 300, 180, 110, 70, 40, 25, 15, 8, 5]  # 10 classes, imbalance ratio 100
SPLITS = class_splits(COUNTS)
NAMES = [f"class_{i}" for i in range(10)]
PROV = {"device": "cpu (test)", "torch": "2.x", "git_commit": "abc123"}


# --- fixtures: fake records and metrics -----------------------------------------------------

def make_record(per_class, method="cbd", seed=1):
    record = {"all": float(np.mean(per_class)), "per_class": [float(v) for v in per_class]}
    for name, classes in SPLITS.items():
        record[name] = split_accuracy(record["per_class"], classes)
    record.update(method=method, seed=seed)
    return record


def per_class_for(level, seed):
    """Accuracy falling from head to tail, shifted by ``level`` and a little by ``seed``."""
    return np.clip(np.linspace(0.9, 0.2, 10) + level + 0.01 * seed, 0, 1)


def make_metrics(seeds=(1, 2)):
    methods = {"ce": -0.1, "crt": -0.05, "cbd": 0.0, "cbd_ens": 0.03}
    evaluations = {m: {s: make_record(per_class_for(level, s), m, s) for s in seeds} for m, level in methods.items()}
    return runs.build_metrics(evaluations, dataset="cifar10", imbalance_ratio=100.0, class_counts=COUNTS,
                              splits=SPLITS, seeds=list(seeds), prov=PROV)


def make_run(root: Path, name: str, seeds, counts=COUNTS, levels=None, epochs=200):
    """A finished run folder: params.yaml, evaluations per seed, metrics.json, per_class.csv."""
    run = root / name
    levels = levels or {"ce": -0.1, "cbd": 0.0, "cbd_ens": 0.03}
    splits = class_splits(counts)
    evaluations = {}
    for method, level in levels.items():
        for seed in seeds:
            record = make_record(per_class_for(level, seed), method, seed)
            runs.save_evaluation(run, seed, method, record)
            evaluations.setdefault(method, {})[seed] = record
    params = dataclasses.asdict(config.make_params({"run_name": name, "dataset": "cifar10", "epochs": epochs,
                                                       "imbalance_ratio": 100, "seeds": list(seeds),
                                                       "methods": list(levels)}))  # each one is evaluated
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = runs.build_metrics(evaluations, dataset="cifar10", imbalance_ratio=100.0, class_counts=list(counts),
                                 splits=splits, seeds=list(seeds), prov=PROV)
    runs.write_metrics(run, metrics, NAMES)
    return run


# --- fixtures: notebooks -------------------------------------------------------------------

def write_notebook(path: Path, parameters: str, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, str(path))
    return path


def record_body(tag: str, names: list) -> str:
    """Notebook code that writes the parameters it received to <run>/received_<tag>.json."""
    values = ", ".join(f"{n!r}: {n}" for n in names)
    return ("import json\nfrom cbdlib import runs\n"
            "out = runs.run_dir_for(run_name)\nout.mkdir(parents=True, exist_ok=True)\n"
            f"(out / 'received_{tag}.json').write_text(json.dumps({{{values}}}))\n")


@pytest.fixture
def results(tmp_path, monkeypatch):
    root = tmp_path / "results"
    monkeypatch.setenv("CBD_RESULTS_DIR", str(root))
    return root


@pytest.fixture
def notebooks(tmp_path):
    """01 declares a notebook-only int; 02 declares schema fields and a notebook-only str, and
    writes a metrics.json and a figure as the real notebooks do."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(folder / "01_stats.ipynb",
                   "run_name = 'default'  # run folder\ndataset = 'digits'\ntsne_points = 100  # an int\n"
                   "smoke = None  # follow CBD_SMOKE\n",
                   record_body("01", ["run_name", "dataset", "tsne_points", "smoke"]))
    metrics_json = json.dumps(make_metrics())
    write_notebook(folder / "02_train.ipynb",
                   "run_name = 'default'\nepochs = 200\nalpha = 0.4\nteachers = ['vanilla:1']\n"
                   "label = 'none'  # a string\nanything = None  # any type\n",
                   record_body("02", ["run_name", "epochs", "alpha", "teachers", "label", "anything"])
                   + f"(out / 'metrics.json').write_text({metrics_json!r})\n"
                   "(out / 'figures').mkdir(exist_ok=True)\n(out / 'figures' / 'splits.png').write_bytes(b'png')\n")
    (folder / "notes.ipynb").write_text("not a numbered notebook, never run")
    return folder


def params_file(tmp_path, **values) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"run_name": "fixture", "dataset": "digits", **values}))
    return path


# --- run -----------------------------------------------------------------------------------

def test_run_routes_keys_and_writes_summary_and_index(tmp_path, results, notebooks, capsys, monkeypatch):
    monkeypatch.delenv("CBD_SMOKE", raising=False)  # smoke would replace epochs=3 by its own
    path = params_file(tmp_path, epochs=3)
    run = pipeline.run_pipeline(path, {"tsne_points": 50, "label": "hi", "seeds": [1, 2]}, progress=False,
                                notebooks_dir=notebooks)
    assert run == results / "fixture"
    got01 = json.loads((run / "received_01.json").read_text())
    got02 = json.loads((run / "received_02.json").read_text())
    # Each notebook gets only what it declares; schema fields come from the full Params.
    assert got01 == {"run_name": "fixture", "dataset": "digits", "tsne_points": 50, "smoke": None}
    assert got02["epochs"] == 3 and got02["label"] == "hi"
    assert got02["alpha"] == 0.4                                 # schema default, not given
    assert got02["teachers"] == config.Params().teachers        # schema default overrides the notebook's
    assert got02["anything"] is None                             # notebook-only, not given: its default
    assert (run / "01_stats.ipynb").exists() and (run / "02_train.ipynb").exists()
    assert not (run / "notes.ipynb").exists()
    stored = yaml.safe_load((run / "params.yaml").read_text())
    assert stored["epochs"] == 3 and stored["seeds"] == [1, 2]

    summary = (run / "summary.md").read_text()
    assert summary.startswith("# fixture")
    assert "--params" in summary and "tsne_points=50" in summary
    assert "| `cbd_ens` |" in summary and "![splits](figures/splits.png)" in summary
    assert "[02_train.ipynb](02_train.ipynb)" in summary and "02_train.ipynb |" in summary  # wall time row
    assert "git commit: `abc123`" in summary and "| epochs | `3` |" in summary
    assert str(run / "summary.md") in capsys.readouterr().out

    rows = list(csv.DictReader((results / "index.csv").open()))
    assert len(rows) == 1
    row = rows[0]
    assert list(row) == list(pipeline.INDEX_COLUMNS)
    metrics = json.loads((run / "metrics.json").read_text())
    assert float(row["cbd_ens_all"]) == pytest.approx(metrics["methods"]["cbd_ens"]["all"], abs=1e-4)
    assert row["best_baseline"] == "crt" and row["run_name"] == "fixture" and row["seeds"] == "1 2"
    assert float(row["wall_s"]) > 0 and row["path"] == str(run)

    # Other parameters in the same run folder are refused before any notebook runs.
    with pytest.raises(CBDError, match="different parameters.*epochs"):
        pipeline.run_pipeline(path, {"epochs": 4}, progress=False, notebooks_dir=notebooks)
    assert len(list(csv.DictReader((results / "index.csv").open()))) == 1


def test_unknown_key_is_refused_with_a_suggestion(tmp_path, results, notebooks):
    path = params_file(tmp_path)
    with pytest.raises(CBDError, match=r"^-p epochz=3: unknown parameter 'epochz'.*did you mean epochs\b"):
        pipeline.run_pipeline(path, {"epochz": 3}, progress=False, notebooks_dir=notebooks)
    with pytest.raises(CBDError, match=r"'tsne_pionts'.*did you mean tsne_points"):
        pipeline.run_pipeline(path, {"tsne_pionts": 3}, progress=False, notebooks_dir=notebooks)
    bad_file = params_file(tmp_path, learning_rate=0.1)
    with pytest.raises(CBDError, match=r"params.yaml: unknown parameter 'learning_rate'"):
        pipeline.run_pipeline(bad_file, {}, progress=False, notebooks_dir=notebooks)
    assert not (results / "fixture").exists()


@pytest.mark.parametrize("key, value, message", [
    ("epochs", "ten", r"'epochs' must be an integer"),
    ("teachers", "vanilla:1", r"'teachers' must be a list"),
    ("tsne_points", "many", r"'tsne_points' must be an integer"),
    ("tsne_points", 2.5, r"'tsne_points' must be an integer"),
    ("label", 3, r"'label' must be a string"),
    ("dataset", "imagenet", r"unknown dataset 'imagenet'"),  # right type, wrong value: make_params
])
def test_wrong_type_or_value_is_refused(tmp_path, results, notebooks, key, value, message):
    with pytest.raises(CBDError, match=message):
        pipeline.run_pipeline(params_file(tmp_path), {key: value}, progress=False, notebooks_dir=notebooks)
    assert not (results / "fixture").exists()


def test_notebook_only_key_with_none_default_takes_any_type(notebooks):
    nbs = notebook_params.discover_notebooks(notebooks)
    assert [nb.name for nb in nbs] == ["01_stats.ipynb", "02_train.ipynb"]
    notebook_params.checked_values({"anything": [1, "x"], "tsne_points": 7, "alpha": 1}, nbs, {})


def test_failing_notebook_names_it(tmp_path, results, notebooks):
    write_notebook(notebooks / "03_fails.ipynb", "run_name = 'default'\n",
                   "x = 1\nraise ValueError('boom: the data\\nsecond line')\n")
    with pytest.raises(CBDError, match="03_fails.ipynb failed") as info:
        pipeline.run_pipeline(params_file(tmp_path), {}, progress=False, notebooks_dir=notebooks)
    message = str(info.value)
    partial = results / "fixture" / "03_fails.ipynb"
    assert "03_fails.ipynb failed" in message and "ValueError: boom: the data" in message
    assert str(partial) in message and partial.exists()
    assert "\n" not in message and "Traceback" not in message
    assert not (results / "fixture" / "summary.md").exists()


def test_cli_run_error_is_one_line(tmp_path, results, notebooks):
    path = params_file(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cbdlib", "run", "--params", str(path), "-p", "epochs=ten"],
                          capture_output=True, text=True, env={**os.environ}, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: -p epochs=ten: parameter 'epochs' must be an integer")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# --- summary -------------------------------------------------------------------------------

def test_format_split_table_mean_std_and_null_splits():
    metrics = make_metrics(seeds=(1, 2))
    metrics["methods"]["ce"]["few"] = None
    table = pipeline.format_split_table(metrics)
    lines = table.splitlines()
    assert lines[0].startswith("| method | seeds | all | many (") and "tail (3)" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["`ce`", "`crt`", "`cbd`", "`cbd_ens`"]
    cbd = metrics["methods"]["cbd"]
    row = next(line for line in lines if line.startswith("| `cbd` |"))
    assert f"{100 * cbd['all']:.2f} ± {100 * metrics['std']['cbd']['all']:.2f}" in row
    assert metrics["std"]["cbd"]["all"] == pytest.approx(0.005)  # seeds shift by 0.01: population std 0.005
    assert "n/a" in next(line for line in lines if line.startswith("| `ce` |"))


def test_summary_markdown_states_the_evidence(tmp_path):
    metrics = make_metrics(seeds=(1,))
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "tsne.png").write_bytes(b"png")
    (tmp_path / "figures" / "split_table.csv").write_text("method,all\n")
    (tmp_path / "03_class_balanced_distillation.ipynb").write_text("{}")
    params = dataclasses.asdict(config.Params(run_name="r1", lr=0.1))
    write_ledger(tmp_path / runs.NOTEBOOK_TIMES, {"01_a.ipynb": 3.0, "02_b.ipynb": 125.0, "total": 130.0})
    text = pipeline.summary_markdown(tmp_path, metrics, params=params, command="python -m cbdlib run -p x=1")
    assert text.startswith("# r1\n")
    assert "imbalance ratio 100.0 (measured max/min 100.0)" in text
    assert "many-shot (> 100 training images): 4 classes; medium (20-100): 3; few (< 20): 3" in text
    assert "head / mid / tail (thirds by training count): 4 / 3 / 3 classes" in text
    assert "500 300 180 110 70 40 25 15 8 5" in text
    assert "| `cbd` | 1 |" in text and " ± " not in pipeline.format_split_table(metrics)
    assert "Smoke run" not in text  # one seed: mean only
    assert "| 02_b.ipynb | 2 min 05 s |" in text and "| **total** | 2 min 10 s |" in text
    assert "![tsne](figures/tsne.png)" in text and "[split_table.csv](figures/split_table.csv)" in text
    assert "[03_class_balanced_distillation.ipynb](03_class_balanced_distillation.ipynb)" in text
    assert "cpu (test)" in text and "abc123" in text and "| arch | `resnet32` |" in text
    assert "| lr | `0.1` |" in text and "| teachers | `['vanilla:1', 'vanilla:2', 'aug:1', 'aug:2']` |" in text


def test_index_appends_under_one_header(tmp_path):
    index = tmp_path / "index.csv"
    metrics = make_metrics()
    for name in ("a", "b"):
        pipeline.append_index(pipeline.index_row(tmp_path / name, metrics, {"run_name": name, "arch": "resnet32",
                                                                            "epochs": 200}, 12.0), index)
    rows = list(csv.DictReader(index.open()))
    assert [r["run_name"] for r in rows] == ["a", "b"]
    assert index.read_text().count("finished_at") == 1
    assert rows[0]["best_baseline"] == "crt" and rows[0]["finished_at"].endswith("Z")


def test_format_command_quotes_yaml_values():
    command = pipeline.format_command("notebooks/params/smoke.yaml", {"seeds": [1, 2], "data": None, "lr": 0.05})
    assert command == ("python -m cbdlib run --params notebooks/params/smoke.yaml "
                       "-p 'seeds=[1, 2]' -p data=null -p lr=0.05")


# --- aggregate -----------------------------------------------------------------------------

def test_aggregate_merges_seeds_mean_and_std(tmp_path):
    a = make_run(tmp_path, "run_a", [1])
    b = make_run(tmp_path, "run_b", [2])
    out = pipeline.aggregate_runs([str(a), str(b)], str(tmp_path / "merged"), notebook=False)  # no confusions here
    metrics = json.loads((out / "metrics.json").read_text())
    validate_metrics(metrics)
    assert metrics["seeds"] == [1, 2]
    for method in ("ce", "cbd", "cbd_ens"):
        rec_a = json.loads(runs.evaluation_path(a, 1, method).read_text())
        rec_b = json.loads(runs.evaluation_path(b, 2, method).read_text())
        for key in ("all", "many", "tail"):
            assert metrics["methods"][method][key] == pytest.approx((rec_a[key] + rec_b[key]) / 2)
            assert metrics["std"][method][key] == pytest.approx(abs(rec_a[key] - rec_b[key]) / 2)
        assert metrics["methods"][method]["per_class"][9] == pytest.approx(
            (rec_a["per_class"][9] + rec_b["per_class"][9]) / 2)
        assert metrics["methods"][method]["seeds"] == [1, 2]
        assert runs.evaluation_path(out, 1, method).exists() and runs.evaluation_path(out, 2, method).exists()
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert len(rows) == 3 * 10 and rows[0]["class_name"] == "class_0" and rows[0]["seeds"] == "2"
    summary = (out / "summary.md").read_text()
    # sources by run name, not by the folders of the machine that made them
    assert f"`{a.name}`" in summary and f"`{b.name}`" in summary and str(a) not in summary
    assert "| `cbd_ens` | 2 |" in summary and " ± " in summary
    assert "seeds [1, 2]" in summary and summary.startswith("# merged\n")
    # Aggregating again into the same folder replaces it.
    pipeline.aggregate_runs([a, b], tmp_path / "merged", notebook=False)


def test_aggregate_refuses_mismatched_runs(tmp_path):
    a = make_run(tmp_path, "run_a", [1, 2])
    other_counts = make_run(tmp_path, "run_c", [3], counts=[500, 300, 180, 110, 70, 40, 25, 15, 8, 6])
    with pytest.raises(CBDError, match="different class_counts"):
        pipeline.aggregate_runs([a, other_counts], tmp_path / "out1")
    same_seed = make_run(tmp_path, "run_d", [2, 3])
    with pytest.raises(CBDError, match="seed 2 appears in both"):
        pipeline.aggregate_runs([a, same_seed], tmp_path / "out2")
    other_epochs = make_run(tmp_path, "run_e", [4], epochs=100)
    with pytest.raises(CBDError, match="different parameters.*epochs"):
        pipeline.aggregate_runs([a, other_epochs], tmp_path / "out3")
    with pytest.raises(CBDError, match="is a run folder"):
        pipeline.aggregate_runs([same_seed], a)
    assert not any((tmp_path / f"out{i}").exists() for i in (1, 2, 3))


# --- end to end on the real notebooks -------------------------------------------------------

REAL_NOTEBOOKS = ["01_long_tail_statistics.ipynb", "02_teacher_training.ipynb",
                  "03_class_balanced_distillation.ipynb", "04_per_split_analysis.ipynb"]
CONTRACT_METHODS = ["teacher_vanilla_1", "teacher_vanilla_2", "teacher_aug_1", "teacher_aug_2", "teacher_ensemble",
                    "ce", "ce_cb", "crt", "lws", "tau_norm", "ncm", "balanced_softmax", "cbd", "cbd_ens",
                    "ce_drw", "ldam_drw", "logit_adjust"]


@pytest.mark.slow
def test_end_to_end_smoke_run(smoke_run):
    """``python -m cbdlib run`` on the smoke profile (the session's shared run, see conftest.py)."""
    run = smoke_run
    metrics = json.loads((run / "metrics.json").read_text())
    validate_metrics(metrics)
    assert sorted(metrics["methods"]) == sorted(CONTRACT_METHODS)
    for name in ("params.yaml", "per_class.csv", "history.jsonl", "summary.md", *REAL_NOTEBOOKS):
        assert (run / name).is_file(), name
    assert list((run / "figures").glob("*.png"))
    rows = [r for r in csv.DictReader((run.parent / "index.csv").open()) if r["path"] == str(run)]
    assert len(rows) == 1 and rows[0]["run_name"] == "default"
    assert float(rows[0]["cbd_ens_all"]) == pytest.approx(metrics["methods"]["cbd_ens"]["all"], abs=1e-4)
    summary = (run / "summary.md").read_text()
    assert "| `cbd_ens` | 1 |" in summary and "**Smoke run**" in summary


def test_the_real_notebooks_refuse_a_bad_value_or_an_unknown_key_before_running(tmp_path, monkeypatch, capsys):
    from cbdlib.__main__ import main

    monkeypatch.setenv("CBD_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("CBD_SMOKE", "1")
    monkeypatch.chdir(ROOT)
    refusals = (("epochs=ten", "parameter 'epochs' must be an integer"), ("epochz=3", "unknown parameter 'epochz'"))
    for bad, message in refusals:
        capsys.readouterr()
        assert main(["run", "--params", "notebooks/params/smoke.yaml", "--no-progress", "-p", bad]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: -p {bad}: ") and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []


# --- resumed runs: wall times and warnings -------------------------------------------------

def write_ledger(path, seconds: dict, resumed=()):
    path.write_text(json.dumps({name: {"s": s, "invocations": 1 + (name in resumed), "resumed": name in resumed,
                                       "open": None} for name, s in seconds.items()}))


def test_summary_marks_resumed_notebooks_and_stages(tmp_path):
    metrics = json.loads((fake_run(tmp_path, "r", [1], ["ce"], ["ce"]) / "metrics.json").read_text())
    write_ledger(tmp_path / runs.STAGE_TIMES, {"one_stage": 2.0, "decoupled": 3.0}, resumed={"one_stage"})
    write_ledger(tmp_path / runs.NOTEBOOK_TIMES, {"01_a.ipynb": 5.0, "02_b.ipynb": 75.0, "total": 80.0},
                 resumed={"02_b.ipynb", "total"})
    text = pipeline.summary_markdown(tmp_path, metrics)
    assert "| 01_a.ipynb | 5.0 s |" in text and "| 02_b.ipynb | 1 min 15 s (resumed) |" in text
    assert "| **total** | 1 min 20 s (resumed) |" in text
    rows = [line for line in text.splitlines() if line.startswith("| stage ") and not line.startswith("| stage |")]
    assert rows == ["| stage one_stage | 2.0 s (resumed) |", "| stage decoupled | 3.0 s |"]  # stages first, in order
    assert text.index("| stage decoupled |") < text.index("| 01_a.ipynb |") < text.index("| **total** |")


FLAKY = ("import logging\nfrom cbdlib import runs, workbook\nworkbook.configure_logging()\n"
         "out = runs.run_dir_for(run_name)\n"
         "logging.getLogger('cbdlib.checkpoint')"
         ".warning('checkpoint x.pt fails its checksum; falling back to x.prev.pt')\n"
         "if not (out / 'failed_once').exists():\n"
         "    (out / 'failed_once').write_text('')\n"
         "    raise RuntimeError('interrupted')\n")


def test_cbdlib_run_sums_wall_times_and_relays_warnings(tmp_path, results, monkeypatch, caplog):
    """A notebook stopped once and rerun: the summary sums both invocations and says resumed; the
    recovery warning it printed reaches the command's console; smoke says what it replaced."""
    monkeypatch.setenv("CBD_SMOKE", "1")
    # workbook.configure_logging (a notebook's setup run in process) stops propagation; caplog needs it.
    monkeypatch.setattr(logging.getLogger("cbdlib"), "propagate", True)
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


# --- every value checked before notebook 01 ------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("lr=-0.1", "error: -p lr=-0.1: lr must be > 0, got -0.1"),
    ("arch=resnet33", "error: -p arch=resnet33: unknown arch 'resnet33': arch must be one of resnet32"),
    ("val_per_class=0", "error: -p val_per_class=0: val_per_class must be >= 1, got 0"),
    ("methods=[]", "error: -p methods=[]: methods must be null (every method) or a non-empty list"),
])
def test_cbdlib_run_refuses_a_bad_value_before_notebook_01(results, capsys, override, message):
    status, err = run_main(cli.main, ["run", "--params", str(ROOT / "notebooks" / "params" / "smoke.yaml"),
                                      "-p", override], capsys)
    assert status == 2 and error_line(err).startswith(message), err
    assert not results.exists()  # no run folder, no index.csv


# --- disk full during cbdlib run -----------------------------------------------------------

def _one_notebook(tmp_path: Path, body: str = "x = 1\n", parameters: str = "run_name = 'default'\n") -> Path:
    folder = tmp_path / "notebooks"
    folder.mkdir(exist_ok=True)
    write_notebook(folder / "01_only.ipynb", parameters, body)
    return folder


def test_a_full_disk_while_the_executed_notebook_is_written_keeps_the_previous_copy(tmp_path, results, monkeypatch):
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


# --- one writer for the whole pipeline -----------------------------------------------------

WAIT = ("import time\nfrom cbdlib import runs, workbook\nsettings, run_dir = workbook.setup(globals(), notebook='01')\n"
        "with runs.run_lock(run_dir):  # as Experiment does: the kernel works under the command's lock\n"
        "    (run_dir / 'started').write_text('')\n"
        "    deadline = time.monotonic() + 900\n"
        "    while not (run_dir / 'go').exists() and time.monotonic() < deadline:\n"
        "        time.sleep(0.05)\n")


@pytest.mark.slow
def test_one_writer_for_the_whole_pipeline(tmp_path, results):
    notebooks = _one_notebook(tmp_path, WAIT, "run_name = 'default'\nsmoke = None\n")
    params = write_params(tmp_path / "p.yaml", {"run_name": "busy", "dataset": "digits"})
    run = results / "busy"
    code = ("import sys; from cbdlib import pipeline; "
            f"pipeline.run_pipeline({str(params)!r}, {{}}, progress=False, notebooks_dir={str(notebooks)!r})")
    env = {**cli_env(tmp_path), "CBD_RESULTS_DIR": str(results)}
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
    assert len((results / "index.csv").read_text().splitlines()) == 2  # header + one run


# --- the kernels run the command's cbdlib --------------------------------------------------

def test_the_kernel_environment_names_the_commands_package_and_results(tmp_path, results, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    run = runs.ensure_run_dir(results / "r")
    with runs.run_lock(run), pipeline.kernel_environment(run):
        assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(pipeline.package_dir().parent), "/elsewhere"]
        assert os.environ["CBD_RESULTS_DIR"] == str(results.resolve())
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
