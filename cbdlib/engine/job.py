"""What to train: one model's recipe (sampling, augmentation, loss, schedule), as checkpoints record it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from ..models import ModelSpec
from ..seeding import derive_seed


@dataclass
class Job:
    """What to train: a model, its sampling, augmentation, loss and schedule."""

    name: str                     # method name, e.g. "teacher_aug_2", "ce", "cbd_ens"
    train_seed: int               # the run's training seed this model belongs to
    spec: ModelSpec
    sampling: str = "instance"    # instance | class_balanced | class_aware (see data/samplers.py)
    augment: str = "vanilla"      # vanilla | aug
    loss: str = "ce"              # ce | balanced_softmax | ldam | cbd (engine/losses.py)
    epochs: int = 1
    schedule: str = "cifar_lt"
    lr: float = 0.1
    warmup_epochs: int = 5
    batch_size: int = 128
    weight_decay: float = 2e-4
    momentum: float = 0.9
    train_backbone: bool = True   # False: classifier re-training (cRT, LWS) on a frozen backbone
    decoupled_bn: str = "train"   # with train_backbone False: train (BatchNorm statistics re-estimated) | frozen
    alpha: float = 0.4
    beta: float = 100.0
    logit_distill_weight: float = 0.0
    logit_distill_temperature: float = 4.0
    teachers: list = field(default_factory=list)   # names of the teachers distilled from
    # DRW (ldam_drw, ce_drw): class-weighted loss from this epoch (0-indexed) on; None: never
    reweight_from_epoch: Optional[int] = None

    @property
    def seed(self) -> int:
        """The seed of this model's initial weights, sampling and augmentation streams."""
        return derive_seed(self.name, self.train_seed)

    def identity(self) -> dict:
        """What a checkpoint records, so that a resume continues the same job and no other."""
        identity = asdict(self)
        if identity["reweight_from_epoch"] is None:  # as jobs recorded it before the key existed
            del identity["reweight_from_epoch"]
        return identity
