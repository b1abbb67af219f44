"""Reading a finished run folder back (the notebooks' and the analysis' side): its metrics, class
names, per-seed evaluations, saved test features, history and tau-norm's validation curve."""
from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from ..errors import CBDError, one_line
from ..methods import is_teacher, teacher_sort_key
from ..metrics import validate_metrics
from .records import evaluation_path, features_path, read_history


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


def has_features(run_dir: Path, seed: int, method: str) -> bool:
    """Whether test features of ``method`` were saved; prints a note when they were not."""
    if features_path(Path(run_dir), seed, method).exists():
        return True
    print(f"note: no saved features of {method} (seed {seed}) in this run, so its t-SNE is skipped")
    return False


def paired_features(run_dir: Path, seed: int, method_a: str, method_b: str):
    """Features of two models on the same test images: ``(features_a, features_b, labels)``."""
    a, b = load_features(run_dir, seed, method_a), load_features(run_dir, seed, method_b)
    common, ia, ib = np.intersect1d(a["indices"], b["indices"], return_indices=True)
    if len(common) == 0:
        raise CBDError(f"{method_a} and {method_b} have no test image in common in their saved features")
    return a["features"][ia], b["features"][ib], a["labels"][ia]


def tsne_teacher(run_dir: Path, seed: int, requested: Optional[str] = None) -> Optional[str]:
    """The model whose features notebook 04 embeds next to CBD-ENS's.

    ``requested`` when its features were saved; else the vanilla teacher with the lowest seed
    among the saved ones, else any saved teacher (with a note); None (with a note) when none is saved.
    """
    folder = features_path(Path(run_dir), seed, "x").parent
    saved = sorted((p.stem for p in folder.glob("teacher_*.npz") if is_teacher(p.stem)), key=teacher_sort_key)
    if requested is not None:
        if features_path(Path(run_dir), seed, requested).exists():
            return requested
        if saved:
            print(f"note: no saved features of {requested}; using {saved[0]}")
    if saved:
        return saved[0]
    print("note: no teacher features saved in this run, so the t-SNE is skipped")
    return None


def history(run_dir: Path, stages=None, models=None) -> list[dict]:
    """Per-epoch records of ``history.jsonl``, optionally only some stages / models."""
    records = read_history(Path(run_dir))
    if stages is not None:
        records = [r for r in records if r.get("stage") in set(stages)]
    if models is not None:
        records = [r for r in records if r.get("model") in set(models)]
    return records


def tau_choices(run_dir: Path, seeds, method: str = "tau_norm"):
    """Per seed, the tau of ``tau_norm`` or ``logit_adjust`` chosen on the balanced validation set (a DataFrame)."""
    import pandas as pd

    rows = []
    for seed in seeds:
        path = evaluation_path(Path(run_dir), seed, method)
        if not path.exists():
            continue
        record = read_json(path)
        rows.append({"method": method, "seed": seed, "tau": record.get("tau"),
                     "validation balanced accuracy (%)":
                         round(100 * record.get("tau_val_balanced_acc", float("nan")), 1),
                     "test top-1 (%)": round(100 * record["all"], 1)})
    return pd.DataFrame(rows, columns=["method", "seed", "tau", "validation balanced accuracy (%)", "test top-1 (%)"])


def tau_curves(run_dir: Path, seeds, method: str = "tau_norm") -> dict:
    """Per seed, the validation curve of ``tau_norm`` or ``logit_adjust`` over its tau grid:
    ``{seed: {"tau": [...], "val_acc": [...], "chosen": tau}}``.

    Seeds without an evaluation, or whose evaluation predates the recorded curve, are left out.
    """
    curves = {}
    for seed in seeds:
        path = evaluation_path(Path(run_dir), seed, method)
        if not path.exists():
            continue
        record = read_json(path)
        if "tau_val_curve" in record:
            curves[seed] = {"tau": record["tau_grid"], "val_acc": record["tau_val_curve"], "chosen": record["tau"]}
    return curves


POST_HOC = ("tau_norm", "logit_adjust")  # the methods whose tau is chosen on validation


def post_hoc_choices(run_dir: Path, seeds):
    """``tau_choices`` of tau-norm and logit adjustment, one table."""
    import pandas as pd

    return pd.concat([tau_choices(run_dir, seeds, method) for method in POST_HOC], ignore_index=True)


def post_hoc_curves(run_dir: Path, seeds) -> dict:
    """``{method: tau_curves(...)}`` of tau-norm and logit adjustment (for ``plots.tau_curve``)."""
    return {method: tau_curves(run_dir, seeds, method) for method in POST_HOC}
