"""Several models trained in one batched step (grouped convolutions), each as if alone.

Models of one 32x32 architecture that share a schedule (the stage-1 teachers and the
one-stage baselines of every seed; not distilling students, the grouped step runs no teachers)
are packed into one ``GroupedCifarResNet``. Each keeps its own seed, index sampling,
augmentation, head and loss (``loop.model_loss``, as when trained alone); the summed loss
gives every model exactly its own gradient, SGD is elementwise, and BatchNorm statistics are
per channel, hence per model. Checkpoints are written per model
in the same format as ``loop.fit``, so a model can be resumed or evaluated on its own.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from .. import runs
from ..data.device import DeviceData
from ..data.samplers import epoch_length
from ..devices import place, tuned_convolutions
from ..errors import CBDError
from ..models import CIFAR_ARCHS, Network
from ..models.grouped import GroupedCifarResNet, unpack_state_dict
from ..progress import ModelProgress
from . import hooks
from .job import Job
from .loop import (
    balanced_val_accuracy,
    epoch_line,
    epoch_record,
    epoch_steps,
    fit,
    make_optimizer,
    model_loss,
    report,
    resume,
    run_epoch,
)
from .losses import class_terms
from .precision import autocast

# Jobs must agree on these to share one optimiser step.
SHARED_FIELDS = ("epochs", "batch_size", "schedule", "lr", "warmup_epochs", "weight_decay", "momentum")


def can_train_together(jobs: list[Job]) -> bool:
    if len(jobs) < 2:
        return False
    first = jobs[0]
    return (first.spec.arch in CIFAR_ARCHS
            and all(j.spec.arch == first.spec.arch and j.train_backbone and j.loss != "cbd" for j in jobs)
            and all(getattr(j, f) == getattr(first, f) for j in jobs for f in SHARED_FIELDS))


def checkpoint_interval(epochs: int) -> int:
    """Every epoch for short runs; about 20 checkpoints for long ones (resume stays exact)."""
    return max(1, epochs // 20)


class _Group(nn.Module):
    def __init__(self, models: list[Network]):
        super().__init__()
        self.backbone = GroupedCifarResNet.from_models([m.backbone for m in models])
        self.projections = nn.ModuleList([m.projection if m.projection is not None else nn.Identity() for m in models])
        self.heads = nn.ModuleList([m.classifier for m in models])

    def param_lists(self) -> tuple[list, list[list]]:
        """Grouped backbone parameters, and each model's own (projection + head) parameters."""
        own = [list(p.parameters()) + list(h.parameters()) for p, h in zip(self.projections, self.heads)]
        return list(self.backbone.parameters()), own


def _individual_optimizer_state(model: Network, job: Job, buffers: list[torch.Tensor | None]) -> dict:
    """An SGD state dict exactly as ``loop.fit`` saves it for ``model`` alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay)
    for p, buf in zip(params, buffers):
        if buf is not None:
            opt.state[p]["momentum_buffer"] = buf.detach().clone()
    return opt.state_dict()


def _buffers_from_state(model: Network, job: Job, state: dict) -> list[torch.Tensor | None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay)
    opt.load_state_dict(state)
    return [opt.state.get(p, {}).get("momentum_buffer") for p in params]


def fit_together(jobs: list[Job], models: list[Network], data: DeviceData, *, device: torch.device,
                 checkpoint_paths: list[Path], history_path: Path | None, metas: list[dict], stage: str,
                 quiet: bool = False, check_every: int = 50, precision: str = "fp32") -> list[Network]:
    """Train ``models`` for ``jobs`` in one batched step per iteration; returns the trained models."""
    if not can_train_together(jobs):
        raise CBDError("these models cannot share a step (different architecture or schedule, or a distilling job)")
    states = [resume(job, model, path) for job, model, path in zip(jobs, models, checkpoint_paths)]
    done = [_epochs_done(job, state) for job, state in zip(jobs, states)]
    if len(set(done)) > 1:  # a kill between the models' checkpoint writes, or a fallback to an older .prev.pt
        report("models of one group stopped at different epochs ("
               + ", ".join(f"{j.name} seed {j.train_seed}: {d}" for j, d in zip(jobs, done))
               + "); each resumes from its own checkpoint, those at the same epoch together")
        for epochs_done in sorted(set(done)):
            part = [k for k, d in enumerate(done) if d == epochs_done]
            if len(part) > 1:
                fit_together(*_pick(part, jobs, models), data, device=device,
                             checkpoint_paths=_pick(part, checkpoint_paths)[0], history_path=history_path,
                             metas=_pick(part, metas)[0], stage=stage, quiet=quiet, check_every=check_every,
                             precision=precision)
            else:
                k = part[0]
                fit(jobs[k], models[k], data, device=device, checkpoint_path=checkpoint_paths[k],
                    history_path=history_path, meta=metas[k], stage=stage, quiet=quiet, check_every=check_every,
                    precision=precision)
        return models
    start_epoch, resume_buffers = _resume_point(jobs, models, states)
    if start_epoch is None:  # every model already finished
        return models
    for m in models:
        m.to(device)
    group = place(_Group(models), device)
    backbone_params, own_params = group.param_lists()
    first = jobs[0]
    optimizer = make_optimizer(backbone_params + [p for ps in own_params for p in ps], first, device)
    if resume_buffers is not None:
        _restore_buffers(optimizer, backbone_params, own_params, models, resume_buffers, device)

    batch_size, steps = epoch_steps(epoch_length(first.sampling, data.class_counts.tolist()), first.batch_size)
    epoch_batches = [data.batches(job, batch_size, steps, device) for job in jobs]
    step_loss = _group_step(jobs, group, class_terms(data.class_counts), precision, device)
    for job, model in zip(jobs, models):
        hooks.starting(job, model)
    every = checkpoint_interval(first.epochs)

    # One bar for the group (the first model's epochs are everyone's), one closing line per model.
    progress = [ModelProgress(f"{j.name} seed {j.train_seed}", j.epochs, start_epoch, quiet, bar=k == 0)
                for k, j in enumerate(jobs)]
    finished = False
    try:
        with tuned_convolutions(device):  # cuDNN autotuning for the fixed shapes of training
            for epoch in range(start_epoch, first.epochs):
                t0 = time.perf_counter()
                group.train()
                totals, lr = run_epoch(jobs, zip(*[batches(epoch) for batches in epoch_batches]), step_loss, optimizer,
                                       epoch=epoch, steps=steps, stage=stage, check_every=check_every)
                _write_back(group, models)
                complete = epoch + 1 == first.epochs
                save_now = complete or (epoch + 1) % every == 0
                buffers = (_split_buffers(optimizer, backbone_params, own_params, len(jobs))
                           if save_now and not complete else None)
                elapsed = time.perf_counter() - t0
                for k, job in enumerate(jobs):
                    record = epoch_record(job, stage, epoch, totals[k], steps=steps, images=steps * batch_size,
                                          val_acc=balanced_val_accuracy(models[k], data, device), lr=lr,
                                          seconds=elapsed / len(jobs), trained_with=len(jobs))
                    if save_now:
                        ckpt.save_checkpoint(
                            checkpoint_paths[k], spec=job.spec.to_dict(),
                            meta={**metas[k], "job": job.identity(), "epoch": epoch, "complete": complete},
                            model=models[k].state_dict(),
                            optimizer=None if complete else _individual_optimizer_state(models[k], job, buffers[k]))
                    if history_path is not None:
                        runs.append_history(history_path, record)
                    progress[k].epoch_done(epoch_line(job, record), record["time_s"],
                                           {"loss": f"{record['loss']:.3f}", "val": f"{record['val_acc']:.3f}"})
        finished = True
    finally:
        for p in progress:
            p.close(finished)
    return models


def _group_step(jobs, group: _Group, terms, precision: str, device):
    """The grouped ``step_loss`` for ``run_epoch``: one forward of every model's batch (each model
    reads its own images from its own input channels), each model's own loss (``loop.model_loss``),
    summed."""
    losses = [model_loss(job, terms, precision) for job in jobs]

    def step_loss(epoch: int, step: int, batch):
        xs, labels = [x for x, _ in batch], [y for _, y in batch]
        with autocast(device, precision):  # heads inside too, as in Network.forward
            pooled = group.backbone(torch.cat(xs, dim=1))
            feats = [group.projections[k](pooled[:, k]) for k in range(len(jobs))]
            all_logits = [group.heads[k](feats[k]) for k in range(len(jobs))]
        results = [loss_of(epoch, step, x, y, f, z)
                   for loss_of, x, y, f, z in zip(losses, xs, labels, feats, all_logits)]
        return torch.stack([loss for loss, _ in results]).sum(), torch.stack([stats for _, stats in results])

    return step_loss


def _write_back(group: _Group, models: list[Network]) -> None:
    """Copy the grouped weights into the individual models (for evaluation and checkpoints)."""
    state = group.backbone.state_dict()
    with torch.no_grad():
        for k, m in enumerate(models):
            m.backbone.load_state_dict(unpack_state_dict(state, len(models), k))


def _split_buffers(optimizer, backbone_params, own_params, k_models) -> list[list]:
    """Each model's momentum buffers, in the order of ``model.parameters()``."""
    def buf(p):
        return optimizer.state.get(p, {}).get("momentum_buffer")

    per_model = []
    for k in range(k_models):
        backbone = [None if buf(p) is None else buf(p).chunk(k_models, 0)[k] if p.dim() > 0 else buf(p)
                    for p in backbone_params]
        per_model.append(backbone + [buf(p) for p in own_params[k]])
    return per_model


def _restore_buffers(optimizer, backbone_params, own_params, models, buffers, device) -> None:
    k_models = len(models)
    for i, p in enumerate(backbone_params):
        parts = [buffers[k][i] for k in range(k_models)]
        if any(b is None for b in parts):
            continue
        optimizer.state[p]["momentum_buffer"] = (torch.cat(parts, 0) if p.dim() > 0 else parts[0]).to(device)
    n_backbone = len(backbone_params)
    for k in range(k_models):
        for j, p in enumerate(own_params[k]):
            b = buffers[k][n_backbone + j]
            if b is not None:
                optimizer.state[p]["momentum_buffer"] = b.to(device)


def _pick(part: list[int], *lists: list) -> list[list]:
    return [[values[k] for k in part] for values in lists]


def _epochs_done(job: Job, state: dict | None) -> int:
    """How many epochs a model's checkpoint holds (0 without one)."""
    if state is None:
        return 0
    return job.epochs if state["meta"]["complete"] else state["meta"]["epoch"] + 1


def _resume_point(jobs, models, states) -> tuple[int | None, list | None]:
    """The epoch the group continues from (its models agree), with each model's momentum
    buffers; None when all are done."""
    if all(s is not None and s["meta"]["complete"] for s in states):
        for job in jobs:
            report(f"{job.name} (seed {job.train_seed}): already trained")
        return None, None
    start = _epochs_done(jobs[0], states[0])
    if start == 0:
        return 0, None
    report(f"{len(jobs)} models: resuming together from the checkpoint of epoch {start}/{jobs[0].epochs}")
    buffers = [_buffers_from_state(m, j, s["optimizer"]) for m, j, s in zip(models, jobs, states)]
    return start, buffers
