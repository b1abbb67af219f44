"""``cbdlib run``'s view of a run: a thread that follows the run folder's ``plan.json`` and
``history.jsonl`` while the notebooks train, and draws one bar (a terminal) or prints one line
per finished model (CI, ``nohup``). The cost model of the ETA is ``cbdlib/progress.py``'s."""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from pathlib import Path

from ..progress import PLAN_FILE, PlannedModel, read_plan
from ..runs import parse_history
from ..text import format_seconds

log = logging.getLogger("cbdlib")


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


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
        self._plan_stamp: int | None = None  # plan.json's modification time when last read
        self.epochs_done: dict[tuple, int] = {}  # (model, seed, stage) -> its last epoch in the history
        self.model_seconds: dict[tuple, float] = {}
        self.reported: set[tuple] = set()  # the finished models already printed (or before this invocation)
        self._offset = 0  # of history.jsonl, read up to its last whole line
        self._start: tuple[float, float] | None = None  # units done and the clock at the first look at the plan
        self._current: dict | None = None  # the newest epoch, for the bar
        self.bar = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    # bookkeeping, separate from the thread so that tests can drive it step by step
    def poll(self) -> None:
        stamp = _mtime(self.run_dir / PLAN_FILE)
        if stamp != self._plan_stamp:  # written by the first notebook that trains, rewritten by a rerun's
            self.plan, self._plan_stamp = read_plan(self.run_dir), stamp
        for record in self._new_records():
            key = (record.get("model"), record.get("seed"), record.get("stage"))
            epoch = int(record.get("epoch") or 0)
            if epoch > self.epochs_done.get(key, 0):
                self.epochs_done[key] = epoch
                self.model_seconds[key] = self.model_seconds.get(key, 0.0) + float(record.get("time_s") or 0.0)
            self._current = record
        if self.plan is not None:
            self._show()

    def _new_records(self) -> list[dict]:
        with contextlib.suppress(OSError), open(self.run_dir / "history.jsonl", "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
            whole = chunk[:chunk.rfind(b"\n") + 1]  # an unfinished last line waits for the next poll
            self._offset += len(whole)
            return parse_history(whole)[0]
        return []

    def total_units(self) -> float:
        return sum(p.epochs * p.epoch_cost for p in self.plan or [])

    def done_units(self) -> float:
        return sum(min(p.epochs, self.epochs_done.get(p.key, 0)) * p.epoch_cost for p in self.plan or [])

    def eta_seconds(self) -> float | None:
        """Seconds left at the rate this invocation has measured (None before the first epoch)."""
        if self._start is None:
            return None
        units, t0 = self._start
        done_now, elapsed = self.done_units() - units, time.monotonic() - t0
        if done_now <= 0 or elapsed <= 0:
            return None
        return (self.total_units() - self.done_units()) * elapsed / done_now

    def _show(self) -> None:
        total, done = self.total_units(), self.done_units()
        finished = [p for p in self.plan if self.epochs_done.get(p.key, 0) >= p.epochs]
        if self._start is None:  # models finished before this invocation are not reported again
            self._start = (done, time.monotonic())
            self.reported.update(p.key for p in finished)
        if self.mode == "bar":
            self._draw(total, done)
        for p in finished:
            if p.key not in self.reported:
                self.reported.add(p.key)
                if self.mode == "lines":
                    self.stream.write(self._finished_line(p, done, total) + "\n")
                    self.stream.flush()

    def _draw(self, total: float, done: float) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=round(total), initial=round(done), unit="step", file=self.stream,
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]")
        current = self._current
        if current is not None:
            key = (current.get("model"), current.get("seed"), current.get("stage"))
            epochs = next((p.epochs for p in self.plan if p.key == key), "?")
            self.bar.set_description_str(
                f"{current.get('model')} seed {current.get('seed')} epoch {current.get('epoch')}/{epochs} "
                f"({float(current.get('time_s') or 0):.1f} s/epoch)", refresh=False)
        self.bar.update(round(done) - self.bar.n)

    def _finished_line(self, p: PlannedModel, done: float, total: float) -> str:
        seconds = self.model_seconds.get(p.key, 0.0)
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
        with contextlib.suppress(Exception):  # the last look, as quiet as the thread's
            self.poll()
        if self.bar is not None:
            self.bar.close()
