"""What each notebook must leave in its run folder, checked by the notebook's last code cell.

nbval in lax mode only checks that cells run: a guarded cell (``if pair: ...``) that silently
skips, or a plot that is never saved, would pass. So each notebook ends with
``workbook.check_outputs(notebook, run_dir, ...)``: every figure and table that
``expected_outputs`` lists must exist under ``<run folder>/figures/`` and must have been
written by this execution of the notebook (not before its ``setup`` / ``analysis_setup``
call, which ``mark_started`` records). A notebook that did not produce them fails, naming them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping, Optional

from .errors import CBDError
from .methods import best_baseline

# What every execution of a notebook writes, whatever the run holds.
ALWAYS: dict[str, tuple[str, ...]] = {
    "01": ("01_class_histogram.png", "01_cumulative_share.png", "01_sample_images.png", "01_counts_table.csv"),
    "02": ("02_teacher_curves.png", "02_baseline_curves.png", "02_teacher_per_class.png", "02_split_table.csv"),
    "03": ("03_tau_curve.png", "03_student_curves.png", "03_cbd_table.csv", "03_cbd_vs_baselines.png"),
    "04": ("04_split_table.csv", "04_split_accuracy.png", "04_per_class_accuracy.png"),
}
# A file written up to this long before the recorded start still counts as this execution's
# (file-system timestamps may trail time.time() by a clock tick).
CLOCK_SLACK_S = 1.0

_started: dict[str, float] = {}


def mark_started(notebook: str) -> None:
    """Record when this kernel started executing ``notebook`` (called by the setup functions)."""
    _started[notebook] = time.time()


def _run_methods(run_dir: Path) -> list[str]:
    path = Path(run_dir) / "metrics.json"
    try:
        return list(json.loads(path.read_text()).get("methods", {}))
    except (OSError, ValueError, AttributeError):
        return []


def expected_outputs(notebook: str, run_dir: str | Path, metrics: Optional[Mapping] = None) -> list[str]:
    """File names under ``<run_dir>/figures/`` that ``notebook`` must write.

    Notebook 04 also needs ``metrics``, the methods it shows: with CBD-ENS and a single-model
    baseline it draws the gain plot and both confusion matrices, and with CBD-ENS and a trained
    teacher in the run (whose test features the engine saves) the t-SNE; the probes', calibration's
    and teacher agreement's tables and figures where ``metrics`` holds them.
    """
    if notebook not in ALWAYS:
        raise CBDError(f"unknown notebook {notebook!r}; choose one of {', '.join(ALWAYS)}")
    names = list(ALWAYS[notebook])
    if notebook != "04":
        return names
    if metrics is None:
        raise CBDError("notebook 04's outputs depend on the methods it shows: pass its metrics")
    shown = metrics.get("methods", {})
    if "cbd_ens" in shown:
        baseline = best_baseline(metrics)
        if baseline is not None:
            names += ["04_gain_vs_class_size.png", "04_confusion_cbd_ens.png", f"04_confusion_{baseline}.png"]
        if any(m.startswith("teacher_") and m != "teacher_ensemble" for m in _run_methods(Path(run_dir))):
            names.append("04_tsne.png")
        if baseline is not None and {"cbd_ens", baseline} <= set(metrics.get("ece") or {}):
            names.append("04_reliability.png")
    # The analyses (cbdlib.analysis), where metrics.json holds them.
    if metrics.get("probes"):
        names += ["04_probe_table.csv", "04_probes.png"]
    if metrics.get("ece"):
        names.append("04_ece_table.csv")
    if metrics.get("teacher_agreement"):
        names += ["04_teacher_agreement.csv", "04_teacher_agreement.png"]
    return names


def check_outputs(notebook: str, run_dir: str | Path, metrics: Optional[Mapping] = None,
                  since: Optional[float] = None) -> list[str]:
    """Raise ``CBDError`` naming every expected output that is missing or older than ``since``
    (default: this kernel's start of the notebook); print what was checked and return the names."""
    names = expected_outputs(notebook, run_dir, metrics)
    if since is None:
        if notebook not in _started:
            raise CBDError(f"notebook {notebook} was not set up in this kernel: run its setup cell first")
        since = _started[notebook]
    figures = Path(run_dir) / "figures"
    missing = [n for n in names if not (figures / n).is_file()]
    stale = [n for n in names if n not in missing and (figures / n).stat().st_mtime < since - CLOCK_SLACK_S]
    if missing or stale:
        problems = []
        if missing:
            problems.append(f"did not write {', '.join(missing)}")
        if stale:
            problems.append(f"left older copies of {', '.join(stale)} (written before this execution)")
        raise CBDError(f"notebook {notebook} {' and '.join(problems)} in {figures}")
    print(f"notebook {notebook}: all {len(names)} figures and tables written to {figures}")
    return names


__all__ = ["ALWAYS", "check_outputs", "expected_outputs", "mark_started"]
