"""Long-tailed counts, subset drawing, validation reserve, statistics and the stats command."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cbdlib import CBDError
from cbdlib.data import class_splits, describe, gini, load_long_tail, long_tail_counts
from cbdlib.data.longtail import split_pool


def test_cifar10_ir100_counts_match_the_published_profile():
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_cifar100_ir100_has_10847_images():
    assert sum(long_tail_counts(500, 100, 100)) == 10847


def test_step_profile_halves():
    assert long_tail_counts(500, 10, 10, "step") == [500] * 5 + [50] * 5


@pytest.mark.parametrize("ratio", [0.5, 0, -3])
def test_imbalance_ratio_below_one_is_refused(ratio):
    with pytest.raises(CBDError, match="imbalance ratio must be >= 1"):
        long_tail_counts(100, 10, ratio)


def test_unknown_profile_is_refused():
    with pytest.raises(CBDError, match="profile"):
        long_tail_counts(100, 10, 10, "linear")


def _pool(per_class=50, classes=5):
    return np.repeat(np.arange(classes), per_class)


def test_subset_is_drawn_per_class_with_lt_seed():
    labels = _pool()
    a, va, _ = split_pool(labels, 5, 10, "exp", lt_seed=3, val_per_class=5, reserve_first=False)
    b, vb, _ = split_pool(labels, 5, 10, "exp", lt_seed=3, val_per_class=5, reserve_first=False)
    c, _, _ = split_pool(labels, 5, 10, "exp", lt_seed=4, val_per_class=5, reserve_first=False)
    assert np.array_equal(a, b) and np.array_equal(va, vb)
    assert not np.array_equal(a, c)
    assert np.bincount(labels[a], minlength=5).tolist() == long_tail_counts(50, 5, 10)


def test_validation_is_balanced_and_disjoint_when_reserved_first():
    labels = _pool(40, 4)
    train, val, notes = split_pool(labels, 4, 5, "exp", lt_seed=0, val_per_class=6, reserve_first=True)
    assert np.bincount(labels[val]).tolist() == [6, 6, 6, 6]
    assert not set(train) & set(val)
    # n_max is what is left after the reserve
    assert np.bincount(labels[train]).tolist() == long_tail_counts(34, 4, 5)
    assert notes["val_overlap_images"] == 0


def test_validation_uses_images_the_subset_leaves_unused():
    labels = _pool(40, 4)
    train, val, notes = split_pool(labels, 4, 4, "exp", lt_seed=0, val_per_class=5, reserve_first=False)
    assert np.bincount(labels[val]).tolist() == [5, 5, 5, 5]
    # only the head class uses its whole pool, so only its validation images overlap
    assert len(set(train) & set(val)) == notes["val_overlap_images"] == 5


def test_a_ratio_that_empties_a_class_is_refused():
    with pytest.raises(CBDError, match="no images"):
        split_pool(_pool(10, 5), 5, 1000, "exp", lt_seed=0, val_per_class=0, reserve_first=False)


def test_imbalance_ratio_one_keeps_the_pool():
    labels = np.array([0] * 30 + [1] * 12 + [2] * 7)
    train, _, _ = split_pool(labels, 3, 1, "exp", lt_seed=0, val_per_class=2, reserve_first=True)
    assert np.bincount(labels[train]).tolist() == [28, 10, 5]


def test_gini_of_balanced_and_concentrated_counts():
    assert gini([10, 10, 10, 10]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 100]) == pytest.approx(0.75)
    # Matches the mean-absolute-difference definition
    x = np.array([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50], float)
    mad = np.abs(x[:, None] - x[None, :]).mean()
    assert gini(x) == pytest.approx(mad / (2 * x.mean()))


def test_splits_use_explicit_thresholds_and_thirds():
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    s = class_splits(counts)
    assert s["many"] == list(range(8)) and s["medium"] == [8, 9] and s["few"] == []
    assert (s["head"], s["mid"], s["tail"]) == ([0, 1, 2, 3], [4, 5, 6], [7, 8, 9])
    s = class_splits([150, 101, 100, 20, 19, 3])
    assert s["many"] == [0, 1] and s["medium"] == [2, 3] and s["few"] == [4, 5]


def test_thirds_follow_counts_not_labels():
    s = class_splits([5, 500, 50])
    assert s["head"] == [1] and s["mid"] == [2] and s["tail"] == [0]


def test_digits_long_tail_keeps_a_balanced_test_set(digits):
    data = digits
    counts = data.class_counts
    assert counts[0] == max(counts) and counts[0] / counts[-1] == pytest.approx(10, rel=0.15)
    test_counts = np.bincount(data.test_labels)
    assert test_counts.max() - test_counts.min() <= 4  # stratified 30% of a near-balanced source (174-183 per class)
    assert np.bincount(data.val_labels).tolist() == [10] * 10
    assert data.train_images.dtype == np.uint8 and data.train_images.shape[1:] == (8, 8, 3)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cbdlib", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_stats_json_prints_one_object_on_stdout():
    out = _cli("stats", "--dataset", "digits", "--imbalance-ratio", "10", "--json")
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats == {**stats, **describe(stats["class_counts"])}
    assert set(stats["splits"]) == {"many", "medium", "few", "head", "mid", "tail"}


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet9", "--imbalance-ratio", "10"], "unknown dataset"),
    (["--dataset", "digits", "--imbalance-ratio", "0.5"], "imbalance_ratio must be >= 1"),
    (["--dataset", "cifar10", "--data", "/nonexistent/cifar", "--imbalance-ratio", "10"], "/nonexistent/cifar"),
    (["--dataset", "digits", "--imbalance-ratio", "100000"], "no images"),
])
def test_stats_bad_input_is_one_clear_line(args, message):
    out = _cli("stats", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.integration
@pytest.mark.slow
def test_cifar10_lt_ir100_from_the_offline_copy(cifar10_cache, monkeypatch):
    monkeypatch.setenv("CBD_CACHE_DIR", str(cifar10_cache))  # decoded once per session (see conftest.py)
    data = load_long_tail("cifar10", None, imbalance_ratio=100, lt_seed=0, val_per_class=10)
    assert data.class_counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(data.train_labels) == 12406
    assert np.bincount(data.test_labels).tolist() == [1000] * 10
    assert data.test_images.shape == (10000, 32, 32, 3)
    out = _cli("stats", "--dataset", "cifar10", "--imbalance-ratio", "100", "--json")
    assert json.loads(out.stdout)["class_counts"] == data.class_counts
