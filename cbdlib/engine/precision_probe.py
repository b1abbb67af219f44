"""Timed training steps in float32 and bf16, for ``precision: auto`` on a CPU that offers bf16.

Each variant (``fp32``, ``bf16``, and ``fp32_compiled``, ``bf16_compiled`` where the run's
long jobs compile) trains a fresh model of the run's architecture on random images of the
run's shape and batch size: warm-up steps (the compile, when compiled), a check that every
gradient is finite, then the best of ``REPEATS`` timed repeats. A repeat lasts about
``REPEAT_S`` seconds (at least one step), so a ResNet-8 costs a few seconds per variant and a
ResNet-50 at 224 px a few steps. The result is cached under ``CBD_CACHE_DIR/precision/``,
keyed by the CPU model, torch version, thread count, architecture, batch size, image shape,
number of classes and whether compiled variants were measured: a machine measures once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.cache import cache_dir
from ..io import write_json
from ..models import ModelSpec, build_model

log = logging.getLogger("cbdlib")

WARMUP_STEPS = 2
REPEATS = 3
REPEAT_S = 1.0
# Bump when the measurement changes, so that older cached rates miss.
PROBE_VERSION = 1


def cpu_model() -> str:
    """The CPU as torch and the platform describe it: machine, host, cores and the instruction sets
    that decide bf16 (the host keeps machines apart when they share one cache folder)."""
    flags = [name for name, probe in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
             if getattr(torch.cpu, probe, lambda: False)()]
    return (f"{platform.processor() or platform.machine()} on {platform.node()}, {os.cpu_count()} cores, "
            f"{torch.backends.cpu.get_cpu_capability()}{''.join(' +' + f for f in flags)}")


def probe_key(probe: dict, compiled: bool) -> dict:
    return {"probe_version": PROBE_VERSION, "cpu": cpu_model(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "arch": probe["arch"], "batch_size": int(probe["batch_size"]),
            "image_shape": [int(v) for v in probe["image_shape"]], "num_classes": int(probe["num_classes"]),
            "compiled": bool(compiled)}


def cached_rates(probe: dict, compiled: bool, measure: Callable[..., dict]) -> tuple[dict, dict, bool]:
    """(rates, key, whether they came from the cache): measured once per key, then read back."""
    key = probe_key(probe, compiled)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / "precision" / f"{digest}.json"
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["rates"], key, True
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # absent or damaged: measured again below
    rates = measure(probe, compiled)
    write_json(path, {"key": key, "rates": rates})
    return rates, key, False


def measure_step_rates(probe: dict, compiled: bool) -> dict:
    """``{variant: {"img_per_s", "finite"}}`` for fp32 and bf16, eager (and compiled).

    The variants are timed in turns (a repeat of each, then the next repeat of each), so that a
    change of load on a shared machine falls on all of them alike; each keeps its best repeat.
    """
    variants = [("fp32", False), ("bf16", False)]
    if compiled:
        variants += [("fp32", True), ("bf16", True)]
    steppers = {precision + ("_compiled" if compile_it else ""): _Stepper(probe, precision, compile_it)
                for precision, compile_it in variants}
    steps = {}
    for name, stepper in list(steppers.items()):
        try:
            steps[name] = stepper.warm_up()
        except Exception as exc:  # a compile that fails here (no C++ compiler, ...) rules that variant out
            if not stepper.compiled:
                raise
            log.warning("precision probe: %s could not run (%s); it is left out", name, str(exc).splitlines()[0])
            del steppers[name]
    best = dict.fromkeys(steppers, 0.0)
    for _ in range(REPEATS):
        for name, stepper in steppers.items():
            best[name] = max(best[name], stepper.rate(steps[name]))
    return {name: {"img_per_s": round(best[name], 1), "finite": stepper.sound and stepper.finite()}
            for name, stepper in steppers.items()}


class _Stepper:
    """One variant's model, optimiser and random batch, stepping in its precision."""

    def __init__(self, probe: dict, precision: str, compiled: bool):
        self.batch = int(probe["batch_size"])
        self.precision = precision
        with torch.random.fork_rng(devices=[]):  # the same start for every variant; the global RNG untouched
            torch.manual_seed(0)
            self.model = build_model(ModelSpec(probe["arch"], int(probe["num_classes"]), "cosine"))
        self.model = self.model.to(memory_format=torch.channels_last)
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(self.batch, *probe["image_shape"], generator=generator)
        self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, int(probe["num_classes"]), (self.batch,), generator=generator)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.compiled = compiled
        self.step_model = torch.compile(self.model) if compiled else self.model
        self.sound = True

    def step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            _, logits = self.step_model(self.x)
        loss = F.cross_entropy(logits.float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p.grad).all()) for p in self.model.parameters() if p.grad is not None)

    def warm_up(self) -> int:
        """Warm-up steps (the compile, when compiled), the finite-gradient check after them, and
        the number of steps a repeat of about ``REPEAT_S`` seconds takes."""
        for _ in range(WARMUP_STEPS):
            self.step()
        # Checked after the first steps, where the compiled bf16 backward went wrong, and again at the end.
        self.sound = self.finite()
        start = time.perf_counter()
        self.step()
        return max(1, round(REPEAT_S / max(time.perf_counter() - start, 1e-6)))

    def rate(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * self.batch / (time.perf_counter() - start)
