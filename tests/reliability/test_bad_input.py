"""Reliability: bad input (docs/reliability.md, "Bad input").

Corrupt images, split-file labels, images of other modes, teachers and weights that do not fit,
parameters of the wrong type, and run folders that cannot be created or written: each refused
in one line before any result (or converted, for image modes).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_helpers import (
    TINY,
    assert_one_line_error,
    image_tree,
    run_cli,
    temp_files,
    tiny_settings,
    write_params,
)
from shared_runs import copy_run, run_settings

from cbdlib import CBDError
from cbdlib import checkpoint as ckpt
from cbdlib.checkpoint import load_model
from cbdlib.config import make_params, resolve
from cbdlib.data import load_long_tail
from cbdlib.engine import Experiment
from cbdlib.runs import checkpoint_path

FOLDER_RUN = dict(TINY, dataset="folder", imbalance_ratio=2, val_per_class=1, image_size=8, methods=["ce"],
                  batch_size=8)  # the tree trains on about 24 images


def test_a_corrupt_jpeg_stops_the_command_before_any_result(tmp_path):
    tree = image_tree(tmp_path / "bad")
    broken = tree / "train" / "bee" / "broken.jpg"
    broken.write_bytes(os.urandom(300))
    params = write_params(tmp_path / "p.yaml", {**FOLDER_RUN, "data": str(tree)})
    out = tmp_path / "run"
    proc = run_cli(tmp_path, "-m", "cbdlib.train", "--params", str(params), "--out", str(out))
    assert_one_line_error(proc, f"cannot read image {broken}")
    assert not (out / "checkpoints").exists() and not (out / "metrics.json").exists()
    assert temp_files(tmp_path) == []


def test_after_a_failed_start_the_corrected_run_is_accepted(tmp_path):
    bad = image_tree(tmp_path / "bad")
    (bad / "train" / "bee" / "broken.jpg").write_bytes(os.urandom(300))
    good = image_tree(tmp_path / "good")
    out = tmp_path / "run"
    with pytest.raises(CBDError, match="cannot read image"):
        Experiment(resolve(make_params({**FOLDER_RUN, "data": str(bad)})), out, quiet=True)
    Experiment(resolve(make_params({**FOLDER_RUN, "data": str(good)})), out, quiet=True)


def test_a_label_far_out_of_range_in_a_train_split_file_is_named_briefly(tmp_path):
    root = tmp_path / "lt"
    lines = []
    for label in (0, 1):
        for i in range(6):
            rel = f"img/{label}_{i}.png"
            (root / "img").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (label * 90, i * 20, 0)).save(root / rel)
            lines.append(f"{rel} {label}")
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    lines[3] = lines[3].rsplit(" ", 1)[0] + " 9999"  # a typo: one label far beyond the others
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(CBDError, match=r"train\.txt.*line 4") as err:
        load_long_tail("splitfile", str(root), imbalance_ratio=1, val_per_class=1, image_size=8)
    message = str(err.value)
    assert "\n" not in message and len(message) < 300, message[:400]
    assert "train.txt" in message and "line 4" in message


def test_split_file_and_cifar_images_of_other_modes_are_converted(tmp_path):
    """Grayscale, RGBA and odd sizes in a split file become RGB at image_size; a 32x32 grayscale
    CIFAR image becomes RGB (CIFAR refuses only other sizes: tests/test_sources.py)."""
    from cbdlib.data.sources import load_source

    root = tmp_path / "lt"
    (root / "img").mkdir(parents=True)
    Image.new("L", (8, 8), 77).save(root / "img" / "gray.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(root / "img" / "rgba.png")
    Image.new("RGB", (13, 5), (190, 20, 20)).save(root / "img" / "odd.png")
    Image.new("P", (8, 8), 3).save(root / "img" / "palette.png")
    (root / "train.txt").write_text("img/gray.png 0\nimg/rgba.png 1\nimg/odd.png 1\n")
    (root / "test.txt").write_text("img/palette.png 0\nimg/odd.png 1\n")  # the test split names both classes
    train, test = load_source("splitfile", root, image_size=6)
    assert train.images.shape == (3, 6, 6, 3) and test.images.shape == (2, 6, 6, 3)
    assert np.all(train.images[0] == 77) and np.all(train.images[1] == [10, 20, 30])
    assert np.all(train.images[2] == [190, 20, 20])

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for split in ("train", "test"):
        for i, name in enumerate(names):
            (tmp_path / "c" / split / name).mkdir(parents=True)
            Image.new("L" if name == "cat" else "RGB", (32, 32), 100 if name == "cat" else (i, i, i)).save(
                tmp_path / "c" / split / name / "0.png")
    train, _ = load_source("cifar10", tmp_path / "c")
    assert train.images.shape == (10, 32, 32, 3) and np.all(train.images[names.index("cat")] == 100)


def test_a_teacher_with_another_class_count_is_refused(tmp_path, teacher_run, digits):
    out = copy_run(teacher_run, tmp_path)
    path = checkpoint_path(out, 1, "teacher_vanilla_1")
    state = ckpt.load_checkpoint(path)
    ckpt.save_checkpoint(path, spec=state["spec"], meta={**state["meta"], "num_classes": 12}, model=state["model"])
    exp = Experiment(run_settings(methods=["cbd"]), out, data=digits, quiet=True)
    with pytest.raises(CBDError, match=r"^checkpoint teacher_vanilla_1.pt was trained with num_classes=12, "
                                       r"but this run has num_classes=10$"):
        exp.run("students")


def test_weights_of_another_shape_are_one_clear_error(tmp_path, digits):
    settings = tiny_settings(epochs=1, methods=["ce"])
    Experiment(settings, tmp_path, data=digits, quiet=True).run("one_stage")
    path = checkpoint_path(tmp_path, 1, "ce")
    state = ckpt.load_checkpoint(path)
    weights = dict(state["model"])
    key = next(k for k in weights if k.startswith("classifier") and k.endswith("weight"))
    weights[key] = torch.zeros(12, weights[key].shape[1])  # a 12-class head under a 10-class spec
    ckpt.save_checkpoint(path, spec=state["spec"], meta=state["meta"], model=weights)
    with pytest.raises(CBDError, match=rf"does not match the model: size mismatch for {key}") as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_a_parameter_of_the_wrong_type_is_one_line(tmp_path):
    params = write_params(tmp_path / "p.yaml", TINY)
    proc = run_cli(tmp_path, "-m", "cbdlib.train", "--params", str(params), "--out", str(tmp_path / "run"),
                   "-p", "epochs=ten")
    assert_one_line_error(proc, "parameter 'epochs' must be an integer, got 'ten' (str)")
    assert not (tmp_path / "run").exists()


def test_an_exponent_without_a_dot_is_a_float():
    from cbdlib.config import make_params, parse_override

    assert make_params(dict([parse_override("lr=1e-3")])).lr == 1e-3


def test_an_output_folder_under_a_file_is_one_line(tmp_path):
    """Tests run as root, where chmod does not stop writes: a path under a regular file cannot be created."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    params = write_params(tmp_path / "p.yaml", TINY)
    proc = run_cli(tmp_path, "-m", "cbdlib.train", "--params", str(params), "--out", str(blocker / "run"))
    assert_one_line_error(proc, f"cannot create the run folder {blocker / 'run'}: Not a directory")
    assert blocker.read_text() == "not a folder"


def test_a_folder_without_write_permission_is_refused(tmp_path, digits, monkeypatch):
    """os.access is patched to say 'not writable' (root ignores chmod)."""
    real_access = os.access
    out = tmp_path / "run"
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == out and mode & os.W_OK
                        else real_access(p, mode, *a, **k))
    with pytest.raises(CBDError, match=rf"^the run folder {out} is not writable$"):
        Experiment(tiny_settings(methods=["ce"]), out, data=digits, quiet=True)
    assert list(out.iterdir()) == []
