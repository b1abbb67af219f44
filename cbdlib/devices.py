"""Which device a run uses, and the memory layout its convolutions prefer there."""
from __future__ import annotations

import contextlib

import torch

from .errors import CBDError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without CUDA, or a GPU this machine
    lacks, is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CBDError(f"device {name!r} asked for, but CUDA is not available here; use device: auto or cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CBDError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CBDError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s) (cuda:0..)")
    return device


def use_channels_last(device: torch.device) -> bool:
    """channels_last for convolutions: faster on CUDA and on this project's CPUs (oneDNN), see
    docs/performance.md."""
    return device.type in ("cuda", "cpu")


def place(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` moved to ``device``, its convolution weights channels_last where batches are."""
    module.to(device)
    if use_channels_last(device):
        module.to(memory_format=torch.channels_last)
    return module


@contextlib.contextmanager
def exact_float32():
    """Float32 convolutions and matrix products without TF32 while the block runs (evaluation).

    cuDNN runs float32 convolutions in TF32 by default on Ampere and newer GPUs (10-bit
    mantissa); turned off here, a saved model scores the same on any device. The flags
    only act on CUDA, so they are set on every device (and restored after).
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def tuned_convolutions(device: torch.device):
    """cuDNN's benchmark mode while training on CUDA: training's batch shapes are fixed, so the
    fastest algorithm found for each shape on its first use is reused for the whole run.
    The choice is timed, so two runs may pick different algorithms (not bit-exact)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved
