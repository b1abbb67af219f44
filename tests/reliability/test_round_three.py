"""Reliability, round three (docs/reliability.md, "Round three"): no code runs from a parameter,
nothing is written through a link or outside its folder, different data is never merged, and
nonsense is refused with one line before any work. Each test fails on the code before its fix.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from reliability_helpers import TINY, error_line, image_tree, write_params
from test_pipeline import (
    make_run,
    notebooks,  # noqa: F401  (fixture: two tiny notebooks, 02 declares `anything = None`)
)

from cbdlib import __main__ as cli
from cbdlib import config, notebook_params, pipeline, plots, runs, workbook
from cbdlib import train as train_cli
from cbdlib.data import load_long_tail
from cbdlib.engine import Experiment
from cbdlib.errors import CBDError

SMOKE_PARAMS = config.params_dir() / "smoke.yaml"


@pytest.fixture(autouse=True)
def private_results(tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setattr(logging.getLogger("cbdlib"), "propagate", True)


def run_main(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    status = cli.main(argv)
    return status, capsys.readouterr().err


# =========================================================================== security


def hostile_bytes(target: Path) -> bytes:
    """Bytes that papermill's injected cell would quote unescaped: ``"b'"; <code>; "'"`` runs <code>."""
    return f'"; __import__("pathlib").Path("{target}").touch(); "'.encode()


def test_the_hostile_value_would_run_code_if_papermill_saw_it(tmp_path):
    """Proves the value used below is hostile: papermill's translation of it, executed, creates the target."""
    from papermill.translators import PythonTranslator

    target = tmp_path / "pwned"
    exec(PythonTranslator.codify({"anything": hostile_bytes(target)}), {})  # noqa: S102
    assert target.exists()


@pytest.mark.parametrize("route", ["parameters file", "-p"])
def test_a_binary_yaml_value_is_refused_and_runs_nothing(tmp_path, notebooks, capsys, monkeypatch,  # noqa: F811
                                                          route):
    target = tmp_path / "pwned"
    encoded = base64.b64encode(hostile_bytes(target)).decode()
    params = tmp_path / "shared.yaml"
    argv = ["run", "--params", str(params)]
    if route == "-p":
        params.write_text("run_name: fixture\n")
        argv += ["-p", f"anything=!!binary {encoded}"]
    else:
        params.write_text(f"run_name: fixture\nanything: !!binary {encoded}\n")
    original = pipeline.run_pipeline
    monkeypatch.setattr(pipeline, "run_pipeline",  # the command, on the two tiny notebooks
                        lambda *args, **kwargs: original(*args, **{**kwargs, "notebooks_dir": notebooks}))
    status, err = run_main(argv, capsys)
    assert not target.exists(), "the value ran code in the kernel"
    assert status == 2
    assert "!!binary" in error_line(err) and "parameters are plain" in error_line(err)
    assert not (tmp_path / "results").exists()  # refused before any notebook or run folder


def test_a_non_plain_value_never_reaches_papermill_whatever_the_default(tmp_path, notebooks):  # noqa: F811
    """Through the Python API (no YAML on the way): a notebook-only key whose default is None."""
    target = tmp_path / "pwned"
    params = tmp_path / "p.yaml"
    params.write_text("run_name: fixture\n")
    with pytest.raises(CBDError, match=r"-p anything: a value of type bytes is not a plain literal"):
        pipeline.run_pipeline(params, {"anything": hostile_bytes(target)}, progress=False, notebooks_dir=notebooks)
    with pytest.raises(CBDError, match=r"label.*type bytes is not a plain literal"):
        notebook_params.notebook_parameters(notebook_params.discover_notebooks(notebooks)[1], config.Params(),
                                          {"label": [hostile_bytes(target)]})
    assert not target.exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("text, problem", [
    ("seeds: !!set {1: null}\n", "!!set"),
    ("data: 2024-01-01\n", "!!timestamp"),
    ("teachers: !!omap [{a: 1}]\n", "!!omap"),
])
def test_other_non_plain_yaml_types_are_refused(tmp_path, text, problem):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(CBDError, match=rf"^parameter file {path} holds a value tagged {problem} at line 1"):
        config.load_params_file(path)


# =========================================================================== no hang


def alias_bomb(levels: int = 9, width: int = 10) -> str:
    """A few hundred bytes of YAML that expand to width**levels items."""
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmethods: *l{levels - 1}\n"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert len(path.read_bytes()) < 600
    t0 = time.perf_counter()
    with pytest.raises(CBDError, match=r"uses a YAML alias \(\*l0\) at line 2; write the value out in full"):
        config.load_params_file(path)
    status, err = run_main(["run", "--params", str(path)], capsys)
    assert status == 2 and "uses a YAML alias" in error_line(err)
    status, err = run_main(["run", "-p", "methods=[&a [x, x], *a]"], capsys)
    assert status == 2 and "-p methods=[&a [x, x], *a] uses a YAML alias" in error_line(err)
    assert time.perf_counter() - t0 < 30
    with pytest.raises(CBDError, match="too large or too deeply nested"):  # the same built in Python
        shared = ["x"] * 10
        for _ in range(8):
            shared = [shared] * 10
        notebook_params.checked_values({"methods": shared}, [], {})
    assert yaml.safe_load("a: 1") == {"a": 1}


# =========================================================================== writes never follow links


@pytest.mark.parametrize("name", ["history.jsonl", ".lock", "params.yaml", "figures/02_curves.png"])
def test_a_run_folder_holding_links_is_refused_and_the_target_is_untouched(tmp_path, capsys, name):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "run"
    (out / name).parent.mkdir(parents=True)
    (out / name).symlink_to(victim)
    params = write_params(tmp_path / "p.yaml", {**TINY, "methods": ["ce"], "epochs": 1})
    capsys.readouterr()
    status = train_cli.main(["--params", str(params), "--out", str(out)])
    line = error_line(capsys.readouterr().err)
    assert status == 2 and line == (f"error: {out / name} is a symbolic link; a run folder must hold its own files, "
                                    f"not links to others (remove it)")
    assert victim.read_text() == "keep me\n"
    assert not (out / "checkpoints").exists()


def test_appending_or_locking_through_a_link_is_refused(tmp_path):
    """A link made after the folder was checked: the history append and the lock open refuse it."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.jsonl").symlink_to(victim)
    with pytest.raises(CBDError, match=r"history.jsonl is a symbolic link; a run writes only its own files"):
        runs.append_history(out / "history.jsonl", {"model": "ce", "seed": 1, "stage": "one_stage", "epoch": 1})
    (out / ".lock").symlink_to(victim)
    with pytest.raises(CBDError, match=r"\.lock is a symbolic link"):
        with runs.run_lock(out):
            pass
    assert victim.read_text() == "keep me\n"


# =========================================================================== user strings in paths


@pytest.mark.parametrize("value", ["../../../outside", "cbd_ens/../../x", "checkpoints"])
def test_keep_model_accepts_method_names_only(tmp_path, capsys, value):
    a, b = make_run(tmp_path, "seed1", [1]), make_run(tmp_path, "seed2", [2])
    (tmp_path / "outside.pt").write_bytes(b"someone else's file")
    status, err = run_main(["aggregate", str(a), str(b), "--out", str(tmp_path / "merged"), "--no-notebook",
                            "--keep-model", value], capsys)
    assert status == 2 and error_line(err) == (f"error: --keep-model {value!r} is not a method name (e.g. cbd_ens, "
                                               f"ce, teacher_vanilla_1; none: keep no model)")
    assert not (tmp_path / "merged").exists()
    assert (tmp_path / "outside.pt").read_bytes() == b"someone else's file"


def test_a_tsne_teacher_that_is_no_teacher_name_is_refused(tmp_path):
    with pytest.raises(CBDError, match=r"^parameter 'tsne_method_teacher' must be a teacher's name"):
        workbook.analysis_setup({"run_name": "r", "tsne_method_teacher": "../../features/seed_1/x"})


# =========================================================================== refused before any work


@pytest.mark.parametrize("override, message", [
    ("methods=[teachers]", "error: -p methods=[teachers]: unknown method(s) ['teachers']"),
    ("run_name=index.csv", "error: -p run_name=index.csv: run_name must be a plain folder name"),
    ("run_name=README.md", "error: -p run_name=README.md: run_name must be a plain folder name"),
    ("run_name=.hidden", "error: -p run_name=.hidden: run_name must be a plain folder name"),
    ("run_name=a\0b", 'error: -p run_name="a\\0b": run_name must be a plain folder name'),
])
def test_reserved_names_and_every_method_value_are_refused_before_notebook_01(tmp_path, capsys, override,
                                                                              message):
    status, err = run_main(["run", "--params", str(SMOKE_PARAMS), "-p", override], capsys)
    assert status == 2 and error_line(err).startswith(message), err
    assert not (tmp_path / "results").exists()  # no run folder, no index.csv


def test_aggregate_refuses_an_out_folder_named_like_the_results_folders_own_files(tmp_path, capsys):
    a, b = make_run(tmp_path, "seed1", [1]), make_run(tmp_path, "seed2", [2])
    status, err = run_main(["aggregate", str(a), str(b), "--out", str(tmp_path / "index.csv")], capsys)
    assert status == 2 and "run_name must be a plain folder name" in error_line(err)
    assert not (tmp_path / "index.csv").exists()


# =========================================================================== one line, not a traceback


@pytest.mark.parametrize("option, value, message", [
    ("--lt-seed", "-1", "error: --lt-seed -1: lt_seed must be >= 0, got -1"),
    ("--imbalance-ratio", "nan", "error: --imbalance-ratio nan: imbalance_ratio must be a finite number, got nan"),
    ("--val-per-class", "-3", "error: --val-per-class -3: val_per_class must be >= 1, got -3"),
])
def test_stats_applies_the_parameter_rules(capsys, option, value, message):
    argv = ["stats", "--dataset", "digits", "--imbalance-ratio", "10", option, value]
    status, err = run_main(argv, capsys)
    assert status == 2 and error_line(err) == message


def test_data_naming_a_device_file_is_one_line(capsys):
    status, err = run_main(["stats", "--dataset", "folder", "--data", "/dev/null", "--imbalance-ratio", "2"], capsys)
    assert status == 2 and error_line(err) == ("error: data path /dev/null is a character device, not a file or "
                                               "folder of images")


def test_a_history_record_of_the_wrong_types_is_skipped_and_named(tmp_path, caplog):
    good = {"model": "ce", "seed": 1, "stage": "one_stage", "epoch": 1, "loss": 2.0, "ce": 2.0, "distill": None,
            "lr": 0.1, "steps": 3, "time_s": 0.5}
    bad = {**good, "epoch": 2, "loss": "high", "steps": [3]}
    no_seed = {**good, "epoch": 3, "seed": None}
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (good, bad, no_seed)))
    with caplog.at_level(logging.WARNING, logger="cbdlib"):
        assert runs.read_history(out) == [good]
    assert f"{out / 'history.jsonl'}: skipped 2 unreadable lines (2, 3)" in caplog.text
    frame = workbook.history(out, stages=["one_stage"])  # notebook 02's curves draw what is left
    plots.training_curves(frame, keys=("loss", "lr"))


# =========================================================================== evaluations that mean nothing


def test_a_one_class_dataset_is_refused(tmp_path):
    tree = image_tree(tmp_path / "tree")
    for split in ("train", "test"):
        for name in ("bee", "cat"):
            shutil.rmtree(tree / split / name)
    with pytest.raises(CBDError, match=r"^dataset folder at .*tree has 1 class \('ant'\); a long-tailed evaluation "
                                       r"needs at least two classes$"):
        load_long_tail("folder", str(tree), imbalance_ratio=1, val_per_class=1, image_size=8)


def test_a_class_with_training_images_but_no_test_folder_is_refused(tmp_path):
    tree = image_tree(tmp_path / "tree")
    shutil.rmtree(tree / "test" / "cat")
    with pytest.raises(CBDError, match=r"^class 'cat' has training images but no folder in .*tree/test; every class "
                                       r"needs test images$"):
        load_long_tail("folder", str(tree), imbalance_ratio=2, val_per_class=1, image_size=8)


def test_a_batch_larger_than_the_training_set_is_refused_before_training(tmp_path, capsys):
    tree = image_tree(tmp_path / "tree")
    out = tmp_path / "run"
    params = write_params(tmp_path / "p.yaml", {**TINY, "dataset": "folder", "data": str(tree), "imbalance_ratio": 2,
                                                "val_per_class": 1, "image_size": 8, "methods": ["ce"],
                                                "batch_size": 64})
    capsys.readouterr()
    status = train_cli.main(["--params", str(params), "--out", str(out)])
    line = error_line(capsys.readouterr().err)
    assert status == 2 and re.fullmatch(r"error: batch_size 64 is larger than the training set \(\d+ images in the "
                                        r"long-tailed subset of folder\); use batch_size <= \d+", line), line
    assert not (out / "checkpoints").exists() and not (out / "history.jsonl").exists()


# =========================================================================== no hang


@pytest.fixture
def alarm():
    """Fail instead of hanging: SIGALRM after ``seconds``."""
    def handler(signum, frame):
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, handler)
    yield lambda seconds: signal.alarm(seconds)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_named_pipe_with_an_image_name_is_refused_not_read(tmp_path, alarm):
    tree = image_tree(tmp_path / "tree")
    pipe = tree / "train" / "bee" / "zz_pipe.jpg"
    os.mkfifo(pipe)
    alarm(60)
    with pytest.raises(CBDError, match=rf"^{re.escape(str(pipe))} is a named pipe, not an image file; remove it "
                                       rf"from the tree$"):
        load_long_tail("folder", str(tree), imbalance_ratio=2, val_per_class=1, image_size=8)


# =========================================================================== runs on different data


def folder_run(tmp_path, tree: Path, seed: int) -> Path:
    settings = config.resolve(config.make_params({
        **TINY, "dataset": "folder", "data": str(tree), "imbalance_ratio": 2, "val_per_class": 1, "image_size": 8,
        "batch_size": 8, "epochs": 1, "methods": ["ce"], "seeds": [seed]}))
    out = tmp_path / f"{tree.name}_seed{seed}"
    Experiment(settings, out, quiet=True).run("one_stage")
    return out


@pytest.mark.parametrize("change, message", [
    ("image", "different data: the images or labels differ (data fingerprints differ)"),
    ("rename", "different class names (label 2: 'cat' vs 'cow')"),
])
def test_runs_on_different_image_trees_are_not_merged(tmp_path, capsys, change, message):
    first = folder_run(tmp_path, image_tree(tmp_path / "a"), 1)
    other = image_tree(tmp_path / "b")
    if change == "image":  # same names, same counts, one test image changed
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(other / "test" / "bee" / "000.jpg")
    else:  # the same tree with a class renamed: counts and order unchanged
        for split in ("train", "test"):
            (other / split / "cat").rename(other / split / "cow")
    second = folder_run(tmp_path, other, 2)
    status, err = run_main(["aggregate", str(first), str(second), "--out", str(tmp_path / "merged"),
                            "--no-notebook", "--keep-model", "none"], capsys)
    assert status == 2 and error_line(err) == f"error: cannot merge {first} and {second}: {message}"
    assert not (tmp_path / "merged").exists()


def test_an_aggregate_given_as_an_input_has_its_parameters_checked(tmp_path, capsys):
    a, b = make_run(tmp_path, "seed1", [1]), make_run(tmp_path, "seed2", [2])
    merged = tmp_path / "merged"
    status, _ = run_main(["aggregate", str(a), str(b), "--out", str(merged), "--no-notebook"], capsys)
    assert status == 0
    other = make_run(tmp_path, "seed3", [3], epochs=100)  # another experiment
    status, err = run_main(["aggregate", str(merged), str(other), "--out", str(tmp_path / "again"),
                            "--no-notebook"], capsys)
    assert status == 2 and error_line(err) == (f"error: cannot merge {merged} and {other}: different parameters "
                                               f"(epochs: 200 vs 100)")
    same = make_run(tmp_path, "seed4", [4])
    status, _ = run_main(["aggregate", str(merged), str(same), "--out", str(tmp_path / "again"), "--no-notebook"],
                         capsys)
    assert status == 0


# =========================================================================== wall time after a SIGTERM


def test_a_resumed_notebook_is_not_charged_for_what_the_rerun_rewrote(tmp_path):
    """A run stopped in notebook 02, rerun: 01 runs again (rewriting its files) before 02's entry is
    reached. The killed invocation's 02 counts up to its own last write, not to 01's rewrite."""
    run = tmp_path / "run"
    run.mkdir()
    ledger = run / runs.NOTEBOOK_TIMES
    t0 = time.time() - 1000
    ledger.write_text(json.dumps({
        "total": {"s": 0.0, "invocations": 0, "resumed": False, "open": t0},
        "01_a.ipynb": {"s": 1.0, "invocations": 1, "resumed": False, "open": None},
        "02_b.ipynb": {"s": 0.0, "invocations": 0, "resumed": False, "open": t0 + 1}}))
    for name in ("01_a.ipynb", "history.jsonl"):
        (run / name).write_text("x")
        os.utime(run / name, (t0 + 5, t0 + 5))  # the killed invocation's last write: 5 s in
    with runs.run_lock(run), runs.timed(ledger, "total"):  # the rerun, as cbdlib run does it
        with runs.timed(ledger, "01_a.ipynb"):
            (run / "01_a.ipynb").write_text("rewritten")
        with runs.timed(ledger, "02_b.ipynb"):
            pass
    times = runs.wall_times(ledger)
    assert 4.0 <= times["02_b.ipynb"]["s"] < 60 and times["02_b.ipynb"]["resumed"]
    assert 5.0 <= times["total"]["s"] < 60
    assert times["01_a.ipynb"]["s"] + times["02_b.ipynb"]["s"] <= times["total"]["s"] + 1.0


def test_validation_images_that_are_also_training_images_are_a_warning_in_the_summary(tmp_path, caplog):
    # As on CIFAR-10-LT: equal pools, and the largest class of the subset takes its whole pool.
    from cbdlib.data.longtail import split_pool
    from cbdlib.pipeline.summary import summary_markdown

    labels = np.repeat(np.arange(3), [30, 30, 30])
    with caplog.at_level(logging.WARNING):
        _, _, notes = split_pool(labels, 3, imbalance_ratio=3, profile="exp", lt_seed=0, val_per_class=10,
                                 reserve_first=False)
    # counts 30, 17, 10: class 0 keeps all 30 of its images, so its 10 validation images are training ones
    assert notes["val_overlap_images"] == 10 and notes["val_overlap_classes"] == [0]
    assert "warning: 10 validation images of class(es) [0] are also training images" in caplog.text
    tree = image_tree(tmp_path / "tree", per_class=12)  # 3 classes of 12: class 0 keeps all 12 at IR 2
    settings = config.resolve(config.make_params({**TINY, "run_name": "overlap", "dataset": "folder", "data": str(tree),
                                                  "imbalance_ratio": 2, "val_per_class": 2, "image_size": 8,
                                                  "batch_size": 8, "methods": ["ce"]}))
    metrics = Experiment(settings, tmp_path / "overlap", quiet=True).run("one_stage")
    assert metrics["val_overlap"] == {"images": 2, "classes": [0], "val_per_class": 2}
    text = summary_markdown(tmp_path / "overlap", metrics)
    assert "**warning: 2 validation images of class(es) [0] are also training images" in text
