"""Where a long run stands: per-model progress in the engine, a whole-run bar in ``cbdlib run``.

Three places show progress, each in the form its output can take:

* a terminal (``python -m cbdlib.train``) or a Jupyter kernel opened by a person: one tqdm
  bar per model (tqdm's notebook bar in Jupyter) with seconds per epoch, loss and
  validation accuracy, and one line when the model is done;
* ``python -m cbdlib run``: the notebooks run in kernels whose output nobody sees until the
  notebook ends, so the command itself follows the run folder's ``plan.json`` and
  ``history.jsonl`` and draws one bar for the whole run (model, seed, epoch, seconds per
  epoch, an ETA that weighs each epoch by its cost), or, when its output is not a
  terminal (CI, ``nohup``), prints one plain line per finished model; the kernels then
  print one line per finished model and no bars;
* nothing under the smoke profile.

The ETA weighs epochs by their cost in "plain steps": a step that trains a whole network is
1; a step that only runs the backbone forward (cRT / LWS on a frozen backbone) costs
``FORWARD_COST``; a distillation step adds ``FORWARD_COST`` per frozen teacher.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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


def step_cost(train_backbone: bool = True, teachers: int = 0) -> float:
    """Cost of one optimiser step in plain training steps (see the module docstring)."""
    return (1.0 if train_backbone else FORWARD_COST) + FORWARD_COST * teachers


def write_plan(run_dir: Path, plan: list[PlannedModel]) -> None:
    from .io import write_json

    write_json(Path(run_dir) / PLAN_FILE, {"models": [asdict(p) for p in plan]})


def read_plan(run_dir: Path) -> list[PlannedModel] | None:
    path = Path(run_dir) / PLAN_FILE
    try:
        return [PlannedModel(**entry) for entry in json.loads(path.read_text())["models"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- the engine's side: one model -------------------------------------------------------------

def kernel_mode() -> str:
    """``bar``, ``lines`` or ``quiet``: how the engine reports epochs in this process."""
    if os.environ.get(PROGRESS_ENV) == "parent":
        return "lines"  # cbdlib run follows the run folder and shows the bar itself
    if "ipykernel" in sys.modules or sys.stderr.isatty():
        return "bar"
    return "lines"


class ModelProgress:
    """Progress of one model's training: a bar (terminal / Jupyter) or nothing until it ends.

    Every epoch's full line goes to the log at DEBUG level (history.jsonl keeps the same
    numbers); at INFO the model's end is one line.
    """

    def __init__(self, label: str, epochs: int, start_epoch: int, quiet: bool, bar: bool = True):
        self.label, self.epochs, self.start_epoch = label, epochs, start_epoch
        self.quiet = quiet
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

    def __enter__(self) -> "ModelProgress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finished=exc_type is None)

    def close(self, finished: bool) -> None:
        if self.bar is not None:
            self.bar.close()
        ran = self.epochs - self.start_epoch
        if finished and ran > 0:  # also under smoke: one line per model is not noise
            per_epoch = self.seconds / ran
            log.info(f"{self.last_line} [{ran} epochs in {self.seconds:.0f} s, {per_epoch:.1f} s/epoch]")


# --- the command's side: the whole run ----------------------------------------------------------

def _history_key(record: dict) -> tuple:
    return record.get("model"), record.get("seed"), record.get("stage")


class RunFollower:
    """Follows ``plan.json`` and ``history.jsonl`` of a run folder from the ``cbdlib run`` process.

    ``mode`` is ``bar`` (a tqdm bar on stderr) or ``lines`` (one line per finished model).
    Polls the files once per ``interval`` seconds in a daemon thread; ``stop()`` ends it.
    """

    def __init__(self, run_dir: Path, mode: str, interval: float = 1.0, stream=None):
        self.run_dir = Path(run_dir)
        self.mode = mode
        self.interval = interval
        self.stream = stream or sys.stderr
        self.plan: list[PlannedModel] | None = None
        self.epochs_done: dict[tuple, int] = {}
        self.model_seconds: dict[tuple, float] = {}
        self.reported: set[tuple] = set()
        self._offset = 0
        self._partial = b""
        self._units_at_start: float | None = None
        self._t_start = time.monotonic()
        self.bar = None
        self._current: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    # bookkeeping, separate from the thread so that tests can drive it step by step
    def poll(self) -> None:
        if self.plan is None:
            self.plan = read_plan(self.run_dir)
        for record in self._new_records():
            key = _history_key(record)
            epoch = int(record.get("epoch") or 0)
            if epoch > self.epochs_done.get(key, 0):
                self.epochs_done[key] = epoch
                self.model_seconds[key] = self.model_seconds.get(key, 0.0) + float(record.get("time_s") or 0.0)
            self._current = record
        if self.plan is not None:
            self._show()

    def _new_records(self) -> list[dict]:
        path = self.run_dir / "history.jsonl"
        try:
            with open(path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except OSError:
            return []
        if len(chunk) == 0:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an unfinished line waits for the next poll
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a kill
        return records

    def total_units(self) -> float:
        return sum(p.epochs * p.epoch_cost for p in self.plan or [])

    def done_units(self) -> float:
        done = 0.0
        for p in self.plan or []:
            epochs = min(p.epochs, self.epochs_done.get((p.model, p.seed, p.stage), 0))
            done += epochs * p.epoch_cost
        return done

    def eta_seconds(self) -> float | None:
        """Seconds left at the rate this invocation has measured (None before the first epoch)."""
        if self._units_at_start is None:
            return None
        done_now = self.done_units() - self._units_at_start
        elapsed = time.monotonic() - self._t_start
        if done_now <= 0 or elapsed <= 0:
            return None
        return (self.total_units() - self.done_units()) * elapsed / done_now

    def finished_models(self) -> list[PlannedModel]:
        return [p for p in self.plan or [] if self.epochs_done.get((p.model, p.seed, p.stage), 0) >= p.epochs]

    def _show(self) -> None:
        if self._units_at_start is None:
            self._units_at_start = self.done_units()
            self._t_start = time.monotonic()
            for p in self.finished_models():  # finished before this invocation: not reported again
                self.reported.add((p.model, p.seed, p.stage))
        total, done = self.total_units(), self.done_units()
        if self.mode == "bar":
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=round(total), initial=round(done), unit="step", file=self.stream,
                                dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]")
            current = self._current
            if current is not None:
                key = _history_key(current)
                planned = next((p for p in self.plan if (p.model, p.seed, p.stage) == key), None)
                epochs = planned.epochs if planned else "?"
                self.bar.set_description_str(
                    f"{current.get('model')} seed {current.get('seed')} epoch {current.get('epoch')}/{epochs} "
                    f"({float(current.get('time_s') or 0):.1f} s/epoch)", refresh=False)
            self.bar.update(round(done) - self.bar.n)
        for p in self.finished_models():
            key = (p.model, p.seed, p.stage)
            if key in self.reported:
                continue
            self.reported.add(key)
            if self.mode == "lines":
                self.stream.write(self._finished_line(p, done, total) + "\n")
                self.stream.flush()

    def _finished_line(self, p: PlannedModel, done: float, total: float) -> str:
        from .pipeline import format_seconds

        seconds = self.model_seconds.get((p.model, p.seed, p.stage), 0.0)
        eta = self.eta_seconds()
        left = f", about {format_seconds(eta)} left" if eta is not None and done < total else ""
        return (f"{p.model} seed {p.seed} done: {p.epochs} epoch{'' if p.epochs == 1 else 's'}, "
                f"{format_seconds(seconds)} ({seconds / max(1, p.epochs):.1f} s/epoch); "
                f"run {100 * done / max(total, 1e-9):.0f}% done{left}")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - progress must never stop a run
                log.debug("progress display failed: %s", exc)

    def start(self) -> "RunFollower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.poll()
        except Exception:  # noqa: BLE001
            pass
        if self.bar is not None:
            self.bar.close()
