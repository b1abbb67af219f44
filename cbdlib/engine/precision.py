"""The precision policy: which dtype the training step's matrix work runs in.

``precision: auto`` picks bf16 autocast where the hardware has bf16 matrix units (CUDA
devices that report bf16; CPUs with AMX tiles) and float32 elsewhere. On a CPU with
AVX512-BF16 but no AMX, bf16 autocast measured 10-25% *slower* than float32 for the CIFAR
ResNets (docs/performance.md): the dot-product instructions do not pay for the casts at
16-64 channels, so such CPUs train in float32 too. ``bf16`` and ``fp32`` force one or the
other. Cosine logits, the distillation term and the loss are float32 in every
case (the heads and losses turn autocast off), and evaluation always runs in float32, so a
saved model scores the same whichever precision trained it.
"""
from __future__ import annotations

import contextlib

import torch

from ..config import PRECISIONS
from ..errors import CBDError


def cpu_has_bf16_matrix_units() -> bool:
    """AMX tiles, as torch's own CPU probe reports them (torch >= 2.3)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check and check())
    except RuntimeError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32``: what a run with ``precision`` computes in on ``device``."""
    if precision not in PRECISIONS:
        raise CBDError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16_matrix_units() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision == "bf16"``, a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
