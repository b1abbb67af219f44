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
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import yaml

from . import __version__
from .config import Params, Settings, project_root
from .errors import CBDError
from .io import write_json, write_text
from .metrics import ACCURACY_KEYS, aggregate_records, check_finite

# Keys that may change between invocations of the same run without changing its results.
RESUMABLE_KEYS = {"overwrite", "device", "num_workers", "eval_batch_size", "methods", "tsne_samples", "compile"}


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


def prepare_run_dir(out_dir: str | os.PathLike, settings: Settings) -> Path:
    """Apply the run-folder rules: start, resume / add a stage, or refuse different parameters."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CBDError(f"cannot create the run folder {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK):
        raise CBDError(f"the run folder {out} is not writable")
    wanted = effective_params(settings)
    params_file = out / "params.yaml"
    with run_lock(out):
        if params_file.exists() and has_results(out):
            # Fields added to the schema after the run was made count at their defaults.
            stored = {**dataclasses.asdict(Params()), **(yaml.safe_load(params_file.read_text()) or {})}
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
        elif not params_file.exists() and has_results(out):
            if not settings.overwrite:
                raise CBDError(f"{out} holds results but no params.yaml; set overwrite: true to replace them")
            clear_run_dir(out)
        write_text(params_file, yaml.safe_dump(wanted, sort_keys=False))
    return out


_HELD_LOCKS: dict[Path, list] = {}  # path -> [open lock file, depth]: re-entrant within a process


@contextlib.contextmanager
def run_lock(out: str | os.PathLike):
    """Hold ``<run>/.lock`` while a process writes the run: a second process is refused at once.

    The lock dies with its process (``flock``), so a killed run never leaves a stale one.
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
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise CBDError(f"{out} is in use by another process (pid {holder}); wait for it to finish or stop it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _HELD_LOCKS[key] = [handle, 1]
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def clear_run_dir(out: Path) -> None:
    """Remove a previous run's outputs (overwrite: true)."""
    for name in ("checkpoints", "evaluations", "features", "figures"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("params.yaml", "metrics.json", "per_class.csv", "history.jsonl", "summary.md"):
        (out / name).unlink(missing_ok=True)


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


def load_evaluations(out: Path) -> dict[str, dict[int, dict]]:
    """{method: {seed: record}} for every evaluation in the run folder."""
    found: dict[str, dict[int, dict]] = {}
    for path in sorted((out / "evaluations").glob("seed_*/*.json")):
        seed = int(path.parent.name.split("_", 1)[1])
        found.setdefault(path.stem, {})[seed] = json.loads(path.read_text())
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


def read_history(out: Path) -> list[dict]:
    """History records, keeping the last record per (model, seed, epoch) (a resumed run rewrites)."""
    path = Path(out) / "history.jsonl"
    if not path.exists():
        return []
    latest: dict = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        latest[(rec.get("model"), rec.get("seed"), rec.get("stage"), rec.get("epoch"))] = rec
    return list(latest.values())


def validate_metrics(metrics: dict) -> None:
    """Check a metrics object against the contract's schema (used by tests and ``aggregate``)."""
    for key in ("dataset", "imbalance_ratio", "class_counts", "splits", "seeds", "device", "torch", "git_commit",
                "methods", "std"):
        if key not in metrics:
            raise CBDError(f"metrics.json lacks {key!r}")
    num_classes = len(metrics["class_counts"])
    for name, record in metrics["methods"].items():
        for key in ACCURACY_KEYS:
            value = record.get(key, "absent")
            if value == "absent":
                raise CBDError(f"metrics.json: method {name} lacks {key!r}")
            if value is not None and not (0.0 <= value <= 1.0):
                raise CBDError(f"metrics.json: {name}.{key} = {value} is not a fraction")
        if len(record["per_class"]) != num_classes:
            raise CBDError(f"metrics.json: {name}.per_class has {len(record['per_class'])} entries, not {num_classes}")
        if name not in metrics["std"]:
            raise CBDError(f"metrics.json: no std for {name}")
    check_finite(metrics)


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
