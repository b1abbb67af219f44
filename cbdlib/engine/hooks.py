"""A public seam into training, for tests and fault drills.

A hook registered with :func:`on_step` is called on every training step of every model, in
the one-model loop and in the grouped one, with what the step is about (:class:`Step`) and the
batch's loss before the backward pass. It may look (which labels, which teachers), replace
the loss (a NaN) or raise (a kill mid-epoch). With no hook registered the loop skips it.

A hook registered with :func:`on_start` is called once per model as its training begins (or
resumes), in both loops, with the job and the model holding the weights of its first step; a
model found already trained is not started. It may look (which weights a student starts from).
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
StartHook = Callable[[Job, torch.nn.Module], None]
_step_hooks: list[StepHook] = []
_start_hooks: list[StartHook] = []


@contextlib.contextmanager
def _registered(hooks: list, hook):
    hooks.append(hook)
    try:
        yield hook
    finally:
        hooks.remove(hook)


def on_step(hook: StepHook):
    """Call ``hook(step, loss)`` on every training step while the block runs; a tensor it
    returns replaces the loss."""
    return _registered(_step_hooks, hook)


def on_start(hook: StartHook):
    """Call ``hook(job, model)`` as each model's training begins while the block runs."""
    return _registered(_start_hooks, hook)


def active() -> bool:
    return bool(_step_hooks)


def after_loss(step: Step, loss: torch.Tensor) -> torch.Tensor:
    for hook in list(_step_hooks):
        replaced = hook(step, loss)
        if replaced is not None:
            loss = replaced
    return loss


def starting(job: Job, model: torch.nn.Module) -> None:
    for hook in list(_start_hooks):
        hook(job, model)
