"""Data: sources, long-tailed subsets, statistics and samplers.

``load_long_tail(settings)`` is the one call the notebooks and the engine use: it
loads a source (cached), reserves a balanced validation set, draws the long-tailed
training subset with ``lt_seed`` and keeps the test set balanced.

The large benchmarks (``imagenet_lt``, ``places_lt``, ``inat2018``) are too big for
memory: for them ``load_long_tail`` returns a :class:`cbdlib.data.large.LargeLongTail`
of file lists (same labels and statistics, no pixels), and the engine streams their
images through a DataLoader (:mod:`cbdlib.data.streaming`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..errors import CBDError
from ..param_rules import LT_SUBSETS, default_lt_subset
from .longtail import cap_per_class, long_tail_counts, split_pool
from .stats import class_counts, class_splits, describe, format_stats, gini

__all__ = [
    "LongTailData", "LT_SUBSETS", "check_trainable", "class_counts", "class_splits", "data_fingerprint",
    "default_lt_subset", "describe", "format_stats", "gini", "load_long_tail", "long_tail_counts",
    "refuse_one_class",
]

# Digits reserve their validation images before n_max is fixed (few images per class);
# CIFAR keeps the published counts that start at the full class size.
RESERVE_VALIDATION_FIRST = {"digits": True}


@dataclass
class LongTailData:
    """A long-tailed training subset, a balanced validation set and a balanced test set.

    Images are uint8 (N, H, W, 3) arrays; labels int64. ``mean`` / ``std`` (per channel,
    in [0, 1]) normalise inputs for every model of a run.
    """

    name: str
    class_names: list
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: tuple
    std: tuple
    notes: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_counts(self) -> list[int]:
        return class_counts(self.train_labels, self.num_classes)

    @property
    def splits(self) -> dict:
        return class_splits(self.class_counts)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.train_images.shape[1:])

    def stats(self) -> dict:
        return describe(self.class_counts)


# The usual CIFAR statistics (LDAM-DRW recipe); other sources are measured on their subset.
CIFAR_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


def channel_mean_std(images: np.ndarray) -> tuple[tuple, tuple]:
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    std = np.maximum(x.std(axis=0), 1e-3)
    return tuple(float(v) for v in x.mean(axis=0)), tuple(float(v) for v in std)


def load_long_tail(
    dataset: str,
    data: str | None = None,
    *,
    imbalance_ratio: float,
    profile: str = "exp",
    lt_seed: int = 0,
    lt_subset: str | None = None,
    val_per_class: int = 10,
    image_size: int = 32,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
) -> LongTailData:
    """The long-tailed data of a run (a ``LargeLongTail`` of file lists for the large benchmarks).
    ``lt_subset`` None: the dataset's default (``cao`` for CIFAR, see ``longtail.LT_SUBSETS``)."""
    from .large import LARGE_DATASETS

    if dataset in LARGE_DATASETS:  # large-image datasets keep the DataLoader path
        from .large import load_large

        return refuse_one_class(load_large(dataset, data, imbalance_ratio=imbalance_ratio, lt_seed=lt_seed,
                                           val_per_class=val_per_class, image_size=image_size,
                                           max_train_per_class=max_train_per_class,
                                           max_test_per_class=max_test_per_class), data)
    from .sources import load_source  # Pillow and scikit-learn load only when data is needed

    pool, test = load_source(dataset, data, split_seed=lt_seed, image_size=image_size)
    num_classes = len(pool.class_names)
    train_idx, val_idx, notes = split_pool(
        pool.labels, num_classes, imbalance_ratio, profile, lt_seed, val_per_class,
        reserve_first=RESERVE_VALIDATION_FIRST.get(dataset, False),
        max_per_class=max_train_per_class, lt_subset=lt_subset or default_lt_subset(dataset),
    )
    test_images, test_labels = test.images, test.labels
    if max_test_per_class is not None:
        keep = cap_per_class(test.labels, num_classes, max_test_per_class, seed=lt_seed)
        test_images, test_labels = test_images[keep], test_labels[keep]
    train_images = pool.images[train_idx]
    if dataset in ("cifar10", "cifar100"):
        mean, std = CIFAR_MEAN_STD
    else:
        mean, std = channel_mean_std(train_images)
    return refuse_one_class(LongTailData(
        name=dataset,
        class_names=list(pool.class_names),
        train_images=train_images,
        train_labels=pool.labels[train_idx].astype(np.int64),
        val_images=pool.images[val_idx],
        val_labels=pool.labels[val_idx].astype(np.int64),
        test_images=test_images,
        test_labels=test_labels.astype(np.int64),
        mean=mean,
        std=std,
        notes=notes,
    ), data)


def refuse_one_class(lt, data):
    """One class makes every method score 100 %: no comparison means anything."""
    if lt.num_classes < 2:
        names = ", ".join(repr(n) for n in lt.class_names) or "none"
        raise CBDError(f"dataset {lt.name}{f' at {data}' if data else ''} has {lt.num_classes} class ({names}); "
                       f"a long-tailed evaluation needs at least two classes")
    return lt


def data_fingerprint(lt) -> str:
    """sha256 of what a run trains and is tested on: class names, labels, and the images (decoded
    pixels, or the file paths of a large benchmark). Two runs on different data never share it."""
    digest = hashlib.sha256(json.dumps([str(n) for n in lt.class_names]).encode())
    for part in ("train", "test"):
        digest.update(np.ascontiguousarray(getattr(lt, f"{part}_labels"), dtype=np.int64).tobytes())
        images = getattr(lt, f"{part}_images", None)
        if images is not None:
            digest.update(np.ascontiguousarray(images).tobytes())
        else:
            digest.update("\n".join(map(str, getattr(lt, part).paths)).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def check_trainable(lt, batch_size: int) -> None:
    """Refuse a global batch larger than the training set: each epoch would be one step of a batch
    smaller than asked, at a learning rate scaled for the batch asked."""
    n = int(len(lt.train_labels))
    if batch_size > n:
        raise CBDError(f"batch_size {batch_size} is larger than the training set ({n} images in the long-tailed "
                       f"subset of {lt.name}); use batch_size <= {n}")


def load_for_settings(settings) -> LongTailData:
    """``load_long_tail`` with a run's resolved settings (smoke caps included)."""
    return load_long_tail(
        settings.dataset,
        settings.data,
        imbalance_ratio=settings.imbalance_ratio,
        profile=settings.profile,
        lt_seed=settings.lt_seed,
        lt_subset=settings.lt_subset,
        val_per_class=settings.val_per_class,
        image_size=settings.image_size,
        max_train_per_class=settings.max_train_per_class,
        max_test_per_class=settings.max_test_per_class,
    )
