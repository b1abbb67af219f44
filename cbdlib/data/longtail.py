"""Long-tailed subsets: per-class counts, the seeded draw, and the balanced validation reserve."""
from __future__ import annotations

import logging

import numpy as np

from ..errors import CBDError
from ..param_rules import LT_SUBSETS

log = logging.getLogger(__name__)


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float, profile: str = "exp") -> list[int]:
    """Images per class of a long-tailed subset, class 0 the largest.

    "exp": ``int(n_max * (1/IR) ** (i/(C-1)))`` (Cao et al., LDAM; CIFAR-10 IR 100 gives
    5000 2997 1796 1077 645 387 232 139 83 50). "step": the first half of the classes
    keep ``n_max``, the rest get ``int(n_max / IR)``.
    """
    if imbalance_ratio < 1:
        raise CBDError(f"imbalance ratio must be >= 1, got {imbalance_ratio}")
    if num_classes < 1 or n_max < 1:
        raise CBDError(f"need n_max >= 1 and num_classes >= 1, got {n_max} and {num_classes}")
    if profile == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [int(n_max * (1.0 / imbalance_ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]
    if profile == "step":
        half = num_classes // 2
        return [int(n_max) if i < half else int(n_max / imbalance_ratio) for i in range(num_classes)]
    raise CBDError(f"profile must be 'exp' or 'step', got {profile!r}")


# How a class's images are ordered before the subset takes the first n_c of them:
# cao       the recipe of Cao et al.'s LDAM-DRW (``imbalance_cifar.py``), which the published CIFAR-LT
#           experiments use: NumPy's legacy generator seeded with lt_seed, then for each class in label
#           order its indices (in the source's order) shuffled in place by that one generator. With
#           torchvision's original pickles this gives the published subsets' very images.
# shuffled  this project's earlier draw: one permutation per class from NumPy's PCG64 generator.
def class_permutations(labels: np.ndarray, num_classes: int, lt_seed: int,
                       lt_subset: str = "shuffled") -> list[np.ndarray]:
    """One seeded order of each class's indices; subset and validation are read off these."""
    if lt_subset == "cao":
        legacy = np.random.RandomState(lt_seed)  # the legacy stream, without touching NumPy's global one
        orders = []
        for c in range(num_classes):
            indices = np.flatnonzero(labels == c)
            legacy.shuffle(indices)
            orders.append(indices)
        return orders
    if lt_subset != "shuffled":
        raise CBDError(f"lt_subset must be one of {', '.join(LT_SUBSETS)}, got {lt_subset!r}")
    rng = np.random.default_rng(lt_seed)  # a local generator: no global seeding
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def split_pool(
    labels: np.ndarray,
    num_classes: int,
    imbalance_ratio: float,
    profile: str,
    lt_seed: int,
    val_per_class: int,
    reserve_first: bool,
    max_per_class: int | None = None,
    lt_subset: str = "shuffled",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Choose the long-tailed training subset and a balanced validation set from a training pool.

    Each class's images are ordered once with ``lt_seed`` (``lt_subset``: ``cao`` or
    ``shuffled``, see ``LT_SUBSETS``): the subset takes the first ``n_i`` of that order, the
    validation set the last ``val_per_class``.
    With ``reserve_first`` (digits) the validation images are removed before ``n_max`` is
    fixed, so they never overlap the subset. Otherwise (CIFAR, whose published counts start
    at the full class size) ``n_max`` is the smallest class pool and the validation images
    are the ones the subset leaves unused; a class whose subset takes its whole pool (only
    CIFAR's head class at imbalance 1..) shares its validation images with its training
    images, and the returned notes say how many.

    ``imbalance_ratio`` None (or 1) keeps every pool image: the natural class counts of an
    already long-tailed source (a researcher's own ImageFolder tree).
    Returns (train_indices, val_indices, notes).
    """
    perms = class_permutations(labels, num_classes, lt_seed, lt_subset)
    pool_sizes = np.array([len(p) for p in perms])
    empty = np.flatnonzero(pool_sizes == 0)
    if len(empty):
        raise CBDError(f"class(es) {empty.tolist()} have no training images")
    reserve = val_per_class if reserve_first else 0
    if reserve and pool_sizes.min() <= reserve:
        raise CBDError(f"val_per_class={val_per_class} leaves no training image in the smallest class "
                       f"({pool_sizes.min()} images)")
    available = pool_sizes - reserve
    if imbalance_ratio is None or imbalance_ratio == 1:
        counts = available.tolist()
    else:
        n_max = int(available.min())
        if max_per_class is not None:
            n_max = min(n_max, max_per_class)
        counts = long_tail_counts(n_max, num_classes, imbalance_ratio, profile)
    if max_per_class is not None:
        # Smoke caps shrink the profile; keep every class (CIFAR at IR 100 would round to 0).
        counts = [max(1, min(c, max_per_class)) for c in counts]
    zero = [c for c, n in enumerate(counts) if n < 1]
    if zero:
        raise CBDError(
            f"imbalance ratio {imbalance_ratio} leaves class(es) {zero} with no images; "
            f"lower the ratio or use a dataset with more images per class"
        )
    train, val, overlap, overlap_classes = [], [], 0, []
    for c, perm in enumerate(perms):
        if reserve_first:
            train.append(perm[: counts[c]])
            val.append(perm[len(perm) - val_per_class:])
        else:
            train.append(perm[: counts[c]])
            v = min(val_per_class, len(perm))
            val.append(perm[len(perm) - v:])
            shared = max(0, counts[c] + v - len(perm))
            overlap += shared
            if shared:
                overlap_classes.append(c)
    notes = {"val_overlap_images": int(overlap), "val_overlap_classes": overlap_classes,
             "val_reserved_first": bool(reserve_first)}
    if overlap:
        log.warning("warning: %s", overlap_warning(overlap, overlap_classes, val_per_class))
    return np.concatenate(train), np.concatenate(val), notes


def overlap_warning(images: int, classes: list, val_per_class: int) -> str:
    """The warning, in the log and in ``summary.md``, when validation images are also training images."""
    return (f"{images} validation images of class(es) {classes} are also training images (their subset takes the "
            f"images val_per_class={val_per_class} would hold out), so what is chosen on validation (the tau of "
            f"tau_norm and logit_adjust) partly sees training images")


def cap_per_class(labels: np.ndarray, num_classes: int, max_per_class: int, seed: int = 0) -> np.ndarray:
    """Indices keeping at most ``max_per_class`` images of each class (smoke runs cap the test set)."""
    perms = class_permutations(labels, num_classes, seed)
    return np.sort(np.concatenate([p[:max_per_class] for p in perms]))
