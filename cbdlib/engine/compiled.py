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

import warnings

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


def compile_for_training(module: nn.Module, backend="inductor") -> "CompiledOrEager":
    """The module behind ``torch.compile`` (same parameters and buffers, plain state dict); if
    compiling fails, the eager module (see :class:`CompiledOrEager`)."""
    return CompiledOrEager(module, torch.compile(module, backend=backend))


class CompiledOrEager:
    """Calls the compiled module; when its first call fails (compiling happens there: no C++
    compiler, no Triton, an unsupported op), warns once and runs the eager module from then on,
    so a run does not end over a speed-up. A genuine error of the model fails again in eager.
    Only the forward call is guarded: a backward that fails to compile still stops the run.
    Other attributes are the eager module's (as ``torch.compile``'s wrapper forwards them)."""

    def __init__(self, module: nn.Module, compiled):
        self.module, self.compiled, self.proven = module, compiled, False

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.module(*args, **kwargs)
        if self.proven:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as error:  # any failure of the first compiled call
            reason = " ".join(line.strip() for line in str(error).strip().splitlines()[:2])[:300]  # error, cause
            name = getattr(self.module, "__qualname__", type(self.module).__name__)
            warnings.warn(f"torch.compile failed ({type(error).__name__}: {reason}); running {name} in eager mode "
                          "instead", RuntimeWarning, stacklevel=2)
            self.compiled = None
            return self.module(*args, **kwargs)
        self.proven = True
        return out

    def __getattr__(self, name):
        if name == "module":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)
