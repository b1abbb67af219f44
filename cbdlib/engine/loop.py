"""The training loop: one model, data resident on the device, batched augmentation.

Each epoch draws its indices and augmentation randomness from generators seeded by
(model seed, epoch), so a run resumed from a checkpoint continues exactly as an
uninterrupted one would. Losses are accumulated on the device and read once per
``check_every`` steps (no host sync per step); a non-finite loss stops the run with
the stage, step and model named, leaving the last good checkpoint in place.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import checkpoint as ckpt
from ..augment import BatchAugmenter, aug_config, vanilla_config
from ..data.samplers import IndexSampler
from ..distill import feature_distillation_loss, logit_distillation_loss
from ..errors import CBDError
from ..io import append_line
from ..models import ModelSpec, Network, build_model
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
    sampling: str = "instance"    # instance | class_balanced
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


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CBDError(f"device {name!r} asked for, but CUDA is not available here; use device: auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CBDError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def progress_enabled(quiet: bool) -> bool:
    """Bars in a terminal or a Jupyter kernel; none under smoke or when output is a file."""
    if quiet:
        return False
    return "ipykernel" in sys.modules or sys.stderr.isatty()


def report(message: str, bar=None) -> None:
    if bar is not None:
        bar.write(message)
    else:
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
    """(features, logits) of uint8 images, in eval mode and without augmentation."""
    model.eval()
    normalise = BatchAugmenter(None, mean, std, channels_last=device.type == "cuda")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        x = normalise(images[start:start + batch_size].to(device), None)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
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
) -> Network:
    """Train ``model`` for ``job`` (resuming from ``checkpoint_path`` when it holds a partial run)."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if not job.train_backbone:
        params = [p for p in model.classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay,
        foreach=device.type == "cuda" or None,
    )
    start_epoch = 0
    if checkpoint_path.exists() or ckpt.previous_path(checkpoint_path).exists():
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

    augment_cfg = aug_config(data.train_images.shape[1]) if job.augment == "aug" else vanilla_config(data.train_images.shape[1])
    augmenter = BatchAugmenter(augment_cfg, data.mean, data.std, channels_last=device.type == "cuda")
    sampler = IndexSampler(
        data.train_labels, job.sampling, num_classes=data.num_classes, total_epochs=job.epochs,
        generator_seed=job.seed, device=device,
    )
    n = len(sampler)
    batch_size = min(job.batch_size, n)
    steps_per_epoch = n // batch_size  # the last partial batch is dropped: static shapes
    log_prior = torch.log(data.class_counts.clamp_min(1) / data.class_counts.sum())
    teachers = teachers or []
    use_amp = device.type == "cuda"

    bar = None
    if progress_enabled(quiet):
        from tqdm.auto import tqdm

        bar = tqdm(total=job.epochs, initial=start_epoch, desc=f"{job.name} s{job.train_seed}", leave=False)
    try:
        for epoch in range(start_epoch, job.epochs):
            t0 = time.perf_counter()
            model.train()
            if not job.train_backbone:
                model.backbone.eval()  # frozen BatchNorm statistics while re-training a classifier
                if model.projection is not None:
                    model.projection.eval()
            indices = sampler.epoch_indices(epoch)
            generator = make_generator(device, derive_seed(job.seed, "augment", epoch))
            sums = torch.zeros(4, device=device)  # loss, ce, distill, correct
            lr = job.lr
            for step in range(steps_per_epoch):
                lr = lr_at(job.schedule, job.lr, epoch, step, steps_per_epoch, job.epochs, job.warmup_epochs)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = indices[step * batch_size:(step + 1) * batch_size]
                labels = data.train_labels[batch]
                x = augmenter(data.train_images[batch], generator)
                loss, ce, distill, logits = _step_loss(job, model, x, labels, teachers, log_prior, use_amp)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sums += torch.stack([loss.detach(), ce.detach(), distill.detach(),
                                     (logits.detach().argmax(1) == labels).sum().float()])
                if (step + 1) % check_every == 0 and not bool(torch.isfinite(sums[0])):
                    _non_finite(job, stage, epoch, step)
            totals = sums.tolist()  # one host sync per epoch
            if not np.isfinite(totals[0]):
                _non_finite(job, stage, epoch, steps_per_epoch - 1)
            val_acc = _balanced_val_accuracy(model, data, device)
            record = {
                "model": job.name, "seed": job.train_seed, "stage": stage, "epoch": epoch + 1,
                "loss": totals[0] / steps_per_epoch, "ce": totals[1] / steps_per_epoch,
                "distill": totals[2] / steps_per_epoch if job.loss == "cbd" else None,
                "train_acc": totals[3] / (steps_per_epoch * batch_size), "val_acc": val_acc, "lr": lr,
                "time_s": round(time.perf_counter() - t0, 3),
            }
            complete = epoch + 1 == job.epochs
            ckpt.save_checkpoint(
                checkpoint_path,
                spec=job.spec.to_dict(),
                meta={**meta, "job": job.identity(), "epoch": epoch, "complete": complete},
                model=model.state_dict(),
                optimizer=None if complete else optimizer.state_dict(),
            )
            if history_path is not None:
                append_line(history_path, json.dumps(record))
            line = (f"{job.name} seed {job.train_seed} epoch {epoch + 1}/{job.epochs}: loss {record['loss']:.4f}"
                    + (f" (ce {record['ce']:.4f}, distill {record['distill']:.4f})" if job.loss == "cbd" else "")
                    + f", train acc {record['train_acc']:.3f}, val acc {val_acc:.3f}, lr {lr:.4g}")
            report(line, bar)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return model


def _step_loss(job: Job, model: Network, x, labels, teachers, log_prior, use_amp: bool):
    device_type = x.device.type
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_amp):
        if job.train_backbone:
            features, logits = model(x)
        else:
            with torch.no_grad():
                pooled = model.backbone(x)
                if model.projection is not None:
                    pooled = model.projection(pooled)
            features, logits = pooled, model.classifier(pooled.float())
    logits = logits.float()
    zero = logits.new_zeros(())
    if job.loss == "balanced_softmax":
        # Ren et al. 2020: train on logits shifted by the log class prior, predict with plain logits.
        ce = F.cross_entropy(logits + log_prior, labels)
        return ce, ce, zero, logits
    ce = F.cross_entropy(logits, labels)
    if job.loss == "ce":
        return ce, ce, zero, logits
    if job.loss != "cbd":
        raise CBDError(f"unknown loss {job.loss!r}")
    with torch.no_grad(), torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_amp):
        outputs = [teacher(x) for teacher in teachers]
    teacher_features = [f.float() for f, _ in outputs]
    if model.projection is None and len(teacher_features) > 1:
        # Without a projection the student's feature cannot match a concatenation:
        # distil towards the normalised mean of the teachers' normalised features.
        teacher_features = [torch.stack([F.normalize(t, dim=1) for t in teacher_features]).mean(0)]
    distill = feature_distillation_loss(features.float(), teacher_features)
    loss = (1.0 - job.alpha) * ce + job.alpha * job.beta * distill
    if job.logit_distill_weight > 0:
        loss = loss + job.logit_distill_weight * logit_distillation_loss(
            logits, [z for _, z in outputs], job.logit_distill_temperature)
    return loss, ce, distill, logits


def _non_finite(job: Job, stage: str, epoch: int, step: int):
    raise NonFiniteLoss(
        f"non-finite loss in stage {stage}, model {job.name} (seed {job.train_seed}), epoch {epoch + 1}, "
        f"by step {step + 1}; the last good checkpoint is kept"
    )


def _balanced_val_accuracy(model: Network, data: DeviceData, device: torch.device) -> float:
    if len(data.val_labels) == 0:
        return float("nan")
    _, logits = predict(model, data.val_images, data.mean, data.std, device)
    from ..metrics import balanced_accuracy

    return balanced_accuracy(logits, data.val_labels.cpu().numpy())
