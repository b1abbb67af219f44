"""Tests for cbdlib.data.samplers: the class distributions of each strategy, determinism,
empty classes, input errors and the DataLoader wrapper.

Statistical checks use fixed seeds (so they are deterministic) and a 4-sigma binomial
bound per class, so a correct implementation passes for essentially any seed.
"""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cbdlib.data.samplers import STRATEGIES, IndexSampler, StrategySampler
from cbdlib.errors import CBDError

COUNTS = [1000, 300, 100, 30, 10]


def long_tailed_labels(counts=COUNTS, seed=0):
    """Labels with the given per-class counts, shuffled so class order != index order."""
    labels = np.concatenate([np.full(c, j, dtype=np.int64) for j, c in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


def class_frequencies(sampler, labels, epochs):
    """Draw counts per class over the given epochs, and the total number of draws."""
    labels_t = torch.as_tensor(labels)
    hist = torch.zeros(sampler.num_classes, dtype=torch.int64)
    total = 0
    for e in epochs:
        idx = sampler.epoch_indices(e).cpu()  # the sampler may draw on CUDA; the labels here are on the CPU
        hist += torch.bincount(labels_t[idx], minlength=sampler.num_classes)
        total += idx.numel()
    return hist.to(torch.float64), total


def assert_binomial_close(hist, total, p, sigmas=4.0):
    """Every class count within `sigmas` binomial standard deviations of total * p_j."""
    p = torch.as_tensor(p, dtype=torch.float64)
    expected = total * p
    sd = torch.sqrt(total * p * (1 - p))
    dev = (hist - expected).abs()
    # p_j == 0 gives sd 0: the count must then be exactly 0
    assert torch.all(dev <= sigmas * sd + 1e-9), (hist.tolist(), expected.tolist())


# ---------------------------------------------------------------- instance

def test_instance_is_a_permutation_each_epoch():
    labels = long_tailed_labels()
    s = IndexSampler(labels, "instance", generator_seed=3)
    n = len(labels)
    assert len(s) == n
    orders = []
    for e in range(3):
        idx = s.epoch_indices(e)
        assert idx.dtype == torch.int64 and idx.device.type == "cpu"
        assert torch.equal(torch.sort(idx).values, torch.arange(n))
        orders.append(idx)
    assert not torch.equal(orders[0], orders[1])
    assert not torch.equal(orders[1], orders[2])


def test_determinism_and_resume_independence():
    labels = long_tailed_labels()
    for strategy in STRATEGIES:
        a = IndexSampler(labels, strategy, generator_seed=7)
        for e in range(4):  # draw some epochs first: must not affect later epochs
            a.epoch_indices(e)
        b = IndexSampler(labels, strategy, generator_seed=7)
        assert torch.equal(a.epoch_indices(4), b.epoch_indices(4)), strategy
        assert torch.equal(a.epoch_indices(2), a.epoch_indices(2)), strategy
        c = IndexSampler(labels, strategy, generator_seed=8)
        assert not torch.equal(a.epoch_indices(4), c.epoch_indices(4)), strategy


def test_seed_epoch_pairs_do_not_collide():
    labels = long_tailed_labels()
    a = IndexSampler(labels, "instance", generator_seed=0).epoch_indices(1)
    b = IndexSampler(labels, "instance", generator_seed=1).epoch_indices(0)
    assert not torch.equal(a, b)


def test_numpy_and_torch_labels_agree():
    labels = long_tailed_labels()
    for strategy in STRATEGIES:
        a = IndexSampler(labels, strategy, generator_seed=1).epoch_indices(2)
        b = IndexSampler(torch.from_numpy(labels), strategy, generator_seed=1).epoch_indices(2)
        assert torch.equal(a, b)


# ---------------------------------------------------------------- class-balanced

def test_class_balanced_frequencies_are_uniform():
    labels = long_tailed_labels()
    s = IndexSampler(labels, "class_balanced", generator_seed=0)
    assert torch.allclose(s.class_probabilities(), torch.full((5,), 0.2, dtype=torch.float64))
    hist, total = class_frequencies(s, labels, range(5))
    assert total == 5 * len(labels)
    assert_binomial_close(hist, total, [0.2] * 5)


def test_class_balanced_uniform_within_class():
    labels = long_tailed_labels()
    s = IndexSampler(labels, "class_balanced", generator_seed=0)
    idx = torch.cat([s.epoch_indices(e) for e in range(5)])
    assert idx.min() >= 0 and idx.max() < len(labels)
    labels_t = torch.as_tensor(labels)
    drawn_labels = labels_t[idx]

    # The 10-image class: ~1440 draws; every image appears, each about 144 times.
    tail_images = torch.nonzero(labels_t == 4).flatten()
    tail_draws = idx[drawn_labels == 4]
    per_image = torch.stack([(tail_draws == i).sum() for i in tail_images]).to(torch.float64)
    assert torch.all(per_image > 0)
    m = tail_draws.numel()
    assert_binomial_close(per_image, m, torch.full((10,), 0.1))

    # The 1000-image class: ~1.44 draws per image, so the covered fraction should be
    # close to 1 - exp(-1.44) (Poisson approximation), not concentrated on a few images.
    head_draws = idx[drawn_labels == 0]
    lam = head_draws.numel() / 1000
    covered = torch.unique(head_draws).numel() / 1000
    assert abs(covered - (1 - math.exp(-lam))) < 0.06


# ---------------------------------------------------------------- class probabilities

def test_instance_probabilities_are_counts():
    labels = long_tailed_labels()
    s = IndexSampler(labels, "instance")
    n = np.asarray(COUNTS, dtype=np.float64)
    assert np.allclose(s.class_probabilities().numpy(), n / n.sum())


def test_class_aware_probabilities_are_uniform_over_non_empty_classes():
    p = IndexSampler(long_tailed_labels([50, 0, 8]), "class_aware").class_probabilities()
    assert torch.allclose(p, torch.tensor([0.5, 0, 0.5], dtype=torch.float64))


# ---------------------------------------------------------------- edge cases and errors

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_classes_get_no_draws(strategy):
    # class 2 missing in the middle, class 5 missing at the end (num_classes=6)
    labels = long_tailed_labels([50, 20, 0, 8, 3])
    s = IndexSampler(labels, strategy, num_classes=6, generator_seed=5)
    p = s.class_probabilities()
    assert p.shape == (6,) and p[2] == 0 and p[5] == 0
    assert math.isclose(float(p.sum()), 1.0)
    hist, _ = class_frequencies(s, labels, range(4))
    assert hist[2] == 0 and hist[5] == 0
    assert hist[[0, 1, 3, 4]].min() > 0


def test_class_balanced_ignores_empty_classes_in_uniform():
    labels = long_tailed_labels([50, 20, 0, 8])
    p = IndexSampler(labels, "class_balanced").class_probabilities()
    assert torch.allclose(p, torch.tensor([1 / 3, 1 / 3, 0, 1 / 3], dtype=torch.float64))


def test_single_class_and_single_image():
    s = IndexSampler(np.zeros(1, dtype=np.int64), "class_balanced")
    assert s.epoch_indices(0).tolist() == [0]
    s = IndexSampler([0, 0, 0], "class_aware")
    assert set(s.epoch_indices(1).tolist()) <= {0, 1, 2}


def test_unknown_strategy_raises():
    with pytest.raises(CBDError, match=r"unknown sampling strategy 'balanced-ish'; expected one of instance"):
        IndexSampler(long_tailed_labels(), "balanced-ish")
    with pytest.raises(CBDError, match=r"unknown sampling strategy 'sqrt'; expected one of instance"):
        StrategySampler(long_tailed_labels(), "sqrt")


def test_strategy_name_normalisation():
    assert IndexSampler([0, 1], "Class-Balanced").strategy == "class_balanced"


@pytest.mark.parametrize("bad, message", [
    (np.array([], dtype=np.int64), r"labels are empty: cannot sample from an empty training set"),
    (np.array([0.0, 1.0]), r"labels must have an integer dtype, got torch.float64"),
    (np.array([[0, 1], [1, 0]]), r"labels must be 1-D, got shape \(2, 2\)"),
    (np.array([0, -1, 2]), r"labels must be non-negative, found -1"),
    (np.array([True, False]), r"labels must have an integer dtype, got torch.bool"),
])
def test_bad_labels_raise(bad, message):
    with pytest.raises(CBDError, match=message):
        IndexSampler(bad, "instance")


def test_bad_arguments_raise():
    labels = long_tailed_labels()
    with pytest.raises(CBDError, match=r"num_classes=3 but labels go up to 4"):
        IndexSampler(labels, num_classes=3)  # labels go up to 4
    s = IndexSampler(labels, "class_balanced")
    with pytest.raises(CBDError, match=r"epoch must be a non-negative integer, got -1"):
        s.epoch_indices(-1)
    with pytest.raises(CBDError, match=r"epoch must be a non-negative integer, got -2"):
        StrategySampler(labels, "class_balanced").set_epoch(-2)


# ---------------------------------------------------------------- DataLoader wrapper

def test_strategy_sampler_with_dataloader():
    labels = long_tailed_labels([40, 15, 5])
    n = len(labels)
    ds = TensorDataset(torch.arange(n), torch.as_tensor(labels))
    sampler = StrategySampler(labels, "instance", generator_seed=1)
    assert isinstance(sampler, torch.utils.data.Sampler)
    assert len(sampler) == n
    loader = DataLoader(ds, batch_size=16, sampler=sampler)

    def one_epoch():
        return torch.cat([x for x, _ in loader])

    sampler.set_epoch(0)
    first = one_epoch()
    assert torch.equal(torch.sort(first).values, torch.arange(n))
    assert torch.equal(first, one_epoch())  # same epoch, same order
    assert torch.equal(first, sampler.index_sampler.epoch_indices(0))
    sampler.set_epoch(1)
    second = one_epoch()
    assert not torch.equal(first, second)
    assert all(isinstance(i, int) for i in sampler)


def test_balanced_loader_draws_the_index_form():
    labels = long_tailed_labels([200, 20, 4])
    ds = TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    idx_sampler = IndexSampler(labels, "class_balanced", generator_seed=2)
    sampler = StrategySampler(labels, "class_balanced", generator_seed=2)
    loader = DataLoader(ds, batch_size=32, sampler=sampler)
    ys = []
    for e in range(4):
        sampler.set_epoch(e)
        for x, y in loader:
            # labels returned by the loader are those of the sampled images
            assert torch.equal(y, torch.as_tensor(labels)[x])
            ys.append(y)
    y = torch.cat(ys)
    hist = torch.bincount(y, minlength=3).to(torch.float64)
    assert_binomial_close(hist, y.numel(), [1 / 3] * 3)
    # same as the index form with the same seed
    sampler.set_epoch(0)
    assert list(sampler) == idx_sampler.epoch_indices(0).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_indices_on_device():
    labels = long_tailed_labels()
    for strategy in STRATEGIES:
        s = IndexSampler(labels, strategy, device="cuda", generator_seed=1)
        idx = s.epoch_indices(1)
        assert idx.device.type == "cuda" and idx.dtype == torch.int64 and idx.numel() == len(s)
        assert torch.equal(idx, s.epoch_indices(1))
        if strategy == "instance":
            assert torch.equal(torch.sort(idx).values.cpu(), torch.arange(len(labels)))
    s = IndexSampler(labels, "class_balanced", device="cuda", generator_seed=0)
    hist, total = class_frequencies(s, labels, range(5))
    assert_binomial_close(hist, total, [0.2] * 5)
