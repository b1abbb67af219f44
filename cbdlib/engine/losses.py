"""The loss of one model's batch, shared by the one-model loop and the grouped one."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..distill import feature_distillation_loss, logit_distillation_loss
from ..errors import CBDError

if TYPE_CHECKING:
    from .loop import Job


def job_loss(job: Job, features, logits, labels, log_prior, teacher_features=None, teacher_logits=None):
    """(loss, ce, distill) of one model's batch, as the paper and the baselines define them."""
    logits = logits.float()
    zero = logits.new_zeros(())
    if job.loss == "balanced_softmax":
        # Ren et al. 2020: train on logits shifted by the log class prior, predict with plain logits.
        ce = F.cross_entropy(logits + log_prior, labels)
        return ce, ce, zero
    ce = F.cross_entropy(logits, labels)
    if job.loss == "ce":
        return ce, ce, zero
    if job.loss != "cbd":
        raise CBDError(f"unknown loss {job.loss!r}")
    targets = [t.float() for t in teacher_features]
    if features.shape[1] != sum(t.shape[1] for t in targets) and len(targets) > 1:
        # No projection: distil towards the normalised mean of the teachers' normalised features.
        targets = [torch.stack([F.normalize(t, dim=1) for t in targets]).mean(0)]
    distill = feature_distillation_loss(features.float(), targets)
    loss = (1.0 - job.alpha) * ce + job.alpha * job.beta * distill
    if job.logit_distill_weight > 0 and teacher_logits is not None:
        loss = loss + job.logit_distill_weight * logit_distillation_loss(logits, teacher_logits, job.logit_distill_temperature)
    return loss, ce, distill
