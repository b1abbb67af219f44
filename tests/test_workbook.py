"""Tests of cbdlib.workbook and of the four notebooks it serves.

Fast tests check the parameter handling, the run-folder readers and the notebooks as
committed; the slow ones execute the notebooks with papermill on the smoke settings in a
temporary CBD_RESULTS_DIR.
"""
import ast
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cbdlib import CBDError, pipeline, runs, workbook  # noqa: E402
from cbdlib.config import field_names, load_params_file, make_params, params_dir, resolve  # noqa: E402
from cbdlib.notebook_params import NOTEBOOK_FILES, injected_names  # noqa: E402
from cbdlib.runs.records import load_features  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(autouse=True)
def restore_cbdlib_logger():
    """setup() configures the "cbdlib" logger for notebooks; leave it as found for other tests."""
    logger = logging.getLogger("cbdlib")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def notebook(key):
    return nbformat.read(NOTEBOOKS / NOTEBOOK_FILES[key], as_version=4)


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    return cells[0], nb.cells.index(cells[0])


def literal_assignments(source):
    """name -> value of the ``name = literal`` lines of a parameters cell (fails on anything else)."""
    values = {}
    for node in ast.parse(source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.dump(node)
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


# --------------------------------------------------------------------------- parameters


def test_collect_params_keeps_schema_keys_only():
    namespace = {"epochs": 3, "epochz": 5, "lr": 0.1, "np": np, "In": ["", "x = 1"]}
    assert workbook.collect_params(namespace) == {"epochs": 3, "lr": 0.1}
    assert workbook.collect_params(namespace, ["lr"]) == {"lr": 0.1}


def test_injected_parameters_are_read_from_the_input_history():
    history = ["", 'run_name = "default"  # x', '# Parameters\nrun_name = "t"\nepochs = 2\n', "workbook.setup(...)"]
    assert injected_names({"In": history}) == ["run_name", "epochs"]
    assert injected_names({}) == []
    assert injected_names({"In": ["", "a = 1"]}) == []


def test_setup_refuses_a_parameter_the_notebook_does_not_declare(tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_RESULTS_DIR", str(tmp_path))
    namespace = {"run_name": "r", "epochs": 2, "epochz": 5, "In": ["", "# Parameters\nepochz = 5\n"]}
    with pytest.raises(CBDError, match=r"notebook 02 has no parameter 'epochz' \(did you mean epochs"):
        workbook.setup(namespace, notebook="02")
    # A schema key that notebook 01 does not declare is refused there too.
    with pytest.raises(CBDError, match="notebook 01 has no parameter 'epochs'"):
        workbook.setup({"In": ["# Parameters\nepochs = 3"]}, notebook="01")
    with pytest.raises(CBDError, match="unknown notebook"):
        workbook.setup({}, notebook="07")


def test_setup_checks_types_and_values(tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_RESULTS_DIR", str(tmp_path))
    with pytest.raises(CBDError, match="parameter 'epochs' must be an integer, got 'ten'"):
        workbook.setup({"epochs": "ten"}, notebook="02")
    with pytest.raises(CBDError, match="imbalance_ratio must be >= 1"):
        workbook.setup({"imbalance_ratio": 0.5}, notebook="01")
    with pytest.raises(CBDError, match="run_name must be a plain folder name"):
        workbook.setup({"run_name": "a/b"}, notebook="02")


def test_setup_resolves_settings_and_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("CBD_SMOKE", "1")
    values = load_params_file(params_dir() / "default.yaml")
    settings, run_dir = workbook.setup({**values, "run_name": "mine", "imbalance_ratio": 20}, notebook="02")
    assert run_dir == tmp_path / "mine"
    assert not run_dir.exists()  # setup writes nothing
    assert settings.smoke and settings.epochs == 2 and settings.imbalance_ratio == 20.0
    assert settings.lr == 0.05
    settings, _ = workbook.setup({**values, "smoke": False}, notebook="02")  # a literal overrides CBD_SMOKE
    assert not settings.smoke and settings.epochs == 30 and settings.seeds == [1, 2, 3]
    text = workbook.describe(settings, run_dir)
    assert "lr 0.05 (used)" in text and "30 epochs" in text and "device: cpu" in text


def test_notebook_03_continues_the_experiment_of_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_RESULTS_DIR", str(tmp_path))
    monkeypatch.delenv("CBD_SMOKE", raising=False)
    with pytest.raises(CBDError, match=r"no run folder .*mine yet: run notebook 02_teacher_training.ipynb first"):
        workbook.setup({"run_name": "mine"}, notebook="03")
    # Notebook 02 starts the run: its parameters are written to the folder's params.yaml.
    values = {"run_name": "mine", "epochs": 7, "alpha": 0.3, "lr": None, "seeds": [2], "device": "auto",
              "overwrite": True, "smoke": False}
    started = resolve(make_params(values))
    runs.prepare_run_dir(tmp_path / "mine", started)
    settings, run_dir = workbook.setup({"run_name": "mine", "device": "cpu", "methods": None,
                                        "eval_batch_size": None}, notebook="03")
    assert run_dir == tmp_path / "mine"
    assert (settings.epochs, settings.alpha, settings.seeds, settings.lr) == (7, 0.3, [2], started.lr)
    assert settings.device == "cpu" and settings.eval_batch_size == started.eval_batch_size
    assert settings.method_names == started.method_names and not settings.overwrite  # 03 never clears 02's models
    # What would change results is not a parameter of notebook 03.
    with pytest.raises(CBDError, match="notebook 03 has no parameter 'alpha'"):
        workbook.setup({"run_name": "mine", "In": ["# Parameters\nalpha = 0.5\n"]}, notebook="03")


def test_setup_shows_the_library_log_on_stdout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CBD_RESULTS_DIR", str(tmp_path))
    workbook.setup({}, notebook="01")
    workbook.setup({}, notebook="01")  # twice: still one handler
    logging.getLogger("cbdlib.engine").info("epoch line")
    assert capsys.readouterr().out == "epoch line\n"


def test_analysis_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_RESULTS_DIR", str(tmp_path))
    monkeypatch.delenv("CBD_SMOKE", raising=False)
    options, run_dir = workbook.analysis_setup({"run_name": "x", "tsne_points": 500, "methods": ["ce", "cbd_ens"]})
    assert run_dir == tmp_path / "x" and options.tsne_points == 500 and not options.smoke
    options, _ = workbook.analysis_setup({"tsne_points": 500, "smoke": True})
    assert options.tsne_points == workbook.TSNE_SMOKE_POINTS
    with pytest.raises(CBDError, match="tsne_points"):
        workbook.analysis_setup({"tsne_points": "many"})
    with pytest.raises(CBDError, match=r"unknown method 'cdb_ens' \(did you mean cbd_ens"):
        workbook.analysis_setup({"methods": ["cdb_ens"]})
    with pytest.raises(CBDError, match="notebook 04 has no parameter 'epochs'"):
        workbook.analysis_setup({"In": ["# Parameters\nepochs = 1"]})


def test_a_kernel_with_another_cbdlib_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(pipeline.PACKAGE_ENV, str(tmp_path / "other" / "cbdlib"))
    here = Path(workbook.__file__).resolve().parent
    with pytest.raises(CBDError, match=rf"^this kernel imports cbdlib from {re.escape(str(here))}, but python -m "
                                       rf"cbdlib run runs {re.escape(str(tmp_path))}/other/cbdlib; start the command "
                                       rf"with the Python whose cbdlib"):
        workbook.setup({"run_name": "x"}, notebook="01")


# --------------------------------------------------------------------------- the notebooks as committed


@pytest.mark.parametrize("key", sorted(NOTEBOOK_FILES))
def test_notebook_layout(key):
    nb = notebook(key)
    assert nb.cells[0].cell_type == "markdown"
    cell, index = parameters_cell(nb)
    values = literal_assignments(cell.source)
    assert tuple(values) == workbook.declared(key)
    assert values.get("smoke", None) is None and ("smoke" in values) == (key != "03")  # 03: as 02 ran
    lines = cell.source.splitlines()
    assert all("  # " in line for line in lines), "every parameter has a comment"
    following = nb.cells[index + 1]
    assert following.cell_type == "code" and "workbook." in following.source and "setup(globals()" in following.source
    assert nb.cells[-1].cell_type == "markdown" and "How to read" in nb.cells[-1].source
    # Outputs policy: committed stripped.
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None


def test_training_notebooks_declare_every_schema_key_with_the_default_yaml_values():
    expected = dataclasses.asdict(make_params(load_params_file(params_dir() / "default.yaml")))
    values = literal_assignments(parameters_cell(notebook("02"))[0].source)
    hint = ("notebook 02's parameters cell must list every cbdlib.config.Params field, in order, "
            "with the values of notebooks/params/default.yaml (schema defaults for the others)")
    assert list(values) == field_names(), hint
    assert values == expected, hint


def test_notebook_03_declares_only_what_may_change_after_notebook_02_and_each_as_the_run():
    values = literal_assignments(parameters_cell(notebook("03"))[0].source)
    assert list(values) == ["run_name", *sorted(runs.RESUMABLE_KEYS - {"overwrite"})]
    assert values.pop("run_name") == "default" and set(values.values()) == {None}


def test_papermill_sees_the_declared_parameters():
    import papermill

    from cbdlib.notebook_params import declared_in

    for key, name in NOTEBOOK_FILES.items():
        cell = literal_assignments(parameters_cell(notebook(key))[0].source)
        inspected = papermill.inspect_notebook(str(NOTEBOOKS / name))
        assert tuple(inspected) == tuple(cell)
        # the one reader of a parameters cell (kernels and cbdlib run) reads what papermill injects into
        assert declared_in(NOTEBOOKS / name) == {k: v["default"] for k, v in inspected.items()}


def test_notebook_01_documents_the_outputs_policy():
    text = " ".join(c.source for c in notebook("01").cells if c.cell_type == "markdown")
    assert "Outputs policy" in text and "--nbval-lax" in text


# --------------------------------------------------------------------------- reading a run


def fake_metrics():
    counts = [100, 60, 30, 15, 8, 5]
    names = ["ce", "crt", "tau_norm", "teacher_vanilla_2", "teacher_aug_1", "teacher_vanilla_1",
             "teacher_ensemble", "cbd", "cbd_ens"]
    methods = {}
    for i, name in enumerate(names):
        acc = 0.5 + 0.05 * i
        methods[name] = {k: acc for k in ("all", "many", "medium", "few", "head", "mid", "tail")}
        methods[name]["per_class"] = [acc] * len(counts)
    methods["crt"]["all"] = 0.9  # the best baseline
    return {"dataset": "digits", "imbalance_ratio": 20.0, "class_counts": counts,
            "splits": {"many": [], "medium": [0, 1, 2], "few": [3, 4, 5], "head": [0, 1], "mid": [2, 3],
                       "tail": [4, 5]},
            "seeds": [1], "device": "cpu", "torch": "x", "git_commit": "y", "methods": methods,
            "std": {n: {k: 0.0 for k in ("all", "many", "medium", "few", "head", "mid", "tail")} for n in names}}


def test_restrict_keeps_order_and_notes_absent_methods(capsys):
    metrics = fake_metrics()
    shown = workbook.restrict(metrics, ["cbd_ens", "ce", "lws"])
    assert list(shown["methods"]) == ["cbd_ens", "ce"] and list(shown["std"]) == ["cbd_ens", "ce"]
    assert "not in this run, left out: lws" in capsys.readouterr().out
    assert list(metrics["methods"])[0] == "ce"  # the original is untouched
    assert workbook.restrict(metrics, None)["methods"] == metrics["methods"]
    with pytest.raises(CBDError, match="unknown method 'cbd-ens'"):
        workbook.restrict(metrics, ["cbd-ens"])


def test_method_helpers(capsys):
    metrics = fake_metrics()
    assert workbook.teacher_names(metrics) == ["teacher_vanilla_1", "teacher_vanilla_2", "teacher_aug_1"]
    assert workbook.best_baseline(metrics) == "crt"
    assert workbook.key_methods(metrics) == ["ce", "crt", "teacher_ensemble", "cbd", "cbd_ens"]
    assert workbook.student_and_baseline(metrics) == ("cbd_ens", "crt")
    few = workbook.restrict(metrics, ["ce", "cbd"])
    assert workbook.key_methods(few) == ["ce", "cbd"]
    assert workbook.student_and_baseline(few) is None
    assert "cbd_ens is not in this run" in capsys.readouterr().out
    assert workbook.best_baseline(workbook.restrict(metrics, ["cbd"])) is None
    summary = workbook.split_summary(metrics)
    assert "many-shot (> 100 training images): 0 classes" in summary and "few (< 20): 3" in summary
    assert "2 / 2 / 2" in summary


def test_readers_give_clear_errors_for_a_missing_run(tmp_path):
    with pytest.raises(CBDError, match="run notebooks 02 and 03"):
        workbook.load_metrics(tmp_path / "absent")
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(CBDError, match="not valid JSON"):
        workbook.load_metrics(tmp_path)
    with pytest.raises(CBDError, match="no evaluation of cbd_ens"):
        workbook.evaluation(tmp_path, 1, "cbd_ens")
    with pytest.raises(CBDError, match="no saved features of ce"):
        load_features(tmp_path, 1, "ce")


def test_class_names_come_from_per_class_csv(tmp_path):
    metrics = fake_metrics()
    assert workbook.class_names(tmp_path, metrics) == ["0", "1", "2", "3", "4", "5"]
    (tmp_path / "per_class.csv").write_text(
        "method,label,class_name,train_count,accuracy_mean,accuracy_std,seeds\nce,1,cat,60,0.5,0.0,1\n")
    assert workbook.class_names(tmp_path, metrics)[:2] == ["0", "cat"]


def test_features_are_paired_by_test_index(tmp_path, capsys):
    folder = tmp_path / "features" / "seed_1"
    folder.mkdir(parents=True)
    np.savez(folder / "teacher_vanilla_2.npz", features=np.arange(8.0).reshape(4, 2), labels=np.array([0, 1, 2, 3]),
             indices=np.array([1, 3, 5, 7]))
    np.savez(folder / "cbd_ens.npz", features=-np.arange(6.0).reshape(3, 2), labels=np.array([1, 2, 3]),
             indices=np.array([3, 5, 7]))
    a, b, labels = workbook.paired_features(tmp_path, 1, "teacher_vanilla_2", "cbd_ens")
    assert labels.tolist() == [1, 2, 3] and a[:, 0].tolist() == [2.0, 4.0, 6.0] and b[:, 0].tolist() == [0, -2, -4]
    assert workbook.tsne_teacher(tmp_path, 1) == "teacher_vanilla_2"
    assert workbook.tsne_teacher(tmp_path, 1, "teacher_aug_1") == "teacher_vanilla_2"
    assert "no saved features of teacher_aug_1" in capsys.readouterr().out
    assert workbook.tsne_teacher(tmp_path, 2) is None
    assert not workbook.has_features(tmp_path, 1, "ce")


def test_require_stage_one_names_notebook_02(tmp_path):
    values = load_params_file(params_dir() / "smoke.yaml")
    settings = resolve(make_params(values))
    with pytest.raises(CBDError, match="run notebook 02_teacher_training.ipynb first"):
        workbook.require_stage_one(settings, tmp_path / "absent")
    (tmp_path / "params.yaml").write_text("run_name: smoke\n")
    with pytest.raises(CBDError, match=r"lacks the trained teacher_vanilla_1 \(seed 1\).*and 1 more: run notebook 02"):
        workbook.require_stage_one(settings, tmp_path)
    only_cbd = resolve(make_params({**values, "methods": ["cbd"]}))
    assert workbook.stage_one_missing(only_cbd, tmp_path) == ["teacher_vanilla_1 (seed 1)"]


def test_imbalance_explorer_builds_and_redraws_without_a_frontend():
    box = workbook.imbalance_explorer(100, [str(c) for c in range(10)], 10.0, "exp")
    assert box.last_counts[0] == 100 and box.last_counts[-1] == 10
    ratio, profile = box.children[0].children
    ratio.value = 100.0
    assert box.last_counts[-1] == 1
    profile.value = "step"
    assert box.last_counts == [100] * 5 + [1] * 5
    ratio.value = 1000.0  # leaves classes empty: a note, no exception
    assert "no image" in box.children[1].value and box.last_counts[-1] == 1


# --------------------------------------------------------------------------- the notebooks, executed


def execute(key, out_dir, **parameters):
    import papermill

    out = out_dir / NOTEBOOK_FILES[key]
    return papermill.execute_notebook(str(NOTEBOOKS / NOTEBOOK_FILES[key]), str(out), kernel_name="python3",
                                      parameters=parameters, progress_bar=False, cwd=str(out_dir))


def outputs_text(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def images(nb):
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def executed(run_dir, key):
    """The copy of notebook ``key`` that ``cbdlib run`` executed into the run folder."""
    return nbformat.read(run_dir / NOTEBOOK_FILES[key], as_version=4)


SMOKE_METHODS = {"teacher_vanilla_1", "teacher_vanilla_2", "teacher_aug_1", "teacher_aug_2", "teacher_ensemble",
                 "ce", "ce_cb", "balanced_softmax", "crt", "lws", "tau_norm", "ncm", "cbd", "cbd_ens",
                 "ce_drw", "ldam_drw", "logit_adjust"}


@pytest.mark.slow
def test_the_smoke_run_fills_the_run_folder(smoke_run):
    run_dir = smoke_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["methods"]) == SMOKE_METHODS and metrics["seeds"] == [1]  # smoke: one seed
    figures = {p.name for p in (run_dir / "figures").iterdir()}
    for name in ("01_class_histogram.png", "01_cumulative_share.png", "01_sample_images.png", "01_counts_table.csv",
                 "02_teacher_curves.png", "02_baseline_curves.png", "02_teacher_per_class.png", "02_split_table.csv",
                 "03_tau_curve.png", "03_student_curves.png", "03_cbd_vs_baselines.png", "03_cbd_table.csv",
                 "04_split_accuracy.png", "04_per_class_accuracy.png", "04_gain_vs_class_size.png", "04_tsne.png",
                 "04_split_table.csv", "04_confusion_cbd_ens.png"):
        assert name in figures, name
    assert len([n for n in figures if n.startswith("04_confusion_")]) == 2  # CBD-ENS and the best baseline
    # Figures are drawn into the executed notebooks too (inline, even with MPLBACKEND=Agg).
    nbs = {key: executed(run_dir, key) for key in NOTEBOOK_FILES}
    assert images(nbs["01"]) >= 3 and images(nbs["02"]) >= 3 and images(nbs["03"]) >= 3 and images(nbs["04"]) >= 5
    for key, nb in nbs.items():  # each notebook's final check ran and passed
        assert "figures and tables written to" in outputs_text(nb), key


@pytest.mark.slow
def test_the_smoke_run_shows_the_library_log_and_the_settings_used(smoke_run):
    run_dir = smoke_run
    assert "requested imbalance ratio 10" in outputs_text(executed(run_dir, "01"))
    assert "smoke profile" in outputs_text(executed(run_dir, "02"))
    assert "epoch 2/2" in outputs_text(executed(run_dir, "02"))  # the library's per-epoch log reaches the notebook
    assert "test top-1" in outputs_text(executed(run_dir, "03"))
    params = (run_dir / "params.yaml").read_text()
    assert "run_name: default" in params and "arch: resnet_tiny" in params
    taus = workbook.post_hoc_choices(run_dir, [1], methods=["tau_norm"])
    assert len(taus) == 1 and 0.0 <= taus["tau"][0] <= 2.0


@pytest.mark.slow
def test_papermill_parameters_reach_the_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_RESULTS_DIR", str(tmp_path / "results"))
    nb = execute("01", tmp_path, run_name="ratio20", imbalance_ratio=20, smoke=True)
    text = outputs_text(nb)
    assert "requested imbalance ratio 20" in text and "many-shot (> 100 training images)" in text
    assert (tmp_path / "results" / "ratio20" / "figures" / "01_class_histogram.png").is_file()
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["ratio20"]  # nothing written elsewhere


@pytest.mark.slow
def test_notebooks_stop_with_clear_errors(smoke_run, tmp_path, monkeypatch):
    import papermill

    results = tmp_path / "results"
    results.mkdir()
    shutil.copytree(smoke_run, results / "t", ignore=shutil.ignore_patterns(".lock"))
    monkeypatch.setenv("CBD_RESULTS_DIR", str(results))
    with pytest.raises(papermill.PapermillExecutionError, match="no parameter 'epochz'"):
        execute("02", tmp_path, run_name="t", smoke=True, epochz=3)
    with pytest.raises(papermill.PapermillExecutionError, match="run notebook 02_teacher_training.ipynb first"):
        execute("03", tmp_path, run_name="fresh")
    with pytest.raises(papermill.PapermillExecutionError, match="run notebooks 02 and 03"):
        execute("04", tmp_path, run_name="fresh")
    assert not (results / "fresh").exists()
    # Notebook 04 on a subset of methods: notes, no crash, and its check asks only for what it can draw.
    nb = execute("04", tmp_path, run_name="t", methods=["ce", "cbd"], smoke=True)
    text = outputs_text(nb)
    # split table and bars, per-class accuracy, and the analyses of ce and cbd (probes, ECE, teacher agreement)
    assert "cbd_ens is not in this run" in text and "all 8 figures and tables written" in text


# --------------------------------------------------------------------------- the notebooks' final check


def _touch_all(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")


def test_the_final_check_names_a_missing_or_older_output(tmp_path, capsys):
    figures = tmp_path / "figures"
    names = workbook.expected_outputs("02", tmp_path)
    assert names == ["02_teacher_curves.png", "02_baseline_curves.png", "02_teacher_per_class.png",
                     "02_split_table.csv"]
    start = time.time()
    _touch_all(figures, names[1:])
    with pytest.raises(CBDError, match=r"^notebook 02 did not write 02_teacher_curves.png in .*figures$"):
        workbook.check_outputs("02", tmp_path, since=start)
    _touch_all(figures, names[:1])
    assert workbook.check_outputs("02", tmp_path, since=start) == names
    assert "notebook 02: all 4 figures and tables written to" in capsys.readouterr().out
    old = start - 3600
    os.utime(figures / "02_split_table.csv", (old, old))  # left by an earlier execution
    with pytest.raises(CBDError, match=r"notebook 02 left older copies of 02_split_table.csv \(written before this "
                                       r"execution\)"):
        workbook.check_outputs("02", tmp_path, since=start)
    with pytest.raises(CBDError, match="unknown notebook '05'"):
        workbook.expected_outputs("05", tmp_path)


def test_the_final_check_uses_the_start_that_setup_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_RESULTS_DIR", str(tmp_path))
    _, run_dir = workbook.setup({"run_name": "r"}, notebook="01")
    _touch_all(run_dir / "figures", workbook.expected_outputs("01", run_dir))
    workbook.check_outputs("01", run_dir)
    workbook.setup({"run_name": "r"}, notebook="01")  # a new execution, whose outputs these are not
    old = time.time() - 3600
    for p in (run_dir / "figures").iterdir():
        os.utime(p, (old, old))
    with pytest.raises(CBDError, match="notebook 01 left older copies of 01_class_histogram.png"):
        workbook.check_outputs("01", run_dir)


def test_notebook_04_expects_the_guarded_figures_when_the_run_can_draw_them(tmp_path):
    metrics = fake_metrics()
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    names = workbook.expected_outputs("04", tmp_path, metrics)
    assert names[:3] == ["04_split_table.csv", "04_split_accuracy.png", "04_per_class_accuracy.png"]
    # cbd_ens and the best baseline (crt): gain and both confusions; teachers trained: t-SNE
    assert names[3:] == ["04_gain_vs_class_size.png", "04_confusion_cbd_ens.png", "04_confusion_crt.png",
                         "04_tsne.png"]
    without_student = workbook.restrict(metrics, ["ce", "crt", "cbd"])
    assert workbook.expected_outputs("04", tmp_path, without_student) == names[:3]
    only_students = workbook.restrict(metrics, ["cbd", "cbd_ens"])
    assert workbook.expected_outputs("04", tmp_path, only_students) == names[:3] + ["04_tsne.png"]
    no_teachers = {**metrics, "methods": {k: v for k, v in metrics["methods"].items() if not k.startswith("teacher")}}
    (tmp_path / "metrics.json").write_text(json.dumps(no_teachers))
    assert "04_tsne.png" not in workbook.expected_outputs("04", tmp_path, no_teachers)
    with pytest.raises(CBDError, match="pass its metrics"):
        workbook.expected_outputs("04", tmp_path)
