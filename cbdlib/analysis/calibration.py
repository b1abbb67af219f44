"""Calibration: the top-label expected calibration error and the reliability diagram's bins.

Confidence is the largest softmax probability, a prediction is correct when its argmax is the
true label. The test images are put in ``ECE_BINS`` equal-width confidence bins ((0, 1/15],
(1/15, 2/15], ...); ECE = sum over bins of (bin size / n) * |accuracy(bin) - mean confidence(bin)|
(Guo et al., 2017; the definition MiSLAS and OpenLT report).
"""
from __future__ import annotations

import numpy as np

from ..data.stats import SPLIT_NAMES

ECE_BINS = 15
ECE_DEFINITION = (f"top-label expected calibration error, {ECE_BINS} equal-width bins of confidence "
                  "(confidence = largest softmax probability)")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    # right-closed bins: a confidence of exactly 1.0 falls in the last bin, 1/15 in the first
    return np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per bin: ``count``, mean ``confidence`` and ``accuracy`` (None for an empty bin)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    index = _bin_index(confidence, bins)
    count = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    acc_sum = np.bincount(index, weights=correct, minlength=bins)
    mean = lambda s: [float(v / n) if n else None for v, n in zip(s, count)]  # noqa: E731
    return {"count": count.tolist(), "confidence": mean(conf_sum), "accuracy": mean(acc_sum)}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """ECE of predictions with these confidences and correctness (None without any prediction)."""
    if len(confidence) == 0:
        return None
    r = reliability_bins(confidence, correct, bins)
    n = sum(r["count"])
    return float(sum(c / n * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"]) if c))


def top_label(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of each prediction."""
    probs = softmax(logits)
    return probs.max(axis=1), (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)


def calibration_record(logits: np.ndarray, labels: np.ndarray, splits: dict) -> dict:
    """``{"ece": {"all", split keys}, "reliability": bins of all test images}`` for an evaluation
    record; a split's ECE is over the test images of its classes (None when it has no class)."""
    labels = np.asarray(labels)
    confidence, correct = top_label(logits, labels)
    ece = {"all": expected_calibration_error(confidence, correct)}
    for split in SPLIT_NAMES:
        mask = np.isin(labels, splits[split])
        ece[split] = expected_calibration_error(confidence[mask], correct[mask]) if splits[split] else None
    return {"ece": ece, "reliability": reliability_bins(confidence, correct)}
