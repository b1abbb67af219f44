"""The training loop: :func:`fit` trains one model; its pieces (resume, one epoch, the epoch's
record and log line, the validation score) are shared with the grouped loop of ``together.py``.

Each epoch draws its indices and augmentation randomness from generators seeded by (model
seed, epoch), so a run resumed from a checkpoint continues exactly as an uninterrupted one
would. Losses are accumulated on the device and read once per ``check_every`` steps (no host
sync per step); a non-finite loss stops the run with the stage, step and model named,
leaving the last good checkpoint in place.

Two data paths feed the same loop: ``data.device.DeviceData`` (small images resident on the
device, batched augmentation) and ``data.streaming.StreamData`` (large images decoded by
DataLoader workers). Both offer ``batches(job, ...)`` and ``predict(...)``.

Under ``torchrun`` (see :mod:`cbdlib.engine.distributed`) the model is wrapped in DDP;
``job.batch_size`` is the global batch and each rank trains on its share of every global
batch (the ranks together see the batches of a one-process run). Rank 0 alone logs and
writes checkpoints and history; every rank evaluates its share of the validation set.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from .. import checkpoint as ckpt
from .. import runs
from ..data.samplers import epoch_length
from ..devices import place, tuned_convolutions
from ..errors import CBDError
from ..models import ModelSpec, Network, build_model
from ..models.grouped import TeacherFeatures
from ..progress import ModelProgress
from . import distributed, hooks
from .compiled import compile_for_training, should_compile
from .job import Job
from .losses import ClassTerms, class_terms, job_loss
from .precision import autocast
from .schedule import lr_at

log = logging.getLogger("cbdlib")


class NonFiniteLoss(CBDError):
    pass


def report(message: str) -> None:
    """Log a line (rank 0 only under torchrun)."""
    if distributed.is_main():
        log.info(message)


def init_model(spec: ModelSpec, seed: int) -> Network:
    """Build a model whose initial weights depend on its own seed only (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec)


def epoch_steps(images: int, batch_size: int, world: int = 1) -> tuple[int, int]:
    """(global batch, optimiser steps) of an epoch of ``images``: the batch shrinks to fit a tiny
    set and splits evenly over the ranks; the last partial batch is dropped (static shapes)."""
    batch = min(batch_size, images - images % world)
    return batch, images // batch


def trainable_parameters(model: Network, job: Job) -> list:
    """The parameters the optimiser moves: all, or only the classifier's when the job re-trains
    a classifier on a frozen backbone (whose forward then builds no graph, and DDP sees only
    the classifier)."""
    if job.train_backbone:
        return [p for p in model.parameters() if p.requires_grad]
    for name, p in model.named_parameters():
        if not name.startswith("classifier."):
            p.requires_grad_(False)
    return [p for p in model.classifier.parameters() if p.requires_grad]


def make_optimizer(params: list, job: Job, device: torch.device) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay,
                           foreach=device.type == "cuda" or None)


def resume(job: Job, model: Network, checkpoint_path: Path) -> Optional[dict]:
    """The checkpoint to continue ``job`` from (its weights loaded into ``model``), or None to
    start afresh. A checkpoint of another job is refused; a damaged newest one falls back to
    the previous (``checkpoint.load_checkpoint``)."""
    if not (checkpoint_path.exists() or ckpt.previous_path(checkpoint_path).exists()):
        return None
    state = ckpt.load_checkpoint(checkpoint_path, fallback=True)
    if state["meta"].get("job") != job.identity():
        raise CBDError(f"checkpoint {checkpoint_path} was made by a different job; delete it or use overwrite: true")
    ckpt.load_state_strict(model, state["model"], f"checkpoint {checkpoint_path}")
    return state


def train_mode(model: Network, job: Job) -> None:
    """Training mode; a frozen backbone under ``decoupled_bn: frozen`` keeps its BatchNorm
    statistics (under ``train``, Kang et al.'s choice, they are re-estimated on the re-training
    batches while its weights stay frozen)."""
    model.train()
    if not job.train_backbone and job.decoupled_bn == "frozen":
        model.backbone.eval()
        if model.projection is not None:
            model.projection.eval()


StepLoss = Callable[[int, int, object], tuple[torch.Tensor, torch.Tensor]]


def run_epoch(jobs: list[Job], batches: Iterable, step_loss: StepLoss, optimizer, *, epoch: int, steps: int,
              stage: str, check_every: int = 50) -> tuple[list[list[float]], float]:
    """One epoch of optimiser steps over ``batches`` for ``jobs`` (one model, or a group sharing
    a schedule). ``step_loss(epoch, step, batch)`` returns the loss to back-propagate and each
    model's (loss, ce, distill, correct) as a (models, 4) tensor; returns their sums over the
    epoch (summed over ranks) and the last learning rate."""
    first = jobs[0]
    sums, lr = None, first.lr
    for step, batch in enumerate(batches):
        lr = lr_at(first.schedule, first.lr, epoch, step, steps, first.epochs, first.warmup_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, stats = step_loss(epoch, step, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums = stats if sums is None else sums + stats
        if (step + 1) % check_every == 0:
            check_finite(jobs, sums, stage, epoch, step)
    totals = distributed.all_reduce_sum(sums).tolist()  # one host sync per epoch
    for job, row in zip(jobs, totals):
        if not np.isfinite(row[0]):
            raise_non_finite(job, stage, epoch, steps - 1)
    return totals, lr


def check_finite(jobs: list[Job], sums: torch.Tensor, stage: str, epoch: int, step: int) -> None:
    """Stop at the first model whose summed loss is not finite on some rank (every rank stops)."""
    losses = distributed.all_reduce_sum(sums[:, 0].detach().clone())
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        raise_non_finite(jobs[int((~finite).nonzero()[0])], stage, epoch, step)


def raise_non_finite(job: Job, stage: str, epoch: int, step: int):
    raise NonFiniteLoss(
        f"non-finite loss in stage {stage}, model {job.name} (seed {job.train_seed}), epoch {epoch + 1}, "
        f"by step {step + 1}; "
        + ("the checkpoint of the previous epoch is kept" if epoch > 0
           else "no epoch had finished, so no checkpoint was written")
    )


def step_stats(loss, ce, distill, logits, labels) -> torch.Tensor:
    """One model's (loss, ce, distill, correct) of a batch, kept on the device."""
    correct = (logits.detach().argmax(1) == labels).sum().float()
    return torch.stack([loss.detach(), ce.detach(), distill.detach(), correct])


def epoch_record(job: Job, stage: str, epoch: int, totals: list[float], *, steps: int, images: int, val_acc: float,
                 lr: float, seconds: float, world: int = 1, **extra) -> dict:
    """The ``history.jsonl`` line of one model's epoch: mean losses per step, training accuracy
    over the ``images`` it saw, balanced validation accuracy."""
    mean_over = steps * world  # each rank added one mean loss per step
    return {"model": job.name, "seed": job.train_seed, "stage": stage, "epoch": epoch + 1,
            "loss": totals[0] / mean_over, "ce": totals[1] / mean_over,
            "distill": totals[2] / mean_over if job.loss == "cbd" else None,
            "train_acc": totals[3] / images, "val_acc": val_acc, "lr": lr, "steps": steps,
            "time_s": round(seconds, 3), **extra}


def epoch_line(job: Job, record: dict) -> str:
    """The log line of one model's epoch."""
    return (f"{job.name} seed {job.train_seed} epoch {record['epoch']}/{job.epochs}: loss {record['loss']:.4f}"
            + (f" (ce {record['ce']:.4f}, distill {record['distill']:.4f})" if job.loss == "cbd" else "")
            + f", train acc {record['train_acc']:.3f}, val acc {record['val_acc']:.3f}, lr {record['lr']:.4g}")


def balanced_val_accuracy(model: Network, data, device: torch.device) -> float:
    """Mean per-class accuracy on the validation set (NaN without one); each rank predicts
    its share and the per-class counts are summed over ranks."""
    if len(data.val_labels) == 0:
        return float("nan")
    _, logits, labels = data.predict(model, "val", device, distributed.rank(), distributed.world_size())
    counts = torch.zeros(2, data.num_classes, dtype=torch.float64, device=device)  # images, correct
    if len(labels):
        labels = torch.from_numpy(labels)
        correct = labels[torch.from_numpy(logits.argmax(1)) == labels]
        counts[0] = torch.bincount(labels, minlength=data.num_classes).to(counts)
        counts[1] = torch.bincount(correct, minlength=data.num_classes).to(counts)
    total, correct = distributed.all_reduce_sum(counts)
    seen = total > 0
    return float((correct[seen] / total[seen]).mean())


def model_loss(job: Job, terms: ClassTerms, precision: str, teachers=(), teacher_forward=None):
    """One model's ``loss_of(epoch, step, x, labels, features, logits)``: from its forward's output,
    the frozen teachers' forward (a distilling job), the job's loss, the step hooks and the batch's
    (loss, ce, distill, correct). The one-model step and the grouped step both use it;
    ``teacher_forward`` (a ``TeacherFeatures``) computes the teachers' features."""
    teachers = tuple(teachers)
    if job.loss == "cbd" and teacher_forward is None:
        teacher_forward = TeacherFeatures(list(teachers), grouped=False)

    def loss_of(epoch: int, step: int, x, labels, features, logits):
        logits = logits.float()  # once: the loss and the statistics read the same float32 logits
        teacher_features = teacher_logits = None
        if job.loss == "cbd":
            with torch.no_grad(), autocast(x.device, precision):
                teacher_features = teacher_forward(x)
                if job.logit_distill_weight > 0:
                    teacher_logits = teacher_forward.logits(teacher_features)
        loss, ce, distill = job_loss(job, features, logits, labels, terms, teacher_features, teacher_logits, epoch)
        if hooks.active():
            loss = hooks.after_loss(hooks.Step(job, epoch, step, labels, teachers), loss)
        return loss, step_stats(loss, ce, distill, logits, labels)

    return loss_of


def model_step(job: Job, model, teachers: list[Network], terms: ClassTerms, precision: str,
               teacher_forward=None) -> StepLoss:
    """One model's ``step_loss`` for :func:`run_epoch`: its forward, then :func:`model_loss`.
    ``model`` may be DDP-wrapped."""
    loss_of = model_loss(job, terms, precision, teachers, teacher_forward)

    def step_loss(epoch: int, step: int, batch):
        x, labels = batch
        with autocast(x.device, precision):
            features, logits = model(x)
        loss, stats = loss_of(epoch, step, x, labels, features, logits)
        return loss, stats.unsqueeze(0)

    return step_loss


def fit(job: Job, model: Network, data, *, device: torch.device, checkpoint_path: Path, history_path: Path | None,
        meta: dict, stage: str, teachers: Optional[list[Network]] = None, quiet: bool = False, check_every: int = 50,
        sync_bn: bool = False, precision: str = "fp32", use_compile: bool | None = False) -> Network:
    """Train ``model`` for ``job``, resuming from ``checkpoint_path`` when it holds a partial run.

    ``data`` is a ``DeviceData`` or a ``StreamData``. Under torchrun every rank calls this with
    the same arguments; ``sync_bn`` (CUDA, several ranks) takes BatchNorm statistics over the
    global batch. ``precision`` is ``bf16`` (autocast) or ``fp32`` (see ``precision.py``);
    ``use_compile`` True / False / None (when the job is long enough) runs the training forward
    and backward through ``torch.compile``. Checkpoints hold the plain model's state dict.
    """
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    distributed.local_batch_size(job.batch_size)  # the global batch must split evenly over the ranks
    place(model, device)
    optimizer = make_optimizer(trainable_parameters(model, job), job, device)
    start_epoch = 0
    state = resume(job, model, checkpoint_path)  # every rank loads what rank 0 wrote before the last barrier
    if state is not None and state["meta"]["complete"]:
        report(f"{job.name} (seed {job.train_seed}): already trained, loaded {checkpoint_path.name}")
        return model
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["meta"]["epoch"] + 1
        report(f"{job.name} (seed {job.train_seed}): resuming from the checkpoint of epoch {start_epoch}/{job.epochs}")

    images = epoch_length(job.sampling, data.class_counts.tolist())
    if images < world:
        raise CBDError(f"{images} training images cannot be shared by {world} processes")
    batch_size, steps = epoch_steps(images, job.batch_size, world)
    compiled = should_compile(use_compile, device, steps * (job.epochs - start_epoch))
    epoch_batches = data.batches(job, batch_size, steps, device, rank, world,
                                 compile_fn=compile_for_training if compiled else None)
    train_model = distributed.wrap(model, device, sync_bn)  # DDP under torchrun, else the model itself
    teachers = teachers or []
    # The frozen teachers' forwards: one grouped forward on a GPU (several launches saved per step).
    teacher_forward = place(TeacherFeatures(teachers, grouped=device.type == "cuda"), device) if teachers else None
    if compiled:
        train_model = compile_for_training(train_model)
        teacher_forward = compile_for_training(teacher_forward) if teacher_forward is not None else None
    step_loss = model_step(job, train_model, teachers, class_terms(data.class_counts), precision, teacher_forward)
    hooks.starting(job, model)

    with ModelProgress(f"{job.name} seed {job.train_seed}", job.epochs, start_epoch, quiet or not main) as progress, \
            tuned_convolutions(device):
        for epoch in range(start_epoch, job.epochs):
            t0 = time.perf_counter()
            train_mode(model, job)
            totals, lr = run_epoch([job], epoch_batches(epoch), step_loss, optimizer, epoch=epoch, steps=steps,
                                   stage=stage, check_every=check_every)
            distributed.broadcast_buffers(model)  # rank 0's BatchNorm statistics everywhere
            record = epoch_record(job, stage, epoch, totals[0], steps=steps, images=steps * batch_size, world=world,
                                  val_acc=balanced_val_accuracy(model, data, device), lr=lr,
                                  seconds=time.perf_counter() - t0)
            if main:
                complete = epoch + 1 == job.epochs
                ckpt.save_checkpoint(checkpoint_path, spec=job.spec.to_dict(), model=model.state_dict(),
                                     meta={**meta, "job": job.identity(), "epoch": epoch, "complete": complete},
                                     optimizer=None if complete else optimizer.state_dict())
                if history_path is not None:
                    runs.append_history(history_path, record)
            progress.epoch_done(epoch_line(job, record), record["time_s"],
                                {"loss": f"{record['loss']:.3f}", "val": f"{record['val_acc']:.3f}"})
            distributed.barrier()  # the others wait until rank 0 has written the epoch
    return model
