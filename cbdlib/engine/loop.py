"""The training loop: one model, data resident on the device, batched augmentation.

Each epoch draws its indices and augmentation randomness from generators seeded by
(model seed, epoch), so a run resumed from a checkpoint continues exactly as an
uninterrupted one would. Losses are accumulated on the device and read once per
``check_every`` steps (no host sync per step); a non-finite loss stops the run with
the stage, step and model named, leaving the last good checkpoint in place.

Two data paths feed the same loop: :class:`DeviceData` (small images resident on the
device, batched augmentation) and ``cbdlib.data.streaming.StreamData`` (large images
decoded by DataLoader workers). Both offer ``batches(job, ...)`` and ``predict(...)``.

Under ``torchrun`` (see :mod:`cbdlib.engine.distributed`) the model is wrapped in DDP;
``job.batch_size`` is the global batch and each rank trains on its share of every global
batch (the ranks together see the batches of a one-process run). Rank 0 alone logs and
writes checkpoints and history; every rank evaluates its share of the validation set.
"""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import checkpoint as ckpt
from .. import runs
from ..augment import BatchAugmenter, aug_config, vanilla_config
from ..data.samplers import IndexSampler, epoch_length, shard_indices
from ..errors import CBDError
from ..models import ModelSpec, Network, build_model
from ..models.grouped import TeacherFeatures
from ..progress import ModelProgress
from .compiled import compile_for_training, should_compile
from .losses import job_loss
from . import distributed
from .precision import autocast
from .schedule import lr_at

log = logging.getLogger("cbdlib")


def derive_seed(*parts) -> int:
    """A stable 31-bit seed from any labels (model name, training seed, epoch)."""
    return zlib.crc32(":".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


@dataclass
class Job:
    """What to train: a model, its sampling, augmentation, loss and schedule."""

    name: str                     # method name, e.g. "teacher_aug_2", "ce", "cbd_ens"
    train_seed: int               # the run's training seed this model belongs to
    spec: ModelSpec
    sampling: str = "instance"    # instance | class_balanced | class_aware (see data/samplers.py)
    augment: str = "vanilla"      # vanilla | aug
    loss: str = "ce"              # ce | balanced_softmax | cbd
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

    @property
    def seed(self) -> int:
        return derive_seed(self.name, self.train_seed)

    def identity(self) -> dict:
        return asdict(self)


@dataclass
class DeviceData:
    """Training and validation images as uint8 tensors on the device."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    mean: tuple
    std: tuple
    num_classes: int
    class_counts: torch.Tensor

    @classmethod
    def from_long_tail(cls, data, device: torch.device) -> "DeviceData":
        counts = torch.tensor(data.class_counts, dtype=torch.float32, device=device)
        return cls(
            train_images=torch.from_numpy(np.ascontiguousarray(data.train_images)).to(device),
            train_labels=torch.from_numpy(data.train_labels).to(device),
            val_images=torch.from_numpy(np.ascontiguousarray(data.val_images)).to(device),
            val_labels=torch.from_numpy(data.val_labels).to(device),
            mean=data.mean,
            std=data.std,
            num_classes=data.num_classes,
            class_counts=counts,
        )

    def batches(self, job: Job, batch_size: int, steps: int, device: torch.device, rank: int = 0, world: int = 1):
        """A function ``epoch -> iterator`` of this rank's share of each global batch of
        ``batch_size`` images: (normalised images, labels), ``steps`` batches per epoch."""
        size = self.train_images.shape[1]
        augmenter = BatchAugmenter(aug_config(size) if job.augment == "aug" else vanilla_config(size),
                                   self.mean, self.std, channels_last=use_channels_last(device))
        sampler = IndexSampler(self.train_labels, job.sampling, num_classes=self.num_classes,
                               total_epochs=job.epochs, generator_seed=job.seed, device=device)
        local = batch_size // world

        def epoch_batches(epoch: int):
            indices = shard_indices(sampler.epoch_indices(epoch), rank, world)
            generator = make_generator(device, derive_seed(job.seed, "augment", epoch))
            for step in range(steps):
                batch = indices[step * local:(step + 1) * local]
                # Every rank draws the global batch's random numbers and keeps its rows, so an
                # image is augmented as it would be in one process.
                u = augmenter.draw(batch_size, generator, device)[rank::world]
                yield augmenter.apply(self.train_images[batch], u), self.train_labels[batch]

        return epoch_batches

    def predict(self, model: Network, split: str, device: torch.device, rank: int = 0, world: int = 1):
        """(features, logits, labels) of the validation split (or this rank's ``rank::world`` share)."""
        if split != "val":
            raise CBDError(f"DeviceData holds the training and validation images only, not {split!r}")
        images, labels = self.val_images[rank::world], self.val_labels[rank::world]
        if len(labels) == 0:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), labels.cpu().numpy()
        features, logits = predict(model, images, self.mean, self.std, device)
        return features, logits, labels.cpu().numpy()


def epoch_steps(images: int, batch_size: int, world: int = 1) -> tuple[int, int]:
    """(global batch, optimiser steps) of an epoch of ``images``: the batch shrinks to fit a tiny
    set and splits evenly over the ranks; the last partial batch is dropped (static shapes)."""
    batch = min(batch_size, images - images % world)
    return batch, images // batch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CBDError(f"device {name!r} asked for, but CUDA is not available here; use device: auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CBDError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def use_channels_last(device: torch.device) -> bool:
    """channels_last for convolutions: faster on CUDA and on this project's CPUs (oneDNN), see
    docs/performance.md."""
    return device.type in ("cuda", "cpu")


def report(message: str) -> None:
    """Log a line (rank 0 only under torchrun)."""
    if distributed.is_main():
        log.info(message)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
    gen.manual_seed(seed)
    return gen


def init_model(spec: ModelSpec, seed: int) -> Network:
    """Build a model whose initial weights depend on its own seed only (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec)


@torch.no_grad()
def predict(model: Network, images: torch.Tensor | np.ndarray, mean, std, device: torch.device, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) of uint8 images, in eval mode, without augmentation, in float32
    (whatever precision trained the model, so that a saved model always scores the same)."""
    model.eval()
    normalise = BatchAugmenter(None, mean, std, channels_last=use_channels_last(device))
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        x = normalise(images[start:start + batch_size].to(device), None)
        f, z = model(x)
        feats.append(f.float().cpu())
        logits.append(z.float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


class NonFiniteLoss(CBDError):
    pass


def fit(
    job: Job,
    model: Network,
    data: DeviceData,
    *,
    device: torch.device,
    checkpoint_path: Path,
    history_path: Path | None,
    meta: dict,
    stage: str,
    teachers: Optional[list[Network]] = None,
    quiet: bool = False,
    check_every: int = 50,
    sync_bn: bool = False,
    precision: str = "fp32",
    use_compile: bool | None = False,
) -> Network:
    """Train ``model`` for ``job`` (resuming from ``checkpoint_path`` when it holds a partial run).

    ``data`` is a :class:`DeviceData` or a ``StreamData``. Under torchrun every rank calls
    this with the same arguments; ``sync_bn`` (CUDA, several ranks) takes BatchNorm
    statistics over the global batch. ``precision`` is ``bf16`` (autocast) or ``fp32``
    (see ``precision.py``); ``use_compile`` True / False / None (when the job is long enough)
    runs the training forward and backward through ``torch.compile``. Checkpoints hold the
    plain model's state dict either way.
    """
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    distributed.local_batch_size(job.batch_size)  # the global batch must split evenly over the ranks
    model.to(device)
    if use_channels_last(device):
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if not job.train_backbone:
        # Classifier re-training: everything else is frozen, so its forward builds no graph
        # (and DDP sees only the classifier's parameters).
        for name, p in model.named_parameters():
            if not name.startswith("classifier."):
                p.requires_grad_(False)
        params = [p for p in model.classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay,
        foreach=device.type == "cuda" or None,
    )
    start_epoch = 0
    if checkpoint_path.exists() or ckpt.previous_path(checkpoint_path).exists():
        # Every rank loads the same checkpoint: rank 0 wrote it before the last barrier.
        state = ckpt.load_checkpoint(checkpoint_path, fallback=True)
        if state["meta"].get("job") != job.identity():
            raise CBDError(f"checkpoint {checkpoint_path} was made by a different job; delete it or use overwrite: true")
        ckpt.load_state_strict(model, state["model"], f"checkpoint {checkpoint_path}")
        if state["meta"]["complete"]:
            report(f"{job.name} (seed {job.train_seed}): already trained, loaded {checkpoint_path.name}")
            return model
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["meta"]["epoch"] + 1
        report(f"{job.name} (seed {job.train_seed}): resuming from the checkpoint of epoch {start_epoch}/{job.epochs}")

    n = epoch_length(job.sampling, data.class_counts.tolist())  # images per epoch
    if n < world:
        raise CBDError(f"{n} training images cannot be shared by {world} processes")
    batch_size, steps_per_epoch = epoch_steps(n, job.batch_size, world)
    epoch_batches = data.batches(job, batch_size, steps_per_epoch, device, rank, world)
    train_model = distributed.wrap(model, device, sync_bn)  # DDP under torchrun, else the model itself
    log_prior = torch.log(data.class_counts.clamp_min(1) / data.class_counts.sum())
    teachers = teachers or []
    # The frozen teachers' forwards: one grouped forward on a GPU (several launches saved per step).
    teacher_forward = TeacherFeatures(teachers, grouped=device.type == "cuda").to(device) if teachers else None
    if should_compile(use_compile, device, steps_per_epoch * (job.epochs - start_epoch), precision):
        train_model = compile_for_training(train_model)
        if teacher_forward is not None:
            teacher_forward = compile_for_training(teacher_forward)

    progress = ModelProgress(f"{job.name} seed {job.train_seed}", job.epochs, start_epoch, quiet or not main)
    finished = False
    try:
        for epoch in range(start_epoch, job.epochs):
            t0 = time.perf_counter()
            model.train()
            if not job.train_backbone and job.decoupled_bn == "frozen":
                # Keep the backbone's BatchNorm statistics; under "train" (Kang et al.) they are
                # re-estimated on the re-training batches while its weights stay frozen.
                model.backbone.eval()
                if model.projection is not None:
                    model.projection.eval()
            sums = torch.zeros(4, device=device)  # loss, ce, distill, correct
            lr = job.lr
            for step, (x, labels) in enumerate(epoch_batches(epoch)):
                lr = lr_at(job.schedule, job.lr, epoch, step, steps_per_epoch, job.epochs, job.warmup_epochs)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, ce, distill, logits = _step_loss(job, train_model, x, labels, teachers, log_prior, precision,
                                                     teacher_forward)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sums += torch.stack([loss.detach(), ce.detach(), distill.detach(),
                                     (logits.detach().argmax(1) == labels).sum().float()])
                if (step + 1) % check_every == 0 and not _finite_everywhere(sums[0]):
                    _non_finite(job, stage, epoch, step)
            totals = distributed.all_reduce_sum(sums).tolist()  # one host sync per epoch
            if not np.isfinite(totals[0]):
                _non_finite(job, stage, epoch, steps_per_epoch - 1)
            distributed.broadcast_buffers(model)  # rank 0's BatchNorm statistics everywhere
            val_acc = _balanced_val_accuracy(model, data, device)
            mean_over = steps_per_epoch * world  # each rank added one mean loss per step
            record = {
                "model": job.name, "seed": job.train_seed, "stage": stage, "epoch": epoch + 1,
                "loss": totals[0] / mean_over, "ce": totals[1] / mean_over,
                "distill": totals[2] / mean_over if job.loss == "cbd" else None,
                "train_acc": totals[3] / (steps_per_epoch * batch_size), "val_acc": val_acc, "lr": lr,
                "steps": steps_per_epoch, "time_s": round(time.perf_counter() - t0, 3),
            }
            complete = epoch + 1 == job.epochs
            if main:
                ckpt.save_checkpoint(
                    checkpoint_path,
                    spec=job.spec.to_dict(),
                    meta={**meta, "job": job.identity(), "epoch": epoch, "complete": complete},
                    model=model.state_dict(),
                    optimizer=None if complete else optimizer.state_dict(),
                )
                if history_path is not None:
                    runs.append_history(history_path, record)
            line = (f"{job.name} seed {job.train_seed} epoch {epoch + 1}/{job.epochs}: loss {record['loss']:.4f}"
                    + (f" (ce {record['ce']:.4f}, distill {record['distill']:.4f})" if job.loss == "cbd" else "")
                    + f", train acc {record['train_acc']:.3f}, val acc {val_acc:.3f}, lr {lr:.4g}")
            progress.epoch_done(line, record["time_s"], {"loss": f"{record['loss']:.3f}", "val": f"{val_acc:.3f}"})
            distributed.barrier()  # the others wait until rank 0 has written the epoch
        finished = True
    finally:
        progress.close(finished)
    return model


def _step_loss(job: Job, model: Network, x, labels, teachers, log_prior, precision: str, teacher_forward=None):
    """Loss terms of one (local) batch. ``model`` may be DDP-wrapped; with a frozen backbone
    (``job.train_backbone`` False) its parameters do not require grad, so the forward
    builds a graph for the classifier only. ``teachers`` are the frozen teachers, whose
    features ``teacher_forward`` (a ``TeacherFeatures``) computes in one go."""
    with autocast(x.device, precision):
        features, logits = model(x)
    teacher_features = teacher_logits = None
    if job.loss == "cbd":
        forward = teacher_forward if teacher_forward is not None else TeacherFeatures(teachers, grouped=False)
        with torch.no_grad(), autocast(x.device, precision):
            teacher_features = forward(x)
            if job.logit_distill_weight > 0:
                teacher_logits = forward.logits(teacher_features)
    loss, ce, distill = job_loss(job, features, logits, labels, log_prior, teacher_features, teacher_logits)
    return loss, ce, distill, logits.float()


def _non_finite(job: Job, stage: str, epoch: int, step: int):
    raise NonFiniteLoss(
        f"non-finite loss in stage {stage}, model {job.name} (seed {job.train_seed}), epoch {epoch + 1}, "
        f"by step {step + 1}; "
        + ("the checkpoint of the previous epoch is kept" if epoch > 0 else "no epoch had finished, so no checkpoint was written")
    )


def _finite_everywhere(value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every rank, so that all ranks stop at the same step."""
    return bool(torch.isfinite(distributed.all_reduce_sum(value.detach().clone())))


def _balanced_val_accuracy(model: Network, data: DeviceData, device: torch.device) -> float:
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
