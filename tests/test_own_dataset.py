"""A researcher's own dataset: an ImageFolder tree with its natural long-tailed counts, through
the four notebooks, and one-line errors that name the folder for bad trees."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cbdlib.config import make_params
from cbdlib.data import load_long_tail
from cbdlib.data.sources import load_source
from cbdlib.errors import CBDError

ROOT = Path(__file__).resolve().parent.parent
TRAIN_COUNTS = {"ant": 24, "bee": 10, "cat": 4, "dog": 1}   # long-tailed; dog has a single training image
# The end-to-end tree holds at least one smoke batch (64): a batch larger than the training set is refused.
E2E_COUNTS = {"ant": 48, "bee": 20, "cat": 8, "dog": 1}


def write_image(path: Path, label: int, size=(16, 16), seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (size[1], size[0], 3))
    pixels[..., label % 3] += 120 + 40 * (label // 3)   # a colour per class: learnable in two epochs
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def make_tree(root: Path, train_counts=TRAIN_COUNTS, test_per_class=4) -> Path:
    for label, (name, count) in enumerate(train_counts.items()):
        for i in range(count):
            write_image(root / "train" / name / f"{i}.png", label, seed=100 * label + i)
        for i in range(test_per_class):
            write_image(root / "test" / name / f"{i}.png", label, seed=10_000 + 100 * label + i)
    return root


def test_the_shipped_params_file_reads_and_keeps_the_natural_counts():
    values = yaml.safe_load((ROOT / "notebooks/params/my_dataset.yaml").read_text())
    params = make_params({**values, "data": "somewhere"})
    assert params.dataset == "folder" and params.imbalance_ratio is None


def test_imbalance_ratio_null_keeps_the_tree_s_counts_and_a_number_resubsamples(tmp_path):
    tree = make_tree(tmp_path / "tree")
    natural = load_long_tail("folder", str(tree), imbalance_ratio=None, val_per_class=1)
    assert natural.class_counts == list(TRAIN_COUNTS.values())
    assert natural.class_names == list(TRAIN_COUNTS)
    resampled = load_long_tail("folder", str(tree), imbalance_ratio=1, val_per_class=1)
    assert resampled.class_counts == natural.class_counts  # 1 also keeps every image, as before


@pytest.mark.slow
def test_own_tree_runs_the_four_notebooks_end_to_end(tmp_path):
    tree = make_tree(tmp_path / "tree", train_counts=E2E_COUNTS)
    results = tmp_path / "results"
    env = {**os.environ, "CBD_SMOKE": "1", "MPLBACKEND": "Agg", "CBD_RESULTS_DIR": str(results)}
    done = subprocess.run([sys.executable, "-m", "cbdlib", "run", "--no-progress", "--params",
                           str(ROOT / "notebooks/params/my_dataset.yaml"), "-p", f"data={tree}",
                           "-p", "image_size=null", "-p", "seeds=[1]"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    run = results / "my_dataset"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_counts"] == list(E2E_COUNTS.values()) and metrics["imbalance_ratio"] is None
    assert {"cbd_ens", "ce", "crt"} <= set(metrics["methods"]) and "probes" in metrics and "ece" in metrics
    for notebook in ("01_long_tail_statistics", "02_teacher_training", "03_class_balanced_distillation",
                     "04_per_split_analysis"):
        assert (run / f"{notebook}.ipynb").exists()
    executed = (run / "01_long_tail_statistics.ipynb").read_text()
    assert "natural class counts" in executed and "48 20 8 1" in executed
    summary = (run / "summary.md").read_text()
    assert "imbalance ratio natural" in summary and "## Reading" in summary


def _one_line_error(tree: Path, match: str, where: Path, **kw):
    with pytest.raises(CBDError, match=match) as err:
        load_source("folder", tree, **kw)
    message = str(err.value)
    assert "\n" not in message and str(where) in message, message


def test_a_tree_without_class_folders_is_named(tmp_path):
    tree = tmp_path / "tree"
    (tree / "train").mkdir(parents=True)
    (tree / "test").mkdir()
    _one_line_error(tree, "has no class folders", tree / "train")


def test_an_empty_class_is_named(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tree / "train" / "eel").mkdir()
    _one_line_error(tree, "has no images", tree / "train" / "eel")


def test_a_class_only_in_test_is_named(tmp_path):
    tree = make_tree(tmp_path / "tree")
    write_image(tree / "test" / "fox" / "0.png", 5)
    _one_line_error(tree, "missing from train", tree / "test" / "fox")


def test_an_unreadable_image_is_named(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tree / "train" / "bee" / "broken.png").write_bytes(b"not a png")
    _one_line_error(tree, "cannot read image", tree / "train" / "bee" / "broken.png")
    _one_line_error(tree, "cannot read image", tree / "train" / "bee" / "broken.png", image_size=None)


def test_mixed_image_sizes_are_refused_when_image_size_is_null_and_resized_otherwise(tmp_path):
    tree = make_tree(tmp_path / "tree")
    write_image(tree / "train" / "cat" / "big.png", 2, size=(24, 24))
    _one_line_error(tree, "different or non-square sizes", tree, image_size=None)
    pool, _ = load_source("folder", tree, image_size=16)
    assert pool.images.shape[1:] == (16, 16, 3)


def test_image_size_null_keeps_the_images_own_size(tmp_path):
    pool, test = load_source("folder", make_tree(tmp_path / "tree"), image_size=None)
    assert pool.images.shape[1:] == (16, 16, 3) and test.images.shape[1:] == (16, 16, 3)
