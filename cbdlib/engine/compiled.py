"""``torch.compile`` for the training step, only where it repays its compile time.

Inductor fuses each BatchNorm + ReLU (+ residual add) into the convolution's neighbours and
writes the backward as one generated C++/CUDA kernel per fusion group; on the 2-core CPU
that shortens a step of a CIFAR ResNet (docs/performance.md), but the first step of every
new model pays a compile of tens of seconds. ``torch_compile: null`` (the default) therefore
compiles a job only when it has at least ``MIN_STEPS`` optimiser steps left, and never a
bf16 job on a CPU: with torch 2.14's inductor, the compiled bf16 backward of ResNet-20 and
ResNet-32 gave NaN gradients from the first step on an AVX512-BF16 Xeon (ResNet-8 did not;
eager bf16 and compiled float32 are fine), so only ``torch_compile: true`` compiles it. The compiled
wrapper shares its parameters with the plain module, which is what checkpoints save (plain
state-dict keys); evaluation runs the plain module.
"""
from __future__ import annotations

import torch
import torch.nn as nn

# About 20 epochs of CIFAR-10-LT at batch 128 (96 steps each): long enough to repay a compile.
MIN_STEPS = 2000


def should_compile(setting: bool | None, device: torch.device, steps: int, precision: str) -> bool:
    """Whether to compile a job of ``steps`` optimiser steps: ``setting`` True / False, or
    None for "when ``steps >= MIN_STEPS``, unless bf16 on a CPU". Never on devices inductor
    does not serve."""
    if device.type not in ("cpu", "cuda") or setting is False:
        return False
    if setting is None:
        return steps >= MIN_STEPS and not (device.type == "cpu" and precision == "bf16")
    return True


def compile_for_training(module: nn.Module) -> nn.Module:
    """The module behind ``torch.compile`` (same parameters and buffers, plain state dict)."""
    return torch.compile(module)
