"""The precision policy: which dtype the training step's matrix work runs in.

``precision: bf16`` or ``fp32`` force one or the other. ``auto``:

- on CUDA, bf16 autocast where the GPU computes bf16 natively (compute capability 8.0 or
  newer: A100, H100, ...; ``torch.cuda.is_bf16_supported`` also counts emulation);
- on a CPU without bf16 instructions (neither AMX nor AVX512-BF16), float32;
- on a CPU with them, **a measurement**: a few timed training steps of the run's own
  architecture, batch size and image shape in float32 and in bf16 (eager, and compiled too
  where the run's long jobs compile), cached per CPU model, torch version, threads, architecture,
  batch size and image shape (``precision_probe.py``). bf16 wins only when it is at least
  ``MARGIN`` times as fast as the faster float32 variant and its gradients are finite. The
  CPUs seen so far differ: bf16 was 1.45x float32 on an AMD Zen 4 with AVX512-BF16, 10-25%
  *slower* on an Intel Emerald Rapids VM with AVX512-BF16 but no AMX (docs/performance.md).
- under the smoke profile, or with ``CBD_PRECISION_MEASURE=0`` (the test suite sets it), float32
  without measuring: tests compare numbers across runs and machines, and a choice made by timing
  would make them depend on the load of the moment.

Cosine logits, the distillation term and the loss are float32 in every case (the heads and
losses turn autocast off), and evaluation always runs in float32, so a saved model scores the
same whichever precision trained it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import CBDError
from ..param_rules import PRECISIONS

log = logging.getLogger("cbdlib")

# bf16 must be at least 10% faster than float32 to be chosen: repeated measurements of one
# configuration on the 2-core CPUs spread by about 5%, and float32 is the exact one.
MARGIN = 1.10
MEASURE_ENV = "CBD_PRECISION_MEASURE"


def cpu_has_bf16_matrix_units() -> bool:
    """AMX tiles, as torch's own CPU probe reports them (torch >= 2.3)."""
    return _torch_cpu_probe("_is_amx_tile_supported")


def cpu_offers_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware at all: AMX tiles or AVX512-BF16 dot products."""
    return cpu_has_bf16_matrix_units() or _torch_cpu_probe("_is_avx512_bf16_supported")


def _torch_cpu_probe(name: str) -> bool:
    check = getattr(torch.cpu, name, None)
    try:
        return bool(check and check())
    except RuntimeError:
        return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Compute capability 8.0 or newer (Ampere on): bf16 tensor cores, not emulation."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``precision`` resolved to, and why."""

    precision: str                  # what the training steps compute in: bf16 | fp32
    reason: str                     # one line, for logs and summary.md
    compile_bf16: bool = False      # compiled bf16 steps passed the finite-gradient check on this CPU
    measurement: dict | None = field(default=None)  # the rates behind an ``auto`` decided by measuring

    def compile_setting(self, torch_compile: bool | None, device: torch.device) -> bool | None:
        """The ``torch_compile`` value the jobs get: ``None`` ("when long enough") does not compile
        bf16 steps on a CPU unless the measurement found compiled bf16 sound and faster there
        (torch 2.14's inductor gave NaN bf16 gradients on an Emerald Rapids VM)."""
        if torch_compile is None and device.type == "cpu" and self.precision == "bf16" and not self.compile_bf16:
            return False
        return torch_compile

    def record(self) -> dict:
        """The ``precision_choice`` record of metrics.json (``precision`` itself sits beside it)."""
        out = {"precision": self.precision, "reason": self.reason, "compile_bf16": self.compile_bf16}
        if self.measurement is not None:
            out["measurement"] = self.measurement
        return out

    @classmethod
    def from_record(cls, record: dict) -> "PrecisionChoice":
        return cls(precision=record["precision"], reason=record.get("reason", ""),
                   compile_bf16=bool(record.get("compile_bf16", False)), measurement=record.get("measurement"))


def decide(rates: dict[str, dict], margin: float = MARGIN) -> PrecisionChoice:
    """The precision a CPU run takes from measured step rates.

    ``rates``: variant -> ``{"img_per_s": float, "finite": bool}`` for the variants ``fp32`` and
    ``bf16`` (eager) and, where the run compiles, ``fp32_compiled`` and ``bf16_compiled``.
    """
    fp32 = [r["img_per_s"] for v, r in rates.items() if v.startswith("fp32")]
    if not fp32 or not any(v.startswith("bf16") for v in rates):
        raise CBDError(f"precision: a float32 and a bf16 rate are needed to choose, got {sorted(rates)}")
    fp32_best = max(fp32)
    notes = []
    if "bf16_compiled" in rates and not rates["bf16_compiled"]["finite"]:
        notes.append("compiled bf16 gave non-finite gradients on this CPU, so bf16 could only run eager")
    sound = {v: r["img_per_s"] for v, r in rates.items() if v.startswith("bf16") and r["finite"]}
    if not sound:
        return PrecisionChoice("fp32", "; ".join(notes + ["bf16 gave non-finite gradients: fp32"]))
    best = max(sound, key=sound.get)
    ratio = sound[best] / fp32_best
    if ratio >= margin:
        what = "compiled bf16" if best == "bf16_compiled" else "eager bf16"
        notes.append(f"{what} measured {ratio:.2f}x the faster fp32 (margin {margin:.2f}x): bf16")
        return PrecisionChoice("bf16", "; ".join(notes), compile_bf16=best == "bf16_compiled")
    notes.append(f"bf16 measured {ratio:.2f}x the faster fp32, below the {margin:.2f}x margin: fp32")
    return PrecisionChoice("fp32", "; ".join(notes))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32`` by the rules that need no measurement (a CPU that offers bf16 and asks
    for ``auto`` is measured by ``choose_precision``; here it counts as fp32)."""
    return _by_rule(precision, device).precision


def _by_rule(precision: str, device: torch.device) -> PrecisionChoice:
    if precision not in PRECISIONS:
        raise CBDError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return PrecisionChoice(precision, f"precision: {precision} set by the parameter")
    if device.type == "cuda":
        if cuda_has_native_bf16(device):
            return PrecisionChoice("bf16", "CUDA GPU with native bf16 (compute capability >= 8.0)", compile_bf16=True)
        return PrecisionChoice("fp32", "CUDA GPU without native bf16 (compute capability < 8.0)")
    if device.type == "cpu" and not cpu_offers_bf16():
        return PrecisionChoice("fp32", "this CPU has neither AMX nor AVX512-BF16")
    return PrecisionChoice("fp32", f"fp32 on {device.type}")


def choose_precision(precision: str, device: torch.device, *, probe: dict, compiled: bool, smoke: bool,
                     measure: Callable[..., dict] | None = None) -> PrecisionChoice:
    """What a run with ``precision`` computes in on ``device``.

    ``probe``: ``arch``, ``batch_size``, ``num_classes``, ``image_shape`` of the run's models;
    ``compiled``: whether its long jobs compile (then the compiled variants are measured too).
    ``measure`` replaces the timing (tests inject rates through it).
    """
    if precision != "auto" or device.type != "cpu" or not cpu_offers_bf16():
        return _by_rule(precision, device)
    if smoke:
        return PrecisionChoice("fp32", "smoke profile: fp32 without measuring (tests must not depend on timing)")
    if os.environ.get(MEASURE_ENV, "1").strip() == "0":
        return PrecisionChoice("fp32", f"{MEASURE_ENV}=0: fp32 without measuring")
    from . import precision_probe

    rates, key, cached = precision_probe.cached_rates(probe, compiled, measure or precision_probe.measure_step_rates)
    choice = decide(rates)
    measurement = {"rates": rates, "margin": MARGIN, "cached": cached, "key": key}
    choice = PrecisionChoice(choice.precision, choice.reason, choice.compile_bf16, measurement)
    log.info("precision auto: %s", choice.reason)
    return choice


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision == "bf16"``, a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def choice_lines(choice: dict | None) -> list[str]:
    """``summary.md``'s lines on a recorded choice: why the run computes in its precision, and the
    measured step rates behind ``auto``."""
    if not choice:
        return []
    lines = [f"  - why: {choice.get('reason', 'not recorded')}"]
    measurement = choice.get("measurement")
    if measurement:
        rates = ", ".join(f"{variant} {r['img_per_s']:,.0f} img/s{'' if r['finite'] else ' (non-finite gradients)'}"
                          for variant, r in measurement["rates"].items())
        key = measurement.get("key", {})
        lines.append(f"  - measured training steps ({key.get('arch')}, batch {key.get('batch_size')}, "
                     f"{key.get('threads')} threads, {key.get('cpu')}{'; cached' if measurement.get('cached') else ''})"
                     f": {rates}")
    return lines
