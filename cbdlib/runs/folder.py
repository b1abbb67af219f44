"""A run folder's life: where it is, the parameters that made it (start, resume or refuse), its lock."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
from pathlib import Path

import yaml

from ..config import Params, Settings, project_root
from ..errors import CBDError, one_line
from ..io import open_no_follow, refuse_links, write_text
from ..param_rules import check_rule
from ..plain_values import load_yaml
from .timing import NOTEBOOK_TIMES, STAGE_TIMES, close_killed

log = logging.getLogger("cbdlib.runs")

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
    stored = {**dataclasses.asdict(Params()), **stored}  # fields added to the schema later count at their defaults
    differences = sorted(k for k in (set(stored) | set(wanted)) - RESUMABLE_KEYS if stored.get(k) != wanted.get(k))
    if not differences:
        return None
    detail = ", ".join(f"{k}: {stored.get(k)!r} -> {wanted.get(k)!r}" for k in differences[:4])
    return CBDError(f"{out} holds a run with different parameters ({detail}); use another run_name or set "
                    f"overwrite: true to replace it")


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
    for name in ("checkpoints", "evaluations", "features", "figures"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("params.yaml", "metrics.json", "per_class.csv", "history.jsonl", "summary.md", STAGE_TIMES,
                 NOTEBOOK_TIMES, PRECISION_FILE):
        (out / name).unlink(missing_ok=True)
