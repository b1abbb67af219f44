"""The loss of one model's batch, by the job's ``loss``: the one-model loop and the grouped
one both call :func:`job_loss`; the CBD loss itself lives in ``cbdlib/distill.py``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distill import cbd_loss, logit_distillation_loss
from ..errors import CBDError
from .job import Job


def log_prior(class_counts: torch.Tensor) -> torch.Tensor:
    """log of each class's share of the training images (Balanced Softmax's shift)."""
    return torch.log(class_counts.clamp_min(1) / class_counts.sum())


def job_loss(job: Job, features, logits, labels, log_prior, teacher_features=None, teacher_logits=None):
    """(loss, ce, distill) of one model's batch, as the paper and the baselines define them."""
    logits = logits.float()
    zero = logits.new_zeros(())
    if job.loss == "balanced_softmax":
        # Ren et al. 2020: train on logits shifted by the log class prior, predict with plain logits.
        ce = F.cross_entropy(logits + log_prior, labels)
        return ce, ce, zero
    if job.loss == "ce":
        ce = F.cross_entropy(logits, labels)
        return ce, ce, zero
    if job.loss != "cbd":
        raise CBDError(f"unknown loss {job.loss!r}")
    loss, ce, distill = cbd_loss(logits, labels, features.float(), teacher_features, job.alpha, job.beta)
    if job.logit_distill_weight > 0 and teacher_logits is not None:
        logit_term = logit_distillation_loss(logits, teacher_logits, job.logit_distill_temperature)
        loss = loss + job.logit_distill_weight * logit_term
    return loss, ce, distill
