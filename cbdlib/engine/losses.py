"""The loss of one model's batch, by the job's ``loss``: the one-model loop and the grouped
one both call :func:`job_loss`; the CBD loss itself lives in ``cbdlib/distill.py``.

The class-count terms of the loss baselines are computed once per training run (``ClassTerms``):

- Balanced Softmax (Ren et al. 2020): train on logits + log prior, predict with plain logits.
- LDAM (Cao et al. 2019, ``kaidic/LDAM-DRW``): the true class's cosine is lowered by a margin
  ``m_c`` proportional to ``n_c ** -1/4``, the largest 0.5, before the cosines are scaled by
  s = 30. The ``ldam_drw`` model's cosine head holds that fixed s = 30, so its logits are
  ``s * cos`` and the margin is subtracted as ``s * m_c``: the same numbers as LDAM-DRW's
  ``NormedLinear`` (plain cosines) followed by its loss's ``s * (cos - m)``, and the logits a
  model saves are the ones its loss saw (calibration reads them).
- DRW (deferred re-weighting, the same paper): unweighted cross-entropy until the job's
  ``reweight_from_epoch`` (``int(0.8 * epochs)``: 160 of 200), then per-class weights
  ``(1 - beta) / (1 - beta ** n_c)`` with beta = 0.9999 (Cui et al.'s effective number),
  normalised to sum to the number of classes, in PyTorch's weighted mean (as their code).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..distill import cbd_loss, logit_distillation_loss
from ..errors import CBDError
from .job import Job

LDAM_MAX_MARGIN = 0.5     # the largest class margin (the rarest class), LDAM-DRW's max_m
LDAM_SCALE = 30.0         # s of the LDAM loss, held as the fixed scale of the ldam_drw model's cosine head
DRW_BETA = 0.9999         # effective-number beta of the deferred re-weighting
DRW_START = 0.8           # re-weighting starts at int(DRW_START * epochs): epoch 160 of 200 in LDAM-DRW


@dataclass(frozen=True)
class ClassTerms:
    """Per-class constants of the losses, from the training class counts (on the training device)."""

    log_prior: torch.Tensor      # log of each class's share (Balanced Softmax's shift)
    ldam_margins: torch.Tensor   # LDAM's m_c
    drw_weights: torch.Tensor    # DRW's class weights (used from the job's reweight_from_epoch on)


def log_prior(class_counts: torch.Tensor) -> torch.Tensor:
    """log of each class's share of the training images (Balanced Softmax's shift)."""
    return torch.log(class_counts.clamp_min(1) / class_counts.sum())


def ldam_margins(class_counts: torch.Tensor, max_margin: float = LDAM_MAX_MARGIN) -> torch.Tensor:
    """``n_c ** -1/4`` rescaled so that the largest margin (the smallest class) is ``max_margin``."""
    raw = class_counts.double().clamp_min(1).pow(-0.25)
    return (raw * (max_margin / raw.max())).to(class_counts.dtype)


def drw_weights(class_counts: torch.Tensor, beta: float = DRW_BETA) -> torch.Tensor:
    """``(1 - beta) / (1 - beta ** n_c)``, normalised to sum to the number of classes."""
    counts = class_counts.double().clamp_min(1)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (weights / weights.sum() * len(counts)).to(class_counts.dtype)


def class_terms(class_counts: torch.Tensor) -> ClassTerms:
    counts = class_counts.float()
    return ClassTerms(log_prior(counts), ldam_margins(counts), drw_weights(counts))


def drw_start(epochs: int) -> int:
    """The first re-weighted epoch (0-indexed) of a DRW job of ``epochs`` epochs."""
    return int(DRW_START * epochs)


def job_loss(job: Job, features, logits, labels, terms: ClassTerms, teacher_features=None, teacher_logits=None,
             epoch: int = 0):
    """(loss, ce, distill) of one model's batch at ``epoch`` (0-indexed), as the paper and the
    baselines define them."""
    logits = logits.float()
    zero = logits.new_zeros(())
    reweight = job.reweight_from_epoch is not None and epoch >= job.reweight_from_epoch
    weight = terms.drw_weights if reweight else None
    if job.loss == "balanced_softmax":
        ce = F.cross_entropy(logits + terms.log_prior, labels)
        return ce, ce, zero
    if job.loss == "ce":
        ce = F.cross_entropy(logits, labels, weight=weight)
        return ce, ce, zero
    if job.loss == "ldam":
        scale = job.spec.cosine_scale  # the head's fixed s: logits are s * cos
        margin = F.one_hot(labels, logits.shape[1]).to(logits.dtype) * (scale * terms.ldam_margins[labels])[:, None]
        ce = F.cross_entropy(logits - margin, labels, weight=weight)
        return ce, ce, zero
    if job.loss != "cbd":
        raise CBDError(f"unknown loss {job.loss!r}")
    loss, ce, distill = cbd_loss(logits, labels, features.float(), teacher_features, job.alpha, job.beta)
    if job.logit_distill_weight > 0 and teacher_logits is not None:
        logit_term = logit_distillation_loss(logits, teacher_logits, job.logit_distill_temperature)
        loss = loss + job.logit_distill_weight * logit_term
    return loss, ce, distill
