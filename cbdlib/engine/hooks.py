"""A public seam into the training step, for tests and fault drills.

A hook registered with :func:`on_step` is called on every training step of every model, in
the one-model loop and in the grouped one, with what the step is about (:class:`Step`) and the
batch's loss before the backward pass. It may look (which labels, which teachers), replace
the loss (a NaN) or raise (a kill mid-epoch). With no hook registered the loop skips it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .job import Job


@dataclass(frozen=True)
class Step:
    job: Job
    epoch: int                    # 0-based
    step: int                     # 0-based, within the epoch
    labels: torch.Tensor
    teachers: tuple = ()          # the frozen teacher models of a distilling job


StepHook = Callable[[Step, torch.Tensor], Optional[torch.Tensor]]
_hooks: list[StepHook] = []


@contextlib.contextmanager
def on_step(hook: StepHook):
    """Call ``hook(step, loss)`` on every training step while the block runs; a tensor it
    returns replaces the loss."""
    _hooks.append(hook)
    try:
        yield hook
    finally:
        _hooks.remove(hook)


def active() -> bool:
    return bool(_hooks)


def after_loss(step: Step, loss: torch.Tensor) -> torch.Tensor:
    for hook in list(_hooks):
        replaced = hook(step, loss)
        if replaced is not None:
            loss = replaced
    return loss
