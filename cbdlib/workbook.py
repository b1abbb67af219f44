"""The notebooks' one entry point into the library.

A notebook's ``parameters`` cell holds literals; the next cell calls ``setup(globals(), notebook="02")``
(``analysis_setup`` in notebook 04), which refuses a parameter papermill injected but the notebook does
not declare, checks the declared ones against the one schema (``config.make_params``), resolves them
into ``Settings`` and finds the run folder ``$CBD_RESULTS_DIR/<run_name>/`` from the package, so that
papermill, nbval and JupyterLab agree. What notebook 04 reads of a finished run is
``analysis/views.py``'s, handed on from here. Everything raises ``CBDError`` with a one-line message
for bad input.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional

from . import runs
from .analysis.views import (  # noqa: F401  (notebook 04 reads a finished run through these)
    available,
    has_features,
    key_methods,
    paired_features,
    post_hoc_choices,
    post_hoc_curves,
    reading,
    restrict,
    save_table,
    split_summary,
    student_and_baseline,
    teacher_names,
    tsne_teacher,
)
from .config import SMOKE_MAX_PER_CLASS, Settings, check_value, field_names, make_params, resolve, smoke_enabled
from .errors import CBDError
from .io import refuse_links
from .methods import DECOUPLED_BASELINES, STUDENTS, best_baseline, check_method_name, is_teacher, stands_on  # noqa: F401
from .notebook_outputs import check_outputs, expected_outputs, mark_started  # noqa: F401
from .notebook_params import (
    Notebook,
    check_injected,
    check_own_type,
    collect_params,
    declared,
    declared_in,
    notebook_path,
    stage_two_values,
)
from .param_rules import check_rule
from .plots import imbalance_explorer  # noqa: F401  (notebook 01 calls it from here)
from .runs.records import class_names, evaluation, history, load_metrics  # noqa: F401
from .text import first_few

TSNE_SMOKE_POINTS = 200   # t-SNE points at most under smoke (notebook 04)


# --------------------------------------------------------------------------- parameters


def setup(namespace: Mapping[str, Any], notebook: str) -> tuple[Settings, Path]:
    """Validate a training notebook's parameters (01, 02, 03) and return ``(settings, run_dir)``.

    Only the notebook's declared parameters are read from ``namespace``. Schema keys that 01
    and 02 do not declare keep the schema's defaults; notebook 03 takes them from the run
    folder's ``params.yaml`` (``notebook_params.stage_two_values``). Nothing is written here.
    """
    if notebook == "04":
        raise CBDError("notebook 04 reads a finished run: use workbook.analysis_setup")
    check_same_package()
    check_injected(namespace, notebook)
    values = collect_params(namespace, declared(notebook))
    if notebook == "03":  # it continues notebook 02's experiment: the rest from the run folder
        values = stage_two_values(values, runs.run_dir_for(values.get("run_name", "default")))
    settings = resolve(make_params(values))
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
    check_same_package()
    check_injected(namespace, "04")
    path = notebook_path("04")
    nb = Notebook(path, declared_in(path))
    values = collect_params(namespace, nb.declared)
    schema_keys = set(field_names())
    for key, value in values.items():  # schema keys as the schema checks them, its own as cbdlib run does
        if key in schema_keys:
            check_rule(key, check_value(key, value))
        else:
            check_own_type(nb, key, value)
    teacher = values.get("tsne_method_teacher")
    if teacher is not None and not is_teacher(teacher):
        # it becomes part of a file name: a teacher's name only (teacher_<vanilla|aug>_<seed>)
        raise CBDError(f"parameter 'tsne_method_teacher' must be a teacher's name (teacher_<vanilla|aug>_<seed>) "
                       f"or None, got {teacher!r}")
    points = values.get("tsne_points", 1000)
    if points < 10:
        raise CBDError(f"parameter 'tsne_points' must be an integer >= 10, got {points!r}")
    methods = values.get("methods")
    for name in methods or ():
        check_method_name(name)
    smoke = smoke_enabled(values.get("smoke"))
    options = AnalysisOptions(
        run_name=values.get("run_name", "default"), methods=methods, tsne_method_teacher=teacher,
        tsne_points=min(points, TSNE_SMOKE_POINTS) if smoke else points, smoke=smoke)
    run_dir = runs.run_dir_for(options.run_name)
    runs.refuse_if_busy(run_dir)
    refuse_links(run_dir)  # notebook 04 writes figures into it
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


def configure_logging() -> None:
    """The ``cbdlib`` logger at INFO, one line per record (the message alone) to stdout (idempotent)."""
    logger = logging.getLogger("cbdlib")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        logger.addHandler(_StdoutHandler())  # logging's default format: the message alone
    logger.propagate = False


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
    from .devices import resolve_device

    s = settings
    device = resolve_device(s.device)
    smoke = " (smoke profile: CBD_SMOKE or smoke=True)" if s.smoke else ""
    lines = [
        f"run folder: {run_dir}",
        f"dataset: {s.dataset}{f' ({s.data})' if s.data else ''}, imbalance ratio {ratio_text(s.imbalance_ratio)} "
        f"({s.profile}), lt_seed {s.lt_seed}{smoke}",
        f"model: {s.arch}, {s.epochs} epochs, batch {s.batch_size}",
        f"optimiser: SGD lr {s.lr:g} (used), momentum {s.momentum}, weight decay {s.weight_decay:g}, "
        f"schedule {s.schedule}" + (f" with {s.warmup_epochs} warm-up epochs" if s.schedule == "cifar_lt" else ""),
        f"decoupled baselines (Kang et al.): cRT {s.decoupled_epochs} / LWS {s.lws_epochs} epochs of class-aware "
        f"sampling, lr {s.decoupled_lr:g}, weight decay {s.decoupled_weight_decay:g}, cosine; BatchNorm "
        f"{s.decoupled_bn}; NCM {s.ncm_variant}; final epoch reported (they keep the best-validation one)",
        f"teachers: {', '.join(s.teachers)}; training seeds: {s.seeds}",
        f"distillation: alpha {s.alpha:g}, beta {s.beta:g}, cosine scale {s.cosine_scale:g}",
        f"device: {device} (asked: {s.device})",
    ]
    if s.max_train_per_class is not None:
        lines.append(f"smoke caps: at most {s.max_train_per_class} training and {s.max_test_per_class} "
                     f"test images per class")
    return "\n".join(lines)


# --------------------------------------------------------------------------- notebook 01


def ratio_text(imbalance_ratio) -> str:
    """``10``, or for ``None`` the words that say the class counts are the data's own."""
    return "none: the natural class counts, kept as they are" if imbalance_ratio is None else f"{imbalance_ratio:g}"


def load_data(settings: Settings):
    """The long-tailed subset a real run of these settings trains on (no smoke caps).

    Notebook 01 describes the dataset itself; smoke only shortens training.
    """
    from .data import load_for_settings

    return load_for_settings(replace(settings, max_train_per_class=None, max_test_per_class=None))


def dataset_summary(settings: Settings, data) -> str:
    """``format_stats`` of the subset plus what was asked for and the validation / test sizes."""
    from .data import format_stats

    lines = [
        f"dataset: {data.name}, images {'x'.join(str(v) for v in data.image_shape)}, "
        f"requested imbalance ratio {ratio_text(settings.imbalance_ratio)}"
        + (f" ({settings.profile} profile, lt_seed {settings.lt_seed})" if settings.imbalance_ratio else ""),
        format_stats(data.stats()),
        f"validation: {len(data.val_labels)} images (balanced, {settings.val_per_class} per class); "
        f"test: {len(data.test_labels)} images",
    ]
    if settings.smoke:
        lines.append(f"smoke runs train on at most {SMOKE_MAX_PER_CLASS} images per class; "
                     f"the statistics above are the full subset's")
    return "\n".join(lines)


# --------------------------------------------------------------------------- training notebooks


def experiment(settings: Settings, run_dir: Path):
    """``cbdlib.engine.Experiment`` on the run folder (same parameters resume, others are refused)."""
    from .engine.stages import Experiment

    return Experiment(settings, run_dir)


def stage_one_missing(settings: Settings, run_dir: Path) -> list[str]:
    """Checkpoints that notebook 03's stages need and notebook 02 makes, as ``method (seed s)``."""
    needed = stands_on([m for m in (*STUDENTS, *DECOUPLED_BASELINES) if m in settings.method_names],
                       settings.teacher_names)
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
        raise CBDError(f"{run_dir} lacks the trained {first_few(missing)}: {how}")
