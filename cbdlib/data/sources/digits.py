"""scikit-learn's bundled 8x8 digits, split 70/30 (stratified, seeded)."""
from __future__ import annotations

import logging

import numpy as np

from .common import ImageSet

log = logging.getLogger("cbdlib.data.sources")


def load_digits(split_seed: int) -> tuple[ImageSet, ImageSet]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    gray = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=split_seed
    )
    names = [str(i) for i in range(10)]
    return (
        ImageSet(images[train_idx], labels[train_idx], list(names)),
        ImageSet(images[test_idx], labels[test_idx], list(names)),
    )
