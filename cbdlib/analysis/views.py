"""What notebook 04 shows of a finished run, read from its folder: which methods (a subset, the
ones that exist, a readable few), which comparison, the t-SNE's pairs of saved features, the post-hoc
baselines' tau per seed, and the computed reading. Absent pieces give a printed one-line note and
are skipped; an unknown method name is an error. ``workbook`` hands these to the notebook.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from ..data.stats import split_size_lines
from ..errors import CBDError
from ..methods import best_baseline, check_method_name, is_teacher, teacher_sort_key
from ..runs.records import evaluation_path, features_dir, features_path, load_evaluations, load_features, read_json
from .reading import reading_lines


def restrict(metrics: Mapping, methods=None) -> dict:
    """A copy of ``metrics`` holding only ``methods`` (in that order; None: all present).

    A known method absent from the run is left out with a printed note; an unknown name
    is an error.
    """
    keep = list(metrics.get("methods", {}))
    if methods is not None:
        for name in methods:
            check_method_name(name)
        absent = [m for m in methods if m not in keep]
        if absent:
            print(f"note: not in this run, left out: {', '.join(absent)}")
        keep = [m for m in dict.fromkeys(methods) if m in keep]
    out = dict(metrics)
    out["methods"] = {m: metrics["methods"][m] for m in keep}
    out["std"] = {m: metrics.get("std", {}).get(m, {}) for m in keep}
    for analysis in ("probes", "probes_std", "ece", "ece_std"):  # the analyses of the methods kept
        if analysis in metrics:
            out[analysis] = {m: v for m, v in metrics[analysis].items() if m in keep}
    return out


def available(metrics: Mapping, method: str, what: str) -> bool:
    """Whether ``method`` is in the run; if not, print a one-line note saying what is skipped."""
    if method in metrics.get("methods", {}):
        return True
    print(f"note: {method} is not in this run, so {what} is skipped")
    return False


def teacher_names(metrics: Mapping) -> list[str]:
    """The individual teachers present in ``metrics`` (vanilla first, then by seed)."""
    return sorted((m for m in metrics.get("methods", {}) if is_teacher(m)), key=teacher_sort_key)


def split_summary(metrics: Mapping) -> str:
    """How many classes fall in each split (always printed next to split accuracies)."""
    return (f"{len(metrics['class_counts'])} classes; " + "; ".join(split_size_lines(metrics["splits"]))
            + f"; seeds {metrics['seeds']}")


def student_and_baseline(metrics: Mapping, student: str = "cbd_ens") -> Optional[tuple[str, str]]:
    """``(student, best baseline)`` to compare, or None with a printed note when either is absent."""
    if not available(metrics, student, "its comparison with the best baseline"):
        return None
    baseline = best_baseline(metrics)
    if baseline is None:
        print("note: no single-model baseline in this run, so the comparison is skipped")
        return None
    return student, baseline


def key_methods(metrics: Mapping, most: int = 6) -> list[str]:
    """Methods for a readable overlay: all when few, else ce, the best baseline, the teacher
    ensemble, CBD and CBD-ENS (those present)."""
    names = list(metrics["methods"])
    if len(names) <= most:
        return names
    picks = ["ce", best_baseline(metrics), "teacher_ensemble", "cbd", "cbd_ens"]
    return [m for m in dict.fromkeys(picks) if m in metrics["methods"]] or names[:most]


def reading(run_dir: Path, metrics: Mapping):
    """The computed reading of ``summary.md`` (headline, comparisons, analyses) as Markdown."""
    from IPython.display import Markdown

    lines = reading_lines(metrics, load_evaluations(Path(run_dir)))
    return Markdown("\n".join(lines) if lines else "Nothing to compare: the run has a single method.")


def save_table(table, path: Path) -> Path:
    """Write a DataFrame as CSV (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path)
    return path


# --- the t-SNE's saved features ------------------------------------------------------------

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
    folder = features_dir(Path(run_dir), seed)
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


# --- the post-hoc baselines' tau -----------------------------------------------------------

POST_HOC = ("tau_norm", "logit_adjust")  # the methods whose tau is chosen on validation


def _post_hoc_records(run_dir: Path, seeds, methods) -> dict[str, dict[int, dict]]:
    """``{method: {seed: evaluation record}}`` for the seeds that have one."""
    paths = {m: {seed: evaluation_path(Path(run_dir), seed, m) for seed in seeds} for m in methods}
    return {m: {seed: read_json(path) for seed, path in per_seed.items() if path.exists()}
            for m, per_seed in paths.items()}


def post_hoc_choices(run_dir: Path, seeds, methods=POST_HOC):
    """Per method and seed, the tau of ``tau_norm`` / ``logit_adjust`` chosen on the balanced validation
    set (a DataFrame)."""
    import pandas as pd

    rows = [{"method": method, "seed": seed, "tau": record.get("tau"),
             "validation balanced accuracy (%)": round(100 * record.get("tau_val_balanced_acc", float("nan")), 1),
             "test top-1 (%)": round(100 * record["all"], 1)}
            for method, per_seed in _post_hoc_records(run_dir, seeds, methods).items()
            for seed, record in per_seed.items()]
    return pd.DataFrame(rows, columns=["method", "seed", "tau", "validation balanced accuracy (%)", "test top-1 (%)"])


def post_hoc_curves(run_dir: Path, seeds, methods=POST_HOC) -> dict:
    """Per method and seed, the validation curve over the tau grid (for ``plots.tau_curve``):
    ``{method: {seed: {"tau": [...], "val_acc": [...], "chosen": tau}}}``; seeds whose evaluation
    predates the recorded curve are left out."""
    return {method: {seed: {"tau": r["tau_grid"], "val_acc": r["tau_val_curve"], "chosen": r["tau"]}
                     for seed, r in per_seed.items() if "tau_val_curve" in r}
            for method, per_seed in _post_hoc_records(run_dir, seeds, methods).items()}
