"""``torch.compile`` for the training step, only where it repays its compile time.

Inductor fuses each BatchNorm + ReLU (+ residual add) into the convolution's neighbours and
writes the backward as one generated C++/CUDA kernel per fusion group; on the 2-core CPU
that shortens a step of a CIFAR ResNet (docs/performance.md), but the first step of every
new model pays a compile of tens of seconds. ``torch_compile: null`` (the default) therefore
compiles a job only when it has at least ``MIN_STEPS`` optimiser steps left. A bf16 job on a
CPU compiles only where ``precision: auto`` measured compiled bf16 with finite gradients and
faster than eager (``PrecisionChoice.compile_setting``): with torch 2.14's inductor, the compiled
bf16 backward of ResNet-20 and ResNet-32 gave NaN gradients from the first step on an
AVX512-BF16 Xeon VM, and was sound on an AMD Zen 4. The compiled
wrapper shares its parameters with the plain module, which is what checkpoints save (plain
state-dict keys); evaluation runs the plain module.
"""
from __future__ import annotations

import torch
import torch.nn as nn

# About 20 epochs of CIFAR-10-LT at batch 128 (96 steps each): long enough to repay a compile.
MIN_STEPS = 2000


def should_compile(setting: bool | None, device: torch.device, steps: int) -> bool:
    """Whether to compile a job of ``steps`` optimiser steps: ``setting`` True / False, or
    None for "when ``steps >= MIN_STEPS``". Never on devices inductor does not serve."""
    if device.type not in ("cpu", "cuda") or setting is False:
        return False
    if setting is None:
        return steps >= MIN_STEPS
    return True


def compile_for_training(module: nn.Module) -> nn.Module:
    """The module behind ``torch.compile`` (same parameters and buffers, plain state dict)."""
    return torch.compile(module)
