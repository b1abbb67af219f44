"""Which device a run uses, and the memory layout its convolutions prefer there."""
from __future__ import annotations

import torch

from .errors import CBDError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without CUDA is a clear error."""
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
