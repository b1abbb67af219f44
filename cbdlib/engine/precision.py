"""The precision policy: which dtype the training step's matrix work runs in.

``precision: auto`` picks bf16 autocast where the hardware computes bf16 natively (CUDA
devices that report it; CPUs with AMX or AVX512-BF16) and float32 elsewhere: on a CPU
without those units bf16 is emulated and slower than float32. ``bf16`` and ``fp32`` force
one or the other. Cosine logits, the distillation term and the loss are float32 in every
case (the heads and losses turn autocast off), and evaluation always runs in float32, so a
saved model scores the same whichever precision trained it.
"""
from __future__ import annotations

import contextlib

import torch

from ..config import PRECISIONS
from ..errors import CBDError


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16, as torch's own CPU probes report them (torch >= 2.3 has both)."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None:
            try:
                if check():
                    return True
            except RuntimeError:
                pass
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
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision == "bf16"``, a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
