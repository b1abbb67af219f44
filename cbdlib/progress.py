"""Where a long run stands: per-model progress in the engine, and the plan whose cost model weighs
``cbdlib run``'s ETA.

* A terminal (``python -m cbdlib.train``) or a Jupyter kernel opened by a person: one tqdm bar per
  model (seconds per epoch, loss, validation accuracy), and one line when the model is done.
* ``python -m cbdlib run``: nobody sees a kernel's output until its notebook ends, so the command
  follows ``plan.json`` and ``history.jsonl`` itself (``pipeline/follow.py``); the kernels then
  print one line per finished model and no bars.
* No bars under the smoke profile.

The ETA weighs epochs by their cost in "plain steps": a step that trains a whole network is 1; a
backbone forward only (cRT / LWS on a frozen backbone) costs ``FORWARD_COST``; a distillation step
adds ``FORWARD_COST`` per frozen teacher.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .io import write_json

log = logging.getLogger("cbdlib")

# Cost of an inference forward relative to one training step (forward + backward + update).
# Measured on the 2-core CPU at batch 128: 0.27-0.30 for ResNet-8 and ResNet-32, fp32 and bf16
# (docs/performance.md).
FORWARD_COST = 0.3
# ``python -m cbdlib run`` sets this in the kernels' environment: the command shows progress.
PROGRESS_ENV = "CBD_PROGRESS"
PLAN_FILE = "plan.json"


@dataclass
class PlannedModel:
    """One model of a run as the ETA sees it."""

    model: str
    seed: int
    stage: str
    epochs: int
    steps_per_epoch: int
    cost_per_step: float  # in plain training steps

    @property
    def epoch_cost(self) -> float:
        return self.steps_per_epoch * self.cost_per_step

    @property
    def key(self) -> tuple:
        return self.model, self.seed, self.stage


def step_cost(train_backbone: bool = True, teachers: int = 0) -> float:
    """Cost of one optimiser step in plain training steps (see the module docstring)."""
    return (1.0 if train_backbone else FORWARD_COST) + FORWARD_COST * teachers


def write_plan(run_dir: Path, plan: list[PlannedModel]) -> None:
    write_json(Path(run_dir) / PLAN_FILE, {"models": [asdict(p) for p in plan]})


def read_plan(run_dir: Path) -> list[PlannedModel] | None:
    try:
        return [PlannedModel(**entry) for entry in json.loads((Path(run_dir) / PLAN_FILE).read_text())["models"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- the engine's side: one model -------------------------------------------------------------

def kernel_mode() -> str:
    """``bar`` or ``lines``: how the engine reports epochs in this process."""
    if os.environ.get(PROGRESS_ENV) != "parent" and ("ipykernel" in sys.modules or sys.stderr.isatty()):
        return "bar"
    return "lines"  # also under cbdlib run, which follows the run folder and shows the bar itself


class ModelProgress(contextlib.AbstractContextManager):
    """Progress of one model's training: a bar (terminal / Jupyter) or nothing until it ends.

    Every epoch's full line goes to the log at DEBUG level (history.jsonl keeps the same
    numbers); at INFO the model's end is one line.
    """

    def __init__(self, label: str, epochs: int, start_epoch: int, quiet: bool, bar: bool = True):
        self.epochs, self.start_epoch = epochs, start_epoch
        self.seconds = 0.0
        self.last_line = ""
        self.bar = None
        if bar and not quiet and kernel_mode() == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=epochs, initial=start_epoch, desc=label, unit="epoch", leave=False,
                            dynamic_ncols=True)

    def epoch_done(self, line: str, seconds: float, postfix: dict) -> None:
        self.seconds += seconds
        self.last_line = line
        log.debug(line)
        if self.bar is not None:
            self.bar.set_postfix({"s/epoch": f"{seconds:.1f}", **postfix}, refresh=False)
            self.bar.update(1)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finished=exc_type is None)

    def close(self, finished: bool) -> None:
        if self.bar is not None:
            self.bar.close()
        ran = self.epochs - self.start_epoch
        if finished and ran > 0:  # also under smoke: one line per model is not noise
            per_epoch = self.seconds / ran
            log.info(f"{self.last_line} [{ran} epochs in {self.seconds:.0f} s, {per_epoch:.1f} s/epoch]")
