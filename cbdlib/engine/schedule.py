"""Learning-rate schedules, as functions of (epoch, step within epoch)."""
from __future__ import annotations

import math

from ..errors import CBDError

# CIFAR-LT recipe (LDAM-DRW): decay points as fractions of the run (epochs 160 / 180 of 200).
FIRST_DECAY_AT, FIRST_DECAY = 0.8, 0.01
SECOND_DECAY_AT, SECOND_DECAY = 0.9, 0.0001
# Runs shorter than these skip the decay step: in a 3-epoch smoke or test run, "the last 10%"
# would be a whole epoch at lr x0.0001 (nothing learnt), and a 4-epoch run would spend its last
# epoch at x0.01. Real runs (tens of epochs) have both steps.
MIN_EPOCHS_FOR_FIRST_DECAY = 5
MIN_EPOCHS_FOR_SECOND_DECAY = 10


def warmup_epochs_for(epochs: int, warmup_epochs: int) -> int:
    """Short smoke/test runs cannot spend 5 of 2 epochs warming up: cap at half the run."""
    return min(warmup_epochs, epochs // 2)


def lr_at(schedule: str, base_lr: float, epoch: int, step: int, steps_per_epoch: int, epochs: int,
          warmup_epochs: int = 5) -> float:
    """The learning rate of one optimisation step.

    ``cifar_lt``: linear warm-up over ``warmup_epochs`` (per epoch, as in LDAM-DRW), then
    x0.01 after 80% and x0.0001 after 90% of the epochs. ``cosine``: the official CBD
    schedule, cosine decay per step from ``base_lr`` to 0, no warm-up.
    """
    if schedule == "cifar_lt":
        warmup = warmup_epochs_for(epochs, warmup_epochs)
        if epoch < warmup:
            return base_lr * (epoch + 1) / warmup
        if epoch >= int(SECOND_DECAY_AT * epochs) and epochs >= MIN_EPOCHS_FOR_SECOND_DECAY:
            return base_lr * SECOND_DECAY
        if epoch >= int(FIRST_DECAY_AT * epochs) and epochs >= MIN_EPOCHS_FOR_FIRST_DECAY:
            return base_lr * FIRST_DECAY
        return base_lr
    if schedule == "cosine":
        progress = (epoch * steps_per_epoch + step) / max(1, epochs * steps_per_epoch)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise CBDError(f"unknown schedule {schedule!r}")
