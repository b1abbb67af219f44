"""Evaluation: top-1 overall, per class, per split (many/medium/few, head/mid/tail), confusion.

Everything is returned as plain Python data so it goes straight into ``metrics.json``.
"""
from __future__ import annotations

import math

import numpy as np

from .data.stats import SPLIT_NAMES

ACCURACY_KEYS = ("all",) + SPLIT_NAMES


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Accuracy of each class on its test images (None for a class without test images)."""
    out = []
    for c in range(num_classes):
        mask = labels == c
        out.append(float((predictions[mask] == c).mean()) if mask.any() else None)
    return out


def split_accuracy(per_class: list, classes: list[int]) -> float | None:
    """Mean per-class accuracy over a split's classes; None when the split has no class."""
    values = [per_class[c] for c in classes if per_class[c] is not None]
    return float(np.mean(values)) if values else None


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> list[list[int]]:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix.tolist()


def accuracy_record(logits: np.ndarray, labels: np.ndarray, splits: dict) -> dict:
    """The per-method record of ``metrics.json`` plus the confusion matrix.

    ``all`` is plain top-1 over the test set (balanced test sets make it equal to the mean
    of per-class accuracies).
    """
    num_classes = logits.shape[1]
    predictions = logits.argmax(axis=1)
    per_class = per_class_accuracy(predictions, labels, num_classes)
    record = {"all": float((predictions == labels).mean())}
    for name in SPLIT_NAMES:
        record[name] = split_accuracy(per_class, splits[name])
    record["per_class"] = per_class
    record["confusion"] = confusion_matrix(predictions, labels, num_classes)
    return record


def balanced_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    per_class = per_class_accuracy(logits.argmax(axis=1), labels, logits.shape[1])
    values = [v for v in per_class if v is not None]
    return float(np.mean(values)) if values else 0.0


def _mean_std(values: list) -> tuple:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return float(np.mean(present)), float(np.std(present)) if len(present) > 1 else 0.0


def aggregate_records(records: list[dict]) -> tuple[dict, dict]:
    """Mean and standard deviation (population, 0.0 for one seed) of per-seed records."""
    mean, std = {}, {}
    for key in ACCURACY_KEYS:
        mean[key], std[key] = _mean_std([r.get(key) for r in records])
    num_classes = len(records[0]["per_class"])
    pairs = [_mean_std([r["per_class"][c] for r in records]) for c in range(num_classes)]
    mean["per_class"] = [m for m, _ in pairs]
    std["per_class"] = [s for _, s in pairs]
    return mean, std


def check_finite(obj, where: str = "metrics") -> None:
    """metrics.json never holds NaN: an empty split is None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite value in {where}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            check_finite(v, f"{where}[{i}]")
