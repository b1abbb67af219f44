"""Teacher agreement: how closely a CBD student follows its teachers, and how diverse they are.

* ``student_cosine``: per test image, the cosine between the student's projected feature and
  its teachers' target (``distill.teacher_target``, exactly what training pulled it towards);
  averaged per class, and per split as the mean of its classes.
* ``pairwise_agreement``: per test image and pair of teachers, whether both predict the same
  class; averaged over pairs, then per class and per split as above.
* ``ensemble_gain``: the teacher ensemble's accuracy minus that of its best member (the member
  with the best overall accuracy), per split: what averaging diverse teachers adds.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.stats import SPLIT_NAMES
from ..distill import teacher_target
from ..metrics import ACCURACY_KEYS


def per_class_mean(values: np.ndarray, labels: np.ndarray, num_classes: int) -> list:
    """Mean of ``values`` over each class's test images (None for a class without any)."""
    labels = np.asarray(labels)
    return [float(values[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]


def by_split(values: np.ndarray, labels: np.ndarray, splits: dict, num_classes: int) -> dict:
    """``{"all": mean over images, split: mean over its classes, "per_class": [...]}``."""
    per_class = per_class_mean(values, labels, num_classes)
    out = {"all": float(np.mean(values)) if len(values) else None}
    for split in SPLIT_NAMES:
        present = [per_class[c] for c in splits[split] if per_class[c] is not None]
        out[split] = float(np.mean(present)) if present else None
    out["per_class"] = per_class
    return out


def student_cosine(student_features, teacher_features: list, labels, splits: dict, num_classes: int) -> dict:
    """Cosine between the student's feature and its teachers' target, per image, summarised by split."""
    student = torch.as_tensor(np.asarray(student_features), dtype=torch.float32)
    target = teacher_target([torch.as_tensor(np.asarray(t), dtype=torch.float32) for t in teacher_features],
                            student.shape[1])
    cosine = F.cosine_similarity(student, target, dim=1, eps=1e-8).numpy()
    return by_split(cosine, labels, splits, num_classes)


def pairwise_agreement(predictions: dict, labels, splits: dict, num_classes: int) -> dict:
    """Share of test images on which two teachers predict the same class, averaged over the pairs;
    also each pair's overall agreement under ``pairs``. None with fewer than two teachers."""
    names = sorted(predictions)
    if len(names) < 2:
        return None
    same = {f"{a} & {b}": (np.asarray(predictions[a]) == np.asarray(predictions[b])).astype(np.float64)
            for a, b in combinations(names, 2)}
    record = by_split(np.mean(list(same.values()), axis=0), labels, splits, num_classes)
    record["pairs"] = {pair: float(v.mean()) for pair, v in same.items()}
    return record


def ensemble_gain(evaluations: dict, members: list) -> dict | None:
    """The ensemble's accuracy minus its best member's (by overall accuracy), per split, one seed.

    ``evaluations`` maps method names to one seed's evaluation records."""
    members = [m for m in members if m in evaluations]
    if "teacher_ensemble" not in evaluations or not members:
        return None
    best = max(members, key=lambda m: (evaluations[m]["all"], -members.index(m)))
    ensemble = evaluations["teacher_ensemble"]
    gain = {key: (None if ensemble.get(key) is None or evaluations[best].get(key) is None
                  else float(ensemble[key] - evaluations[best][key])) for key in ACCURACY_KEYS}
    return {**gain, "best_member": best}
