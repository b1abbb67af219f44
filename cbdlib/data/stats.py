"""Long-tail statistics: counts, imbalance, Gini, and the many/medium/few and head/mid/tail splits."""
from __future__ import annotations

import numpy as np

# Shot thresholds of the decoupling paper (Kang et al.): many > 100, few < 20 training images.
MANY_SHOT_THRESHOLD = 100
FEW_SHOT_THRESHOLD = 20
SHOT_SPLITS = ("many", "medium", "few")     # by training images, with the thresholds above
THIRDS = ("head", "mid", "tail")            # classes sorted by training images, cut in three
SPLIT_NAMES = SHOT_SPLITS + THIRDS


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels), minlength=num_classes).astype(int).tolist()


def measured_imbalance_ratio(counts) -> float:
    counts = np.asarray(counts, dtype=float)
    return float(counts.max() / counts.min()) if counts.min() > 0 else float("inf")


def gini(counts) -> float:
    """Gini coefficient of the class counts: 0 balanced, towards 1 when few classes hold everything."""
    x = np.sort(np.asarray(counts, dtype=float))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    # Sorted form of mean absolute difference / (2 * mean).
    ranks = np.arange(1, n + 1)
    return float((2 * ranks - n - 1) @ x / (n * x.sum()))


def class_splits(
    counts, many_shot_threshold: int = MANY_SHOT_THRESHOLD, few_shot_threshold: int = FEW_SHOT_THRESHOLD
) -> dict[str, list[int]]:
    """Class labels of each split.

    many / medium / few: more than ``many_shot_threshold``, between the two thresholds
    (inclusive), fewer than ``few_shot_threshold`` training images.
    head / mid / tail: classes sorted by count (descending, ties by label) cut into three
    near-equal parts with ``numpy.array_split`` (4 / 3 / 3 on CIFAR-10).
    """
    counts = np.asarray(counts)
    labels = np.arange(len(counts))
    order = sorted(labels.tolist(), key=lambda c: (-counts[c], c))
    head, mid, tail = (part.tolist() for part in np.array_split(np.array(order, dtype=int), 3))
    return {
        "many": labels[counts > many_shot_threshold].tolist(),
        "medium": labels[(counts >= few_shot_threshold) & (counts <= many_shot_threshold)].tolist(),
        "few": labels[counts < few_shot_threshold].tolist(),
        "head": sorted(head),
        "mid": sorted(mid),
        "tail": sorted(tail),
    }


def describe(counts) -> dict:
    """The statistics object of ``python -m cbdlib stats --json``."""
    counts = [int(c) for c in counts]
    return {
        "class_counts": counts,
        "num_classes": len(counts),
        "num_images": int(sum(counts)),
        "imbalance_ratio": measured_imbalance_ratio(counts),
        "gini": gini(counts),
        "thresholds": {"many_shot_above": MANY_SHOT_THRESHOLD, "few_shot_below": FEW_SHOT_THRESHOLD},
        "splits": class_splits(counts),
    }


def split_size_lines(splits: dict, many_shot_threshold: int = MANY_SHOT_THRESHOLD,
                     few_shot_threshold: int = FEW_SHOT_THRESHOLD) -> list[str]:
    """How many classes fall in each split, in words: printed next to every split accuracy."""
    n = {k: len(splits.get(k) or []) for k in SPLIT_NAMES}
    many, few = many_shot_threshold, few_shot_threshold
    return [f"many-shot (> {many} training images): {n['many']} class{'' if n['many'] == 1 else 'es'}; "
            f"medium ({few}-{many}): {n['medium']}; few (< {few}): {n['few']}",
            f"head / mid / tail (thirds by training count): {n['head']} / {n['mid']} / {n['tail']} classes"]


def format_stats(stats: dict) -> str:
    """Human-readable summary, always naming how many classes fall in each split."""
    s = stats
    lines = [
        f"classes: {s['num_classes']}   training images: {s['num_images']}",
        f"imbalance ratio (max/min): {s['imbalance_ratio']:.1f}   Gini: {s['gini']:.3f}",
        f"class counts: {' '.join(str(c) for c in s['class_counts'])}",
        *split_size_lines(s["splits"]),
    ]
    return "\n".join(lines)
