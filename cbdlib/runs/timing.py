"""Wall time summed over every invocation of a run, and the provenance written beside every number."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path

from .. import __version__
from ..config import project_root
from ..errors import CBDError
from ..io import write_json

log = logging.getLogger("cbdlib.runs")


STAGE_TIMES = "stage_times.json"        # the engine's stages (written by the training process)
NOTEBOOK_TIMES = "notebook_times.json"  # cbdlib run's notebooks (written by the command)


def _read_ledger(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        log.warning("warning: %s is damaged; wall times are counted from now on", path)
        return {}
    return values if isinstance(values, dict) else {}


def _last_write(folder: Path) -> float:
    """When a killed invocation last wrote into ``folder``: its newest file but the ledgers and the lock."""
    newest = 0.0
    for root, _, files in os.walk(folder):
        for name in files:
            if name not in (STAGE_TIMES, NOTEBOOK_TIMES, ".lock"):
                with contextlib.suppress(OSError):
                    newest = max(newest, (Path(root) / name).stat().st_mtime)
    return newest


def close_killed(folder: str | os.PathLike) -> None:
    """Close the entries a killed invocation left open in ``folder``'s ledgers, each counted up to
    the newest file in the folder. Called when a process takes the run's lock afresh, before it
    writes anything: later, the rerun's own rewrites would be counted as the killed run's time.
    """
    folder = Path(folder)
    newest = None
    for ledger in (folder / STAGE_TIMES, folder / NOTEBOOK_TIMES):
        entries = _read_ledger(ledger)
        killed = {name: e for name, e in entries.items() if isinstance(e, dict) and e.get("open") is not None}
        if not killed:
            continue
        if newest is None:
            newest = _last_write(folder)
        for entry in killed.values():
            entry["s"] = round(entry["s"] + max(0.0, newest - entry["open"]), 3)
            entry.update(invocations=entry["invocations"] + 1, resumed=True, open=None)
        with contextlib.suppress(CBDError):
            write_json(ledger, entries)


@contextlib.contextmanager
def timed(ledger: str | os.PathLike, name: str):
    """Add the block's wall time to ``ledger[name]``: summed over every invocation of a run.

    The entry is marked open while the block runs: one still open when a process next takes the
    run's lock was left by a killed invocation, and ``close_killed`` closes it (the callers time
    under ``run_lock``). An invocation that ends with an error (or a kill) marks the entry ``resumed``.
    """
    ledger = Path(ledger)
    entries = _read_ledger(ledger)
    entry = entries.setdefault(name, {"s": 0.0, "invocations": 0, "resumed": False, "open": None})
    entry["open"] = time.time()
    write_json(ledger, entries)
    t0, finished = time.perf_counter(), False
    try:
        yield
        finished = True
    finally:
        entries = _read_ledger(ledger)
        entries[name] = {**entry, "s": round(entry["s"] + time.perf_counter() - t0, 3),
                         "invocations": entry["invocations"] + 1, "open": None,
                         "resumed": entry["resumed"] or not finished}
        with contextlib.suppress(CBDError):  # a full disk must not hide the error that stopped the block
            write_json(ledger, entries)


def wall_times(ledger: str | os.PathLike) -> dict[str, dict]:
    """``{name: {"s": seconds summed over invocations, "invocations": n, "resumed": bool}}``."""
    return {name: {k: v for k, v in entry.items() if k != "open"}
            for name, entry in _read_ledger(Path(ledger)).items() if isinstance(entry, dict)}


def git_commit() -> str:
    """``CBD_GIT_COMMIT`` when set (copies without .git), else the checkout's HEAD, else 'unknown'."""
    if os.environ.get("CBD_GIT_COMMIT"):
        return os.environ["CBD_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_root(),
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def device_description(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def provenance(device) -> dict:
    import torch

    return {"device": device_description(device), "torch": torch.__version__, "git_commit": git_commit(),
            "cbdlib": __version__, "python": platform.python_version()}
