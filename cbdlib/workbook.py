"""The thin glue between the four notebooks and the library.

A notebook's ``parameters`` cell holds literals; the next cell calls
``setup(globals(), notebook="02")``, which

* refuses a parameter that papermill injected but the notebook does not declare
  (found in the kernel's input history: papermill's injected cell starts with
  ``# Parameters``), so ``-p epochz=5`` stops with a clear error instead of being
  ignored;
* collects the notebook's declared parameters from the namespace, checks them
  against the one schema (``cbdlib.config.make_params``) and resolves them
  (smoke profile, ``lr``) into ``Settings``;
* finds the run folder ``$CBD_RESULTS_DIR/<run_name>/`` from the package, not the
  working directory, so papermill, nbval and JupyterLab agree;
* shows the library's log (one line per epoch) in the notebook and draws figures inline.

The other functions read a run folder back for the analysis notebooks. Everything
here raises ``CBDError`` with a one-line message for bad input.
"""
from __future__ import annotations

import ast
import base64
import csv
import difflib
import io
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from . import runs
from .config import (
    DECOUPLED_BASELINES, ONE_STAGE_BASELINES, SMOKE_MAX_PER_CLASS, STUDENTS, Settings, check_rule, check_value,
    field_names, make_params, resolve, teacher_method_name,
)
from .errors import CBDError
from .notebook_outputs import check_outputs, expected_outputs, mark_started

# The parameters each notebook declares in its ``parameters`` cell (tests check the cells against this).
NOTEBOOK_PARAMETERS: dict[str, tuple[str, ...]] = {
    "01": ("run_name", "dataset", "data", "imbalance_ratio", "profile", "lt_seed", "val_per_class", "image_size",
           "smoke"),
    "02": tuple(field_names()),
    "03": tuple(field_names()),
    "04": ("run_name", "methods", "tsne_method_teacher", "tsne_points", "smoke"),
}
NOTEBOOK_FILES = {
    "01": "01_long_tail_statistics.ipynb",
    "02": "02_teacher_training.ipynb",
    "03": "03_class_balanced_distillation.ipynb",
    "04": "04_per_split_analysis.ipynb",
}
# papermill writes its injected cell with this first line (PythonTranslator.comment("Parameters")).
_INJECTED_HEADER = "# Parameters"
TSNE_SMOKE_POINTS = 200   # t-SNE points at most under smoke (notebook 04)
_TEACHER_NAME = re.compile(r"^teacher_(vanilla|aug)_\d+$")


# --------------------------------------------------------------------------- parameters


def collect_params(namespace: Mapping[str, Any], names=None) -> dict:
    """The values of ``names`` (default: every schema key) that ``namespace`` defines.

    A variable whose name is not one of ``names`` (a misspelt key, an import) is not collected.
    """
    names = field_names() if names is None else names
    return {name: namespace[name] for name in names if name in namespace}


def injected_names(namespace: Mapping[str, Any]) -> list[str]:
    """Names assigned by papermill's injected ``# Parameters`` cell (latest one), read from ``In``.

    Outside a kernel, or when nothing was injected, this is empty.
    """
    history = namespace.get("In")
    if not isinstance(history, (list, tuple)):
        return []
    for source in reversed(history):
        if isinstance(source, str) and source.lstrip().startswith(_INJECTED_HEADER):
            try:
                tree = ast.parse(source)
            except SyntaxError:
                return []
            names = []
            for node in tree.body:
                targets = node.targets if isinstance(node, ast.Assign) else []
                names += [t.id for t in targets if isinstance(t, ast.Name)]
            return names
    return []


def check_injected(namespace: Mapping[str, Any], notebook: str) -> None:
    """Refuse a parameter injected into ``notebook`` that its parameters cell does not declare."""
    declared = _declared(notebook)
    unknown = [n for n in injected_names(namespace) if n not in declared]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, declared, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise CBDError(f"notebook {notebook} has no parameter {name!r}{hint}; its parameters: {', '.join(declared)}")


def _declared(notebook: str) -> tuple[str, ...]:
    if notebook not in NOTEBOOK_PARAMETERS:
        raise CBDError(f"unknown notebook {notebook!r}; choose one of {', '.join(NOTEBOOK_PARAMETERS)}")
    return NOTEBOOK_PARAMETERS[notebook]


def setup(namespace: Mapping[str, Any], notebook: str) -> tuple[Settings, Path]:
    """Validate a training notebook's parameters (01, 02, 03) and return ``(settings, run_dir)``.

    Only the notebook's declared parameters are read from ``namespace``; schema keys the
    notebook does not declare keep the schema's defaults. Nothing is written here.
    """
    if notebook == "04":
        raise CBDError("notebook 04 reads a finished run: use workbook.analysis_setup")
    check_same_package()
    check_injected(namespace, notebook)
    settings = resolve(make_params(collect_params(namespace, _declared(notebook))))
    run_dir = runs.run_dir_for(settings.run_name)
    runs.refuse_if_busy(run_dir)
    notebook_environment()
    mark_started(notebook)  # the final check cell requires outputs written after this
    return settings, run_dir


def check_same_package() -> None:
    """In a kernel started by ``python -m cbdlib run``: refuse a ``cbdlib`` other than the command's."""
    from .pipeline import PACKAGE_ENV

    wanted = os.environ.get(PACKAGE_ENV)
    here = Path(__file__).resolve().parent
    if wanted and Path(wanted).resolve() != here:
        raise CBDError(f"this kernel imports cbdlib from {here}, but python -m cbdlib run runs {wanted}; "
                       f"start the command with the Python whose cbdlib you mean, or fix the kernel's PYTHONPATH")


@dataclass
class AnalysisOptions:
    """Notebook 04's parameters, checked."""

    run_name: str
    methods: Optional[list]
    tsne_method_teacher: Optional[str]
    tsne_points: int
    smoke: bool


def analysis_setup(namespace: Mapping[str, Any]) -> tuple[AnalysisOptions, Path]:
    """Validate notebook 04's parameters; returns ``(options, run_dir)``.

    Under smoke, t-SNE embeds at most ``TSNE_SMOKE_POINTS`` points.
    """
    from .config import smoke_enabled

    check_same_package()
    check_injected(namespace, "04")
    values = collect_params(namespace, _declared("04"))
    for key in ("run_name", "methods", "smoke"):
        if key in values:
            check_rule(key, check_value(key, values[key]))
    teacher = values.get("tsne_method_teacher")
    if teacher is not None and not isinstance(teacher, str):
        raise CBDError(f"parameter 'tsne_method_teacher' must be a method name or None, got {teacher!r}")
    points = values.get("tsne_points", 1000)
    if isinstance(points, bool) or not isinstance(points, int) or points < 10:
        raise CBDError(f"parameter 'tsne_points' must be an integer >= 10, got {points!r}")
    methods = values.get("methods")
    if methods is not None:
        for name in methods:
            _check_method_name(name)
    smoke = smoke_enabled(values.get("smoke"))
    options = AnalysisOptions(
        run_name=values.get("run_name", "default"), methods=methods, tsne_method_teacher=teacher,
        tsne_points=min(points, TSNE_SMOKE_POINTS) if smoke else points, smoke=smoke)
    run_dir = runs.run_dir_for(options.run_name)
    runs.refuse_if_busy(run_dir)
    notebook_environment()
    mark_started("04")
    return options, run_dir


# --------------------------------------------------------------------------- notebook environment


class _StdoutHandler(logging.Handler):
    """Writes each record to the current ``sys.stdout`` (the notebook cell's output in a kernel)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.WARNING and not text.startswith(("warning", "error")):
                text = f"warning: {text}"  # ``cbdlib run`` relays these lines to its console
            print(text, file=sys.stdout, flush=True)
        except Exception:  # noqa: BLE001 - logging must never break a cell
            self.handleError(record)


def configure_logging() -> logging.Logger:
    """The ``cbdlib`` logger at INFO, one line per record to stdout (idempotent)."""
    logger = logging.getLogger("cbdlib")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def notebook_environment() -> None:
    """Logging to the cell output; inside a Jupyter kernel, figures drawn inline.

    A kernel started with ``MPLBACKEND=Agg`` (tests, CI) would keep figures off the
    executed notebook; the inline backend is just as headless and shows them. Another
    interactive backend chosen by the user (``%matplotlib widget``) is left alone.
    """
    configure_logging()
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        return
    import matplotlib

    backend = matplotlib.get_backend().lower()
    if "inline" in backend or backend == "agg":
        # Activate the inline integration now, outside any plotting style context: activated
        # lazily inside cbdlib.plots' rc_context, its interactive flag is reset on exit and only
        # the first figure of the notebook is shown.
        shell.run_line_magic("matplotlib", "inline")


def describe(settings: Settings, run_dir: Path) -> str:
    """The effective settings of a run, as the notebook prints them."""
    from .engine.loop import resolve_device

    s = settings
    device = resolve_device(s.device)
    smoke = " (smoke profile: CBD_SMOKE or smoke=True)" if s.smoke else ""
    lines = [
        f"run folder: {run_dir}",
        f"dataset: {s.dataset}{f' ({s.data})' if s.data else ''}, imbalance ratio {s.imbalance_ratio:g} "
        f"({s.profile}), lt_seed {s.lt_seed}{smoke}",
        f"model: {s.arch}, {s.epochs} epochs, batch {s.batch_size}",
        f"optimiser: SGD lr {s.lr:g} (used), momentum {s.momentum}, weight decay {s.weight_decay:g}, "
        f"schedule {s.schedule}" + (f" with {s.warmup_epochs} warm-up epochs" if s.schedule == "cifar_lt" else ""),
        f"decoupled baselines (Kang et al.): cRT {s.decoupled_epochs} / LWS {s.lws_epochs} epochs of class-aware "
        f"sampling, lr {s.decoupled_lr:g}, weight decay {s.decoupled_weight_decay:g}, cosine; BatchNorm "
        f"{s.decoupled_bn}; NCM {s.ncm_variant}; final epoch reported (they keep the best-validation one)",
        f"teachers: {', '.join(s.params.teachers)}; training seeds: {s.seeds}",
        f"distillation: alpha {s.alpha:g}, beta {s.beta:g}, cosine scale {s.cosine_scale:g}",
        f"device: {device} (asked: {s.device})",
    ]
    if s.max_train_per_class is not None:
        lines.append(f"smoke caps: at most {s.max_train_per_class} training and {s.max_test_per_class} "
                     f"test images per class")
    return "\n".join(lines)


# --------------------------------------------------------------------------- notebook 01


def load_data(settings: Settings):
    """The long-tailed subset a real run of these settings trains on (no smoke caps).

    Notebook 01 describes the dataset itself; smoke only shortens training.
    """
    from .data import load_long_tail

    return load_long_tail(settings.dataset, settings.data, imbalance_ratio=settings.imbalance_ratio,
                          profile=settings.profile, lt_seed=settings.lt_seed, val_per_class=settings.val_per_class,
                          image_size=settings.image_size)


def dataset_summary(settings: Settings, data) -> str:
    """``format_stats`` of the subset plus what was asked for and the validation / test sizes."""
    from .data import format_stats

    lines = [
        f"dataset: {data.name}, images {'x'.join(str(v) for v in data.image_shape)}, "
        f"requested imbalance ratio {settings.imbalance_ratio:g} ({settings.profile} profile, lt_seed {settings.lt_seed})",
        format_stats(data.stats()),
        f"validation: {len(data.val_labels)} images (balanced, {settings.val_per_class} per class); "
        f"test: {len(data.test_labels)} images",
    ]
    if settings.smoke:
        lines.append(f"smoke runs train on at most {SMOKE_MAX_PER_CLASS} images per class; "
                     f"the statistics above are the full subset's")
    return "\n".join(lines)


def _png_output(fig) -> dict:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"), "text/plain": "<figure>"}}


def imbalance_explorer(n_max: int, class_names: list, imbalance_ratio: float = 10.0, profile: str = "exp"):
    """An imbalance-ratio slider and a profile menu redrawing the class histogram of ``long_tail_counts``.

    Returns an ``ipywidgets.VBox`` (``box.refresh()`` redraws, ``box.last_counts`` holds the
    counts drawn). It fills its ``Output`` directly, so it also builds without a frontend.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from . import plots
    from .data import class_splits, long_tail_counts

    ratio = w.FloatLogSlider(value=float(imbalance_ratio), base=10, min=0, max=3, step=0.05,
                             description="imbalance", continuous_update=False, readout_format=".0f")
    shape = w.Dropdown(options=["exp", "step"], value=profile, description="profile")
    note = w.HTML()
    out = w.Output()
    box = w.VBox([w.HBox([ratio, shape]), note, out])
    box.last_counts = None

    def refresh(*_):
        try:
            counts = long_tail_counts(int(n_max), len(class_names), float(ratio.value), shape.value)
            if min(counts) < 1:
                raise CBDError(f"imbalance ratio {ratio.value:.0f} leaves a class with no image (n_max {n_max})")
        except CBDError as error:
            note.value = f"<b>{error}</b>"
            return
        fig = plots.class_histogram(counts, class_splits(counts), class_names)
        plt.close(fig)  # shown through the Output widget only
        note.value = f"<small>n_max {n_max}: {sum(counts)} training images</small>"
        out.outputs = (_png_output(fig),)
        box.last_counts = counts

    ratio.observe(refresh, names="value")
    shape.observe(refresh, names="value")
    box.refresh = refresh
    refresh()
    return box


# --------------------------------------------------------------------------- training notebooks


def experiment(settings: Settings, run_dir: Path | None = None):
    """``cbdlib.engine.Experiment`` on the run folder (same parameters resume, others are refused)."""
    from .engine.stages import Experiment

    return Experiment(settings, run_dir if run_dir is not None else runs.run_dir_for(settings.run_name))


def stage_one_missing(settings: Settings, run_dir: Path) -> list[str]:
    """Checkpoints that notebook 03's stages need and notebook 02 makes, as ``method (seed s)``."""
    wanted = set(settings.methods)
    teachers = [teacher_method_name(kind, seed) for kind, seed in settings.teachers]
    needed = []
    if "cbd_ens" in wanted:
        needed += teachers
    elif "cbd" in wanted:
        needed += [teacher_method_name(kind, seed) for kind, seed in settings.teachers if kind == "vanilla"][:1]
    if wanted & set(DECOUPLED_BASELINES):
        needed.append("ce")
    return [f"{name} (seed {seed})" for seed in settings.seeds for name in needed
            if not runs.checkpoint_path(Path(run_dir), seed, name).exists()]


def require_stage_one(settings: Settings, run_dir: Path) -> None:
    """Stop notebook 03 with a clear message when notebook 02 has not run on this run folder."""
    run_dir = Path(run_dir)
    how = ("run notebook 02_teacher_training.ipynb first with the same parameters "
           "(or python -m cbdlib.train --stage teachers and --stage baselines)")
    if not (run_dir / "params.yaml").exists():
        raise CBDError(f"no run folder {run_dir} yet: {how}")
    missing = stage_one_missing(settings, run_dir)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise CBDError(f"{run_dir} lacks the trained {shown}: {how}")


def history(run_dir: Path, stages=None, models=None) -> list[dict]:
    """Per-epoch records of ``history.jsonl``, optionally only some stages / models."""
    records = runs.read_history(Path(run_dir))
    if stages is not None:
        records = [r for r in records if r.get("stage") in set(stages)]
    if models is not None:
        records = [r for r in records if r.get("model") in set(models)]
    return records


def teacher_names(metrics: Mapping) -> list[str]:
    """The individual teachers present in ``metrics`` (vanilla first, then by seed)."""
    names = [m for m in metrics.get("methods", {}) if _TEACHER_NAME.match(m)]
    return sorted(names, key=lambda m: (m.split("_")[1] != "vanilla", int(m.rsplit("_", 1)[1])))


def tau_choices(run_dir: Path, seeds):
    """Per seed, the tau of tau-norm chosen on the balanced validation set (a DataFrame)."""
    import pandas as pd

    rows = []
    for seed in seeds:
        path = runs.evaluation_path(Path(run_dir), seed, "tau_norm")
        if not path.exists():
            continue
        record = _read_json(path)
        rows.append({"seed": seed, "tau": record.get("tau"),
                     "validation balanced accuracy (%)": round(100 * record.get("tau_val_balanced_acc", float("nan")), 1),
                     "test top-1 (%)": round(100 * record["all"], 1)})
    return pd.DataFrame(rows, columns=["seed", "tau", "validation balanced accuracy (%)", "test top-1 (%)"])


def tau_curves(run_dir: Path, seeds) -> dict:
    """Per seed, tau-norm's validation curve: ``{seed: {"tau": [...], "val_acc": [...], "chosen": tau}}``.

    Seeds without a tau-norm evaluation, or whose evaluation predates the recorded curve, are left out.
    """
    curves = {}
    for seed in seeds:
        path = runs.evaluation_path(Path(run_dir), seed, "tau_norm")
        if not path.exists():
            continue
        record = _read_json(path)
        if "tau_val_curve" in record:
            curves[seed] = {"tau": record["tau_grid"], "val_acc": record["tau_val_curve"], "chosen": record["tau"]}
    return curves


# --------------------------------------------------------------------------- reading a run back


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise CBDError(f"{path} is not valid JSON ({exc.msg}); rerun the stage that wrote it") from None


def load_metrics(run_dir: Path) -> dict:
    """``<run>/metrics.json``, checked against the contract's schema."""
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        raise CBDError(f"{path} not found: run notebooks 02 and 03 with run_name {Path(run_dir).name!r} first, "
                       f"or python -m cbdlib run")
    metrics = _read_json(path)
    runs.validate_metrics(metrics)
    return metrics


def _check_method_name(name: Any) -> None:
    known = (*ONE_STAGE_BASELINES, *DECOUPLED_BASELINES, "teacher_ensemble", *STUDENTS)
    if not isinstance(name, str) or not (name in known or _TEACHER_NAME.match(name)):
        close = difflib.get_close_matches(str(name), known, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise CBDError(f"unknown method {name!r}{hint}; methods: {', '.join(known)}, teacher_<vanilla|aug>_<seed>")


def restrict(metrics: Mapping, methods=None) -> dict:
    """A copy of ``metrics`` holding only ``methods`` (in that order; None: all present).

    A known method absent from the run is left out with a printed note; an unknown name
    is an error.
    """
    present = list(metrics.get("methods", {}))
    if methods is None:
        keep = present
    else:
        for name in methods:
            _check_method_name(name)
        keep = [m for m in dict.fromkeys(methods) if m in metrics["methods"]]
        absent = [m for m in methods if m not in metrics["methods"]]
        if absent:
            print(f"note: not in this run, left out: {', '.join(absent)}")
    out = dict(metrics)
    out["methods"] = {m: metrics["methods"][m] for m in keep}
    out["std"] = {m: metrics.get("std", {}).get(m, {}) for m in keep}
    return out


def available(metrics: Mapping, method: str, what: str) -> bool:
    """Whether ``method`` is in the run; if not, print a one-line note saying what is skipped."""
    if method in metrics.get("methods", {}):
        return True
    print(f"note: {method} is not in this run, so {what} is skipped")
    return False


def best_baseline(metrics: Mapping) -> Optional[str]:
    """The single-model baseline with the best overall accuracy (the rule of ``plots.gain_vs_class_size``)."""
    from .plots import DEFAULT_BASELINES

    candidates = [b for b in DEFAULT_BASELINES if metrics["methods"].get(b, {}).get("all") is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda b: (metrics["methods"][b]["all"], -candidates.index(b)))


def split_summary(metrics: Mapping) -> str:
    """How many classes fall in each split (always printed next to split accuracies)."""
    s = metrics["splits"]
    return (f"{len(metrics['class_counts'])} classes; many-shot (>100) {len(s['many'])}, medium (20-100) "
            f"{len(s['medium'])}, few-shot (<20) {len(s['few'])}; head / mid / tail thirds "
            f"{len(s['head'])} / {len(s['mid'])} / {len(s['tail'])}; seeds {metrics['seeds']}")


def class_names(run_dir: Path, metrics: Mapping) -> list[str]:
    """Class names from ``per_class.csv`` (labels as text when it is absent)."""
    names = [str(c) for c in range(len(metrics["class_counts"]))]
    path = Path(run_dir) / "per_class.csv"
    if path.exists():
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                label = int(row["label"])
                if 0 <= label < len(names):
                    names[label] = row["class_name"]
    return names


def evaluation(run_dir: Path, seed: int, method: str) -> dict:
    """The evaluation record of one model and seed (test metrics and ``confusion``)."""
    path = runs.evaluation_path(Path(run_dir), seed, method)
    if not path.exists():
        raise CBDError(f"no evaluation of {method} (seed {seed}) in {run_dir}; run its stage first")
    return _read_json(path)


def load_features(run_dir: Path, seed: int, method: str) -> dict:
    """Saved test features of one model and seed: ``features``, ``labels``, ``indices`` arrays."""
    path = runs.features_path(Path(run_dir), seed, method)
    if not path.exists():
        raise CBDError(f"no saved features of {method} (seed {seed}) in {run_dir}; features are saved for the "
                       f"first listed teacher, ce and cbd_ens")
    with np.load(path) as data:
        return {key: data[key] for key in ("features", "labels", "indices")}


def has_features(run_dir: Path, seed: int, method: str) -> bool:
    """Whether test features of ``method`` were saved; prints a note when they were not."""
    if runs.features_path(Path(run_dir), seed, method).exists():
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
    folder = runs.features_path(Path(run_dir), seed, "x").parent
    saved = [p.stem for p in folder.glob("teacher_*.npz") if _TEACHER_NAME.match(p.stem)]
    saved.sort(key=lambda m: (m.split("_")[1] != "vanilla", int(m.rsplit("_", 1)[1])))
    if requested is not None:
        if runs.features_path(Path(run_dir), seed, requested).exists():
            return requested
        if saved:
            print(f"note: no saved features of {requested}; using {saved[0]}")
    if saved:
        return saved[0]
    print("note: no teacher features saved in this run, so the t-SNE is skipped")
    return None


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


def save_table(table, path: Path) -> Path:
    """Write a DataFrame as CSV (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path)
    return path


__all__ = [
    "NOTEBOOK_PARAMETERS", "AnalysisOptions", "analysis_setup", "available", "best_baseline", "check_injected",
    "check_outputs", "class_names", "collect_params", "configure_logging", "dataset_summary", "describe",
    "evaluation", "expected_outputs", "experiment", "has_features", "history", "imbalance_explorer",
    "injected_names", "key_methods", "load_data", "load_features", "load_metrics", "notebook_environment",
    "paired_features", "require_stage_one", "restrict", "save_table", "setup", "split_summary",
    "stage_one_missing", "student_and_baseline", "tau_choices", "tau_curves", "teacher_names", "tsne_teacher",
]
