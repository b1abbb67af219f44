"""A run folder's life: where it is, the parameters that made it (start, resume or refuse), its lock,
its wall time summed over every invocation, and the provenance written beside every number."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from .. import __version__
from ..config import Params, Settings, project_root
from ..errors import CBDError, one_line
from ..io import open_no_follow, refuse_links, write_json, write_text
from ..param_rules import check_rule
from ..plain_values import load_yaml
from ..progress import PLAN_FILE

log = logging.getLogger("cbdlib.runs")

STAGE_TIMES = "stage_times.json"        # the engine's stages (written by the training process)
NOTEBOOK_TIMES = "notebook_times.json"  # cbdlib run's notebooks (written by the command)
# The run's precision decision (engine/precision.py), kept so that a resume computes in what it began with.
PRECISION_FILE = "precision.json"
# Keys that may change between invocations of the same run without changing its results.
RESUMABLE_KEYS = {"overwrite", "device", "num_workers", "eval_batch_size", "methods", "tsne_samples", "torch_compile"}


def results_root() -> Path:
    """``CBD_RESULTS_DIR`` or ``results/`` at the project root (not the working directory)."""
    env = os.environ.get("CBD_RESULTS_DIR")
    return Path(env).expanduser() if env else project_root() / "results"


def run_dir_for(run_name: str) -> Path:
    check_rule("run_name", run_name)
    return results_root() / run_name


def has_results(out: Path) -> bool:
    """Whether a run folder holds anything trained (a failed start leaves only params.yaml)."""
    return any((out / name).exists() for name in ("checkpoints", "evaluations", "metrics.json"))


def ensure_run_dir(out_dir: str | os.PathLike) -> Path:
    """Create the run folder (and its parents) and check that it can be written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CBDError(f"cannot create the run folder {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK):
        raise CBDError(f"the run folder {out} is not writable")
    refuse_links(out)
    return out


def read_params_yaml(out: str | os.PathLike) -> dict | None:
    """A run folder's ``params.yaml`` (None when absent); a damaged one is named, not crashed on."""
    path = Path(out) / "params.yaml"
    if not path.exists():
        return None
    try:
        values = load_yaml(path.read_text(), str(path))
        problem = None if isinstance(values, dict) else f"not a mapping of key: value ({type(values).__name__})"
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        problem = f"not valid YAML: {one_line(exc)}"
    if problem:
        raise CBDError(f"{path} is damaged ({problem}); restore it, or set overwrite: true to start this run again")
    return values


def prepare_run_dir(out_dir: str | os.PathLike, settings: Settings) -> Path:
    """Apply the run-folder rules: start, resume / add a stage, or refuse different parameters."""
    out = ensure_run_dir(out_dir)
    wanted = dataclasses.asdict(settings.params)  # lr and decoupled_lr as used
    with run_lock(out):
        refusal = _refusal(out, wanted) if has_results(out) else None
        if refusal is not None:
            if not settings.overwrite:
                raise refusal
            clear_run_dir(out)
        write_text(out / "params.yaml", yaml.safe_dump(wanted, sort_keys=False))
    return out


def _refusal(out: Path, wanted: dict) -> CBDError | None:
    """Why a folder holding results cannot take the run ``wanted`` (None: the same run, it resumes)."""
    try:
        stored = read_params_yaml(out)
    except CBDError as damaged:
        return damaged
    if stored is None:
        return CBDError(f"{out} holds results but no params.yaml; set overwrite: true to replace them")
    detail = parameter_differences(stored, wanted, RESUMABLE_KEYS, "->")
    if detail is None:
        return None
    return CBDError(f"{out} holds a run with different parameters ({detail}); use another run_name or set "
                    f"overwrite: true to replace it")


def parameter_differences(a: dict, b: dict, ignored, arrow: str) -> str | None:
    """The first four keys (not ``ignored``) whose values differ between two runs' parameters, as
    ``key: a <arrow> b``; None when they are the same experiment. A field added to the schema after
    a run was made counts at its default."""
    defaults = dataclasses.asdict(Params())
    a, b = {**defaults, **a}, {**defaults, **b}
    differences = sorted(k for k in (set(a) | set(b)) - set(ignored) if a.get(k) != b.get(k))
    if not differences:
        return None
    return ", ".join(f"{k}: {a.get(k)!r} {arrow} {b.get(k)!r}" for k in differences[:4])


_HELD_LOCKS: dict[Path, str] = {}  # lock path -> its token: the lock is re-entrant within a process
# The holder's token, handed to the notebook kernels that ``cbdlib run`` starts: they work under its lock.
LOCK_TOKEN_ENV = "CBD_RUN_LOCK_TOKEN"


@contextlib.contextmanager
def run_lock(out: str | os.PathLike):
    """Hold ``<run>/.lock`` while a process writes the run: a second process is refused at once.

    The lock dies with its process (``flock``), so a killed run never leaves a stale one. A
    process whose ``CBD_RUN_LOCK_TOKEN`` matches the holder's token (a kernel of the holder's
    ``cbdlib run``) works under the holder's lock instead of being refused.
    """
    import fcntl

    key = Path(out).resolve()
    if key in _HELD_LOCKS:  # held by this process already: the outermost holder releases it
        yield
        return
    handle = open(key / ".lock", "a+", opener=open_no_follow)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = None
    except BlockingIOError:
        handle.seek(0)
        busy = handle.read().strip()
        handle.close()
    if busy is not None:
        holder, _, token = busy.partition(" ")
        if token and os.environ.get(LOCK_TOKEN_ENV) == token:
            yield  # started by the holder: one writer, two processes
            return
        raise CBDError(f"{out} is in use by another process (pid {holder or 'unknown'}); "
                       f"wait for it to finish or stop it")
    close_killed(key)  # a fresh lock: whatever a ledger holds open was left by a killed process
    token = secrets.token_hex(8)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {token}")
    handle.flush()
    _HELD_LOCKS[key] = token
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def lock_token(out: str | os.PathLike) -> str:
    """The token of the lock this process holds on ``out`` (for the processes it starts)."""
    key = Path(out).resolve()
    if key not in _HELD_LOCKS:
        raise RuntimeError(f"this process holds no lock on {out}")
    return _HELD_LOCKS[key]


def refuse_if_busy(out: str | os.PathLike) -> None:
    """Stop at once when another process writes ``out`` (a notebook opened by hand during ``cbdlib run``)."""
    if (Path(out) / ".lock").exists():
        with run_lock(out):
            pass


def clear_run_dir(out: Path) -> None:
    """Remove a previous run's outputs (overwrite: true)."""
    for name in ("checkpoints", "evaluations", "analyses", "features", "figures"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("params.yaml", "metrics.json", "per_class.csv", "history.jsonl", "summary.md", STAGE_TIMES,
                 NOTEBOOK_TIMES, PRECISION_FILE, PLAN_FILE):
        (out / name).unlink(missing_ok=True)


# --- wall time summed over invocations, and provenance -------------------------------------

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


def provenance(device) -> dict:
    """What produced a number: the device (a GPU's name, or the CPU and its cores), torch, the commit,
    cbdlib and Python (metrics.json, bench records)."""
    import torch

    described = (f"cuda ({torch.cuda.get_device_name(device)})" if getattr(device, "type", str(device)) == "cuda"
                 else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return {"device": described, "torch": torch.__version__, "git_commit": git_commit(), "cbdlib": __version__,
            "python": platform.python_version()}
