"""Run folders: parameters, provenance, per-method evaluations, ``metrics.json`` and ``per_class.csv``.

Layout of ``<run_name>/``::

    params.yaml                       the effective parameters (smoke applied, lr stated)
    checkpoints/seed_<s>/<method>.pt  one per trained model and training seed
    evaluations/seed_<s>/<method>.json  test metrics (+ confusion) per model and seed
    features/seed_<s>/<method>.npz    test features for t-SNE (a sample)
    history.jsonl                     one line per model and epoch
    metrics.json, per_class.csv       merged over seeds (mean and std)
    figures/*.png, *.ipynb, summary.md
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import platform
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import yaml

from . import __version__
from .config import Params, Settings, project_root
from .errors import CBDError
from .io import append_line, write_json, write_text
from .metrics import aggregate_records, check_finite, validate_metrics  # noqa: F401 (validate_metrics: re-exported)

log = logging.getLogger(__name__)

# Keys that may change between invocations of the same run without changing its results.
RESUMABLE_KEYS = {"overwrite", "device", "num_workers", "eval_batch_size", "methods", "tsne_samples", "torch_compile"}


def results_root() -> Path:
    """``CBD_RESULTS_DIR`` or ``results/`` at the project root (not the working directory)."""
    env = os.environ.get("CBD_RESULTS_DIR")
    return Path(env).expanduser() if env else project_root() / "results"


def run_dir_for(run_name: str) -> Path:
    if not run_name or "/" in run_name or run_name in (".", ".."):
        raise CBDError(f"run_name must be a plain folder name, got {run_name!r}")
    return results_root() / run_name


def effective_params(settings: Settings) -> dict:
    values = dataclasses.asdict(settings.params)
    values["lr"] = settings.lr  # the learning rate actually used
    values["decoupled_lr"] = settings.decoupled_lr
    return values


def _identity(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in RESUMABLE_KEYS}


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
    return out


def read_params_yaml(out: str | os.PathLike) -> dict | None:
    """A run folder's ``params.yaml`` (None when absent); a damaged one is named, not crashed on."""
    path = Path(out) / "params.yaml"
    if not path.exists():
        return None
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        values, problem = None, f"not valid YAML: {reason}"
    else:
        problem = None if isinstance(values, dict) else f"not a mapping of key: value ({type(values).__name__})"
    if problem:
        raise CBDError(f"{path} is damaged ({problem}); restore it, or set overwrite: true to start this run again")
    return values


def prepare_run_dir(out_dir: str | os.PathLike, settings: Settings) -> Path:
    """Apply the run-folder rules: start, resume / add a stage, or refuse different parameters."""
    out = ensure_run_dir(out_dir)
    wanted = effective_params(settings)
    params_file = out / "params.yaml"
    with run_lock(out):
        try:
            stored_values, problem = read_params_yaml(out), None
        except CBDError as error:  # damaged: refused below when it guards results
            stored_values, problem = None, error
        if has_results(out):
            if stored_values is None:
                if not settings.overwrite:
                    raise problem or CBDError(f"{out} holds results but no params.yaml; "
                                              f"set overwrite: true to replace them")
                clear_run_dir(out)
            else:
                # Fields added to the schema after the run was made count at their defaults.
                stored = {**dataclasses.asdict(Params()), **stored_values}
                differences = sorted(k for k in set(_identity(stored)) | set(_identity(wanted))
                                     if stored.get(k) != wanted.get(k))
                if differences:
                    if not settings.overwrite:
                        detail = ", ".join(f"{k}: {stored.get(k)!r} -> {wanted.get(k)!r}" for k in differences[:4])
                        raise CBDError(
                            f"{out} holds a run with different parameters ({detail}); "
                            f"use another run_name or set overwrite: true to replace it"
                        )
                    clear_run_dir(out)
        write_text(params_file, yaml.safe_dump(wanted, sort_keys=False))
    return out


_HELD_LOCKS: dict[Path, list] = {}  # path -> [open lock file, depth, token]: re-entrant within a process
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
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    handle = open(key / ".lock", "a+")
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
    token = secrets.token_hex(8)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {token}")
    handle.flush()
    _HELD_LOCKS[key] = [handle, 1, token]
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
    return _HELD_LOCKS[key][2]


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
                 NOTEBOOK_TIMES):
        (out / name).unlink(missing_ok=True)


# --- wall time summed over invocations ----------------------------------------------------

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


def _last_write(folder: Path, after: float, ledger: Path) -> float:
    """When a killed invocation last wrote into ``folder`` (its newest file), at least ``after``."""
    newest = after
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path != ledger:
                with contextlib.suppress(OSError):
                    newest = max(newest, path.stat().st_mtime)
    return newest


@contextlib.contextmanager
def timed(ledger: str | os.PathLike, name: str):
    """Add the block's wall time to ``ledger[name]``: summed over every invocation of a run.

    The entry is marked open while the block runs. An entry still open at the next start was
    left by a killed invocation: it counts up to the newest file written in the run folder.
    An invocation that ends with an error (or a kill) marks the entry ``resumed``.
    """
    ledger = Path(ledger)
    entries = _read_ledger(ledger)
    entry = entries.setdefault(name, {"s": 0.0, "invocations": 0, "resumed": False, "open": None})
    if entry.get("open") is not None:
        entry["s"] += max(0.0, _last_write(ledger.parent, entry["open"], ledger) - entry["open"])
        entry["invocations"] += 1
        entry["resumed"] = True
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
    env = os.environ.get("CBD_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True, timeout=10)
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


# --- evaluations -------------------------------------------------------------------------

def evaluation_path(out: Path, seed: int, method: str) -> Path:
    return out / "evaluations" / f"seed_{seed}" / f"{method}.json"


def checkpoint_path(out: Path, seed: int, method: str) -> Path:
    return out / "checkpoints" / f"seed_{seed}" / f"{method}.pt"


def features_path(out: Path, seed: int, method: str) -> Path:
    return out / "features" / f"seed_{seed}" / f"{method}.npz"


def save_evaluation(out: Path, seed: int, method: str, record: dict) -> None:
    check_finite(record, method)
    write_json(evaluation_path(out, seed, method), record)


def load_evaluations(out: Path, damaged: list | None = None) -> dict[str, dict[int, dict]]:
    """{method: {seed: record}} for every evaluation in the run folder.

    A damaged file is named in a ``CBDError``; with a ``damaged`` list it is appended there
    as ``(path, reason)`` and left out instead (the caller recomputes it).
    """
    found: dict[str, dict[int, dict]] = {}
    for path in sorted(Path(out).glob("evaluations/seed_*/*.json")):
        try:
            seed = int(path.parent.name.split("_", 1)[1])
        except ValueError:
            continue  # not a folder this package writes
        try:
            record = json.loads(path.read_text())
            reason = None if isinstance(record, dict) else "not a JSON object"
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            reason = f"not valid JSON: {exc}".splitlines()[0]
        if reason is None:
            found.setdefault(path.stem, {})[seed] = record
        elif damaged is not None:
            damaged.append((path, reason))
        else:
            raise CBDError(f"{path} is damaged ({reason}); delete it and rerun the stage that wrote it "
                           f"(it is recomputed from the checkpoint), or set overwrite: true")
    return found


def method_order(names) -> list[str]:
    from .config import DECOUPLED_BASELINES, ONE_STAGE_BASELINES, STUDENTS

    fixed = [*ONE_STAGE_BASELINES, *DECOUPLED_BASELINES]
    teachers = sorted(n for n in names if n.startswith("teacher_") and n != "teacher_ensemble")
    order = fixed + teachers + ["teacher_ensemble", *STUDENTS]
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)


def build_metrics(evaluations: dict, *, dataset: str, imbalance_ratio: float, class_counts: list, splits: dict,
                  seeds: list, prov: dict) -> dict:
    methods, stds = {}, {}
    for name in method_order(evaluations):
        records = [evaluations[name][s] for s in sorted(evaluations[name])]
        methods[name], stds[name] = aggregate_records(records)
        methods[name]["seeds"] = sorted(evaluations[name])
    metrics = {
        "dataset": dataset, "imbalance_ratio": imbalance_ratio, "class_counts": list(class_counts),
        "splits": splits, "seeds": list(seeds), "device": prov["device"], "torch": prov["torch"],
        "git_commit": prov["git_commit"], "precision": prov.get("precision", "unknown"), "methods": methods, "std": stds,
    }
    check_finite(metrics)
    return metrics


def per_class_csv(metrics: dict, class_names: list) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "label", "class_name", "train_count", "accuracy_mean", "accuracy_std", "seeds"])
    for name, record in metrics["methods"].items():
        for label, acc in enumerate(record["per_class"]):
            std = metrics["std"][name]["per_class"][label]
            writer.writerow([name, label, class_names[label], metrics["class_counts"][label],
                             "" if acc is None else f"{acc:.6f}", "" if std is None else f"{std:.6f}",
                             len(record.get("seeds", []))])
    return buffer.getvalue()


def write_metrics(out: Path, metrics: dict, class_names: list) -> None:
    write_json(out / "metrics.json", metrics)
    write_text(out / "per_class.csv", per_class_csv(metrics, class_names))


def _history_key(record: dict) -> tuple:
    return (record.get("model"), record.get("seed"), record.get("stage"), record.get("epoch"))


def _history_records(path: Path) -> tuple[list[dict], list[int]]:
    """The records of a history file and the numbers of its unreadable lines."""
    records, bad = [], []
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif not (line.startswith(b"{") and not line.rstrip().endswith(b"}")):  # a line torn by a kill is no damage
            bad.append(number)
    return records, bad


def read_history(out: Path) -> list[dict]:
    """History records, keeping the last record per (model, seed, epoch) (a resumed run rewrites).

    Lines torn by a kill are skipped; other unreadable lines are skipped with a warning naming them.
    """
    path = Path(out) / "history.jsonl"
    if not path.exists():
        return []
    records, bad = _history_records(path)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        log.warning("warning: %s: skipped %d unreadable line%s (%s)", path, len(bad), "" if len(bad) == 1 else "s",
                    shown)
    latest: dict = {}
    for rec in records:
        latest[_history_key(rec)] = rec
    return list(latest.values())


# history file -> (its size when last seen here, the (model, seed, stage, epoch) keys in it)
_HISTORY_KEYS: dict[str, tuple[int, set]] = {}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def append_history(path: str | os.PathLike, record: dict) -> None:
    """Append one epoch's record, unless that epoch is already there.

    A checkpoint that fell back to ``.prev.pt`` retrains an epoch whose line was written
    (resumed training is deterministic, so the line would be the same): it is kept once.
    """
    path = Path(path)
    size, keys = _HISTORY_KEYS.get(str(path), (None, None))
    if size != _size(path):  # first use, or the file changed behind this process: read it again
        keys = {_history_key(r) for r in _history_records(path)[0]} if path.exists() else set()
    key = _history_key(record)
    if key not in keys:
        append_line(path, json.dumps(record))
        keys.add(key)
    _HISTORY_KEYS[str(path)] = (_size(path), keys)


def save_features(out: Path, seed: int, method: str, features: np.ndarray, labels: np.ndarray, max_points: int, sample_seed: int = 0) -> None:
    """A fixed, class-stratified sample of test features for t-SNE."""
    rng = np.random.default_rng(sample_seed)
    keep = np.sort(rng.permutation(len(labels))[:max_points])
    path = features_path(out, seed, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, features=features[keep].astype(np.float32), labels=labels[keep], indices=keep)
    from .io import write_bytes

    write_bytes(path, buffer.getvalue())
