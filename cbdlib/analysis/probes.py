"""Feature probes: how good a model's frozen features are, whatever its own classifier learned.

Both probes read the features a model's classifier sees (for a CBD student: its projected
feature), computed once on the unaugmented training and test images:

* ``linear``: a fresh linear classifier trained on the training features with class-balanced
  sampling (every class equally likely, then an image of it uniformly), the settings in
  ``PROBE_SETTINGS``; features are centred on their training mean and L2-normalised first, so
  one learning rate suits every model whatever the scale of its features.
* ``ncm``: nearest class mean, ``cl2n`` (Kang et al.): centre on the mean training feature,
  L2-normalise, Euclidean distance to the class means.

The same probe on every model makes their features comparable: "are the student's features
better than its teachers'?" is asked of the features, not of the heads trained on them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import ACCURACY_KEYS, accuracy_record
from ..models.heads import NCMClassifier

# The linear probe's recipe, written next to the numbers in metrics.json and notebook 04.
PROBE_SETTINGS = {
    "features": "the classifier's input (a CBD student's projected feature), unaugmented, frozen; "
                "centred on the training mean and L2-normalised",
    "sampling": "class-balanced (class uniformly, then an image of it uniformly)",
    "epochs": 30,               # an epoch = as many samples as training images (at least one batch)
    "batch_size": 256,
    "lr": 0.5,                  # SGD, momentum 0.9, cosine decay to 0 over all steps
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "ncm": "cl2n (centre, L2-normalise, nearest class mean)",
}


def _normalised(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    centre = train.mean(0, keepdim=True)
    return F.normalize(train - centre, dim=1), F.normalize(test - centre, dim=1)


def class_balanced_indices(labels: torch.Tensor, num_classes: int, count: int, generator: torch.Generator):
    """``count`` training indices: a class uniformly among those with images, then one of its images."""
    present = [c for c in range(num_classes) if bool((labels == c).any())]
    members = [torch.nonzero(labels == c).flatten() for c in present]
    classes = torch.randint(len(present), (count,), generator=generator)
    picks = torch.empty(count, dtype=torch.long)
    for k, idx in enumerate(members):
        where = classes == k
        picks[where] = idx[torch.randint(len(idx), (int(where.sum()),), generator=generator)]
    return picks


def linear_probe_logits(train_features, train_labels, test_features, num_classes: int, seed: int = 0,
                        settings: dict = PROBE_SETTINGS) -> np.ndarray:
    """Test logits of a linear classifier trained on frozen training features (CPU, float32)."""
    train = torch.as_tensor(np.asarray(train_features), dtype=torch.float32)
    test = torch.as_tensor(np.asarray(test_features), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    train, test = _normalised(train, test)
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train.shape[1], num_classes)
    with torch.no_grad():  # a seeded start, independent of the global RNG
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    batch = settings["batch_size"]
    steps_per_epoch = max(1, math.ceil(len(labels) / batch))
    total = settings["epochs"] * steps_per_epoch
    optimiser = torch.optim.SGD(head.parameters(), lr=settings["lr"], momentum=settings["momentum"],
                                weight_decay=settings["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    with torch.enable_grad():
        for _ in range(settings["epochs"]):
            order = class_balanced_indices(labels, num_classes, steps_per_epoch * batch, generator)
            for step in range(steps_per_epoch):
                pick = order[step * batch:(step + 1) * batch]
                loss = F.cross_entropy(head(train[pick]), labels[pick])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
    with torch.no_grad():
        return head(test).numpy()


def ncm_probe_logits(train_features, train_labels, test_features, num_classes: int) -> np.ndarray:
    """Test logits (negative distances) of the ``cl2n`` nearest-class-mean classifier."""
    train = torch.as_tensor(np.asarray(train_features), dtype=torch.float32)
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    ncm = NCMClassifier.from_features(train, labels, num_classes, "cl2n")
    with torch.no_grad():
        return ncm(torch.as_tensor(np.asarray(test_features), dtype=torch.float32)).numpy()


def _accuracies(logits: np.ndarray, labels: np.ndarray, splits: dict) -> dict:
    record = accuracy_record(logits, np.asarray(labels), splits)
    return {key: record[key] for key in (*ACCURACY_KEYS, "per_class")}


def probe_record(train_features, train_labels, test_features, test_labels, splits: dict, num_classes: int,
                 seed: int = 0) -> dict:
    """``{"linear": accuracies, "ncm": accuracies}`` (all, the split keys, per_class) of one model."""
    linear = linear_probe_logits(train_features, train_labels, test_features, num_classes, seed)
    ncm = ncm_probe_logits(train_features, train_labels, test_features, num_classes)
    return {"linear": _accuracies(linear, test_labels, splits), "ncm": _accuracies(ncm, test_labels, splits)}
