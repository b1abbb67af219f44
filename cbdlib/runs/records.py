"""What a run folder records, each record written and read back here: evaluations per model and
seed, ``metrics.json`` and ``per_class.csv``, ``history.jsonl``, the saved test features, and the
class names. What notebook 04 makes of them is ``analysis/views.py``'s."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import CBDError, one_line
from ..io import append_line, write_bytes, write_json, write_text
from ..methods import method_order
from ..metrics import aggregate_records, check_finite, validate_metrics
from ..text import first_few

log = logging.getLogger("cbdlib.runs")


def evaluation_path(out: Path, seed: int, method: str) -> Path:
    return out / "evaluations" / f"seed_{seed}" / f"{method}.json"


def checkpoint_path(out: Path, seed: int, method: str) -> Path:
    return out / "checkpoints" / f"seed_{seed}" / f"{method}.pt"


def features_dir(out: Path, seed: int) -> Path:
    return out / "features" / f"seed_{seed}"


def features_path(out: Path, seed: int, method: str) -> Path:
    return features_dir(out, seed) / f"{method}.npz"


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
        "git_commit": prov["git_commit"], "precision": prov.get("precision", "unknown"),
        "methods": methods, "std": stds,
    }
    if "precision_choice" in prov:  # why the run computes in that precision (and the rates behind auto)
        metrics["precision_choice"] = prov["precision_choice"]
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


_NUMBER = (int, float)
# The contract's history fields and their types (numbers may be null); a record with another type
# in one of them is damage (the curves would stop on it), skipped and named like an unreadable line.
HISTORY_TYPES = {"model": (str,), "stage": (str,), "seed": (int,), "epoch": (int,), "steps": (int,),
                 "loss": _NUMBER, "ce": _NUMBER, "distill": _NUMBER, "lr": _NUMBER, "time_s": _NUMBER}


def _well_typed(record: dict) -> bool:
    """Every field of ``HISTORY_TYPES`` null or of its type, and those that identify the record given."""
    values = {key: record.get(key) for key in HISTORY_TYPES}
    return all(values[key] is not None for key in ("model", "seed", "epoch")) and all(
        value is None or (isinstance(value, HISTORY_TYPES[key]) and not isinstance(value, bool))
        for key, value in values.items())


def parse_history(data: bytes) -> tuple[list[dict], list[int]]:
    """The one parser of ``history.jsonl``: the well-typed records in ``data`` (the file's bytes, or
    the part of it read so far) and the (1-based) numbers of the damaged lines; a line torn by a kill
    is skipped without being named."""
    records, bad = [], []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict) and _well_typed(record):
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
    records, bad = parse_history(path.read_bytes())
    if bad:
        log.warning("warning: %s: skipped %d unreadable line%s (%s)", path, len(bad), "" if len(bad) == 1 else "s",
                    first_few(bad, 5))
    return list({_history_key(rec): rec for rec in records}.values())  # the last record of each key


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
        keys = {_history_key(r) for r in parse_history(path.read_bytes() if path.exists() else b"")[0]}
    key = _history_key(record)
    if key not in keys:
        append_line(path, json.dumps(record))
        keys.add(key)
    _HISTORY_KEYS[str(path)] = (_size(path), keys)


def save_features(out: Path, seed: int, method: str, features: np.ndarray, labels: np.ndarray, max_points: int,
                  sample_seed: int = 0) -> None:
    """A fixed random sample of ``max_points`` test features (with their labels and indices) for t-SNE."""
    rng = np.random.default_rng(sample_seed)
    keep = np.sort(rng.permutation(len(labels))[:max_points])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, features=features[keep].astype(np.float32), labels=labels[keep], indices=keep)
    write_bytes(features_path(out, seed, method), buffer.getvalue())


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CBDError(f"{path} is not valid JSON ({one_line(exc)}); rerun the stage that wrote it") from None


def load_metrics(run_dir: Path, required: bool = True) -> dict | None:
    """``<run>/metrics.json``, checked against the contract's schema; None when absent and not ``required``."""
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        if not required:
            return None
        raise CBDError(f"{path} not found: run notebooks 02 and 03 with run_name {Path(run_dir).name!r} first, "
                       f"or python -m cbdlib run")
    metrics = read_json(path)
    try:
        validate_metrics(metrics)
    except (CBDError, ValueError) as exc:
        raise CBDError(f"{path}: {one_line(exc)}") from None
    return metrics


def class_names(run_dir: Path, metrics: Mapping) -> list[str]:
    """Class names from ``per_class.csv`` (labels as text where it is absent or damaged)."""
    names = [str(c) for c in range(len(metrics["class_counts"]))]
    path = Path(run_dir) / "per_class.csv"
    if path.exists():
        with path.open(newline="") as handle, contextlib.suppress(csv.Error, KeyError, ValueError):
            for row in csv.DictReader(handle):
                label = int(row["label"])
                if 0 <= label < len(names):
                    names[label] = row["class_name"]
    return names


def evaluation(run_dir: Path, seed: int, method: str) -> dict:
    """The evaluation record of one model and seed (test metrics and ``confusion``)."""
    path = evaluation_path(Path(run_dir), seed, method)
    if not path.exists():
        raise CBDError(f"no evaluation of {method} (seed {seed}) in {run_dir}; run its stage first")
    return read_json(path)


def load_features(run_dir: Path, seed: int, method: str) -> dict:
    """Saved test features of one model and seed: ``features``, ``labels``, ``indices`` arrays."""
    path = features_path(Path(run_dir), seed, method)
    if not path.exists():
        raise CBDError(f"no saved features of {method} (seed {seed}) in {run_dir}; features are saved for the "
                       f"first listed teacher, ce and cbd_ens")
    with np.load(path) as data:
        return {key: data[key] for key in ("features", "labels", "indices")}


def history(run_dir: Path, stages=None, models=None) -> list[dict]:
    """Per-epoch records of ``history.jsonl``, optionally only some stages / models."""
    return [r for r in read_history(Path(run_dir))
            if (stages is None or r.get("stage") in stages) and (models is None or r.get("model") in models)]
