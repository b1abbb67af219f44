"""Evaluation: top-1 overall, per class, per split (many/medium/few, head/mid/tail), confusion.

Everything is returned as plain Python data so it goes straight into ``metrics.json``.
"""
from __future__ import annotations

import math

import numpy as np

from .data.stats import SPLIT_NAMES
from .errors import CBDError

# metrics.json's key of the teacher-agreement analysis (cbdlib/analysis/agreement.py)
AGREEMENT = "teacher_agreement"

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


def _is_fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _require_fractions(record: dict, owner: str, label: str, what: str) -> None:
    """Every accuracy key in ``record``, each a fraction in [0, 1] or null."""
    for key in ACCURACY_KEYS:
        if key not in record:
            raise CBDError(f"metrics.json: {owner} lacks {key!r}")
        value = record[key]
        if value is not None and not _is_fraction(value):
            raise CBDError(f"metrics.json: {label}.{key} = {value!r} is not {what}")


def validate_metrics(metrics: dict) -> None:
    """Check a metrics object against the contract's schema (used by tests, notebook 04 and ``aggregate``).

    Accuracies are fractions in [0, 1] (per class too) or null; a split with no class is null;
    every method has a std record of the same keys (non-negative or null); nothing is NaN. The
    analyses (``probes``, ``ece``, ``teacher_agreement``) are checked by ``check_analyses``.
    """
    if not isinstance(metrics, dict):
        raise CBDError(f"metrics.json holds {type(metrics).__name__}, not a JSON object")
    for key in ("dataset", "imbalance_ratio", "class_counts", "splits", "seeds", "device", "torch", "git_commit",
                "methods", "std"):
        if key not in metrics:
            raise CBDError(f"metrics.json lacks {key!r}")
    for key in ("splits", "methods", "std"):
        if not isinstance(metrics[key], dict):
            raise CBDError(f"metrics.json: {key} is not a mapping")
    num_classes = len(metrics["class_counts"])
    splits = metrics["splits"]
    for split in SPLIT_NAMES:
        if not isinstance(splits.get(split), list):
            raise CBDError(f"metrics.json: splits lacks the list of {split!r} classes")
    for name, record in metrics["methods"].items():
        if not isinstance(record, dict):
            raise CBDError(f"metrics.json: method {name} is not a mapping")
        _require_fractions(record, f"method {name}", name, "a fraction")
        for key in SPLIT_NAMES:
            value = record[key]
            if not splits[key] and value is not None:
                raise CBDError(f"metrics.json: {name}.{key} = {value!r}, but the {key} split has no class "
                               "(null expected)")
        per_class = record.get("per_class")
        if not isinstance(per_class, list) or len(per_class) != num_classes:
            size = len(per_class) if isinstance(per_class, list) else "no"
            raise CBDError(f"metrics.json: {name}.per_class has {size} entries, not {num_classes}")
        for label, value in enumerate(per_class):
            if value is not None and not _is_fraction(value):
                raise CBDError(f"metrics.json: {name}.per_class[{label}] = {value!r} is not a fraction")
        std = metrics["std"].get(name)
        if not isinstance(std, dict):
            raise CBDError(f"metrics.json: no std for {name}")
        _require_fractions(std, f"std of {name}", f"std {name}", "a standard deviation of fractions (in [0, 1])")
    check_analyses(metrics)
    try:
        check_finite(metrics)
    except ValueError as error:
        raise CBDError(f"metrics.json: {error}") from None


def check_analyses(metrics: dict) -> None:
    """The analyses' part of ``metrics.json``: fractions in [0, 1] or null under the split keys."""
    def fractions(record, where: str, low: float = 0.0) -> None:
        if not isinstance(record, dict):
            raise CBDError(f"metrics.json: {where} is not a mapping")
        for key in ACCURACY_KEYS:
            value = record.get(key, "absent")
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and low <= value <= 1.0):
                raise CBDError(f"metrics.json: {where}.{key} = {value!r} is not in [{low:g}, 1] (or null)")

    for top, kinds in (("probes", ("linear", "ncm")), ("probes_std", ("linear", "ncm"))):
        for name, record in (metrics.get(top) or {}).items():
            for kind in kinds:
                fractions((record or {}).get(kind), f"{top}.{name}.{kind}")
    for top in ("ece", "ece_std"):
        for name, record in (metrics.get(top) or {}).items():
            if top == "ece" and name not in metrics.get("methods", {}):
                raise CBDError(f"metrics.json: ece.{name} names no method of this run")
            fractions(record, f"{top}.{name}")
    agreement = metrics.get(AGREEMENT) or {}
    for name, record in agreement.get("student_cosine", {}).items():
        fractions(record, f"{AGREEMENT}.student_cosine.{name}", low=-1.0)
    if agreement.get("pairwise_agreement"):
        fractions(agreement["pairwise_agreement"], f"{AGREEMENT}.pairwise_agreement")
    if agreement.get("ensemble_gain"):
        fractions(agreement["ensemble_gain"], f"{AGREEMENT}.ensemble_gain", low=-1.0)
