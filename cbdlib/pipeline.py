"""``python -m cbdlib run`` and ``python -m cbdlib aggregate``: the batch side of the workbook.

``run_pipeline`` executes the numbered notebooks (``01_*.ipynb`` -> ``04_*.ipynb``) through
papermill into one run folder, giving each notebook the parameters its ``parameters`` cell
declares, then writes ``summary.md`` there and a line in ``<results>/index.csv``.
``aggregate_runs`` merges run folders of different training seeds into one (mean and std).
Both write ``summary.md`` with ``summary_markdown``.
"""
from __future__ import annotations

import ast
import contextlib
import csv
import dataclasses
import datetime as _dt
import difflib
import io
import json
import logging
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from . import config, runs
from .errors import CBDError
from .io import write_bytes, write_text

log = logging.getLogger(__name__)

NOTEBOOK_PATTERN = re.compile(r"^\d{2}_.+\.ipynb$")
SPLIT_COLUMNS = ("all", "many", "medium", "few", "head", "mid", "tail")
# Parameters a reader needs to judge a number (in this order in summary.md).
KEY_PARAMETERS = ("arch", "epochs", "batch_size", "lr", "schedule", "warmup_epochs",
                  "weight_decay", "momentum", "alpha", "beta", "cosine_scale", "projection", "teachers",
                  "decoupled_epochs", "lws_epochs", "decoupled_lr", "decoupled_weight_decay", "decoupled_bn",
                  "ncm_variant", "lt_seed", "val_per_class", "smoke")
BASELINES = (*config.ONE_STAGE_BASELINES, *config.DECOUPLED_BASELINES)
# How the decoupled baselines were run (docs/baselines.md has the references).
BASELINES_NOTE = (
    "Decoupled baselines as in Kang et al.'s code, on `ce`'s frozen backbone: cRT and LWS re-train the "
    "classifier with class-aware sampling (4 images per visited class, an epoch of largest class count x "
    "classes images; SGD, cosine decay to 0, BatchNorm statistics per `decoupled_bn`), tau-norm's tau is "
    "chosen on the balanced validation set, NCM per `ncm_variant`. Final epoch reported, they keep best-val."
)
INDEX_COLUMNS = ("finished_at", "run_name", "dataset", "imbalance_ratio", "seeds", "arch", "epochs", "cbd_ens_all",
                 "best_baseline", "best_baseline_all", "device", "git_commit", "wall_s", "path")


def default_notebooks_dir() -> Path:
    return config.project_root() / "notebooks"


# --- notebooks and their parameters ---------------------------------------------------------

@dataclasses.dataclass
class Notebook:
    """A numbered notebook and the parameters its ``parameters`` cell declares ({name: default literal})."""

    path: Path
    declared: dict

    @property
    def name(self) -> str:
        return self.path.name


def discover_notebooks(notebooks_dir: str | os.PathLike) -> list[Notebook]:
    """The ``NN_*.ipynb`` notebooks of a folder in reading order, with their declared parameters."""
    folder = Path(notebooks_dir)
    if not folder.is_dir():
        raise CBDError(f"notebook folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and NOTEBOOK_PATTERN.match(p.name))
    if not paths:
        raise CBDError(f"no numbered notebooks (NN_*.ipynb) in {folder}")
    return [Notebook(p, declared_parameters(p)) for p in paths]


def declared_parameters(path: Path) -> dict:
    """{name: default source text} of a notebook's ``parameters`` cell (papermill's inspection)."""
    import papermill

    try:
        with _quiet_logger("papermill"):
            inspected = papermill.inspect_notebook(str(path))
    except ValueError:
        # No kernel name in the notebook's metadata: inspect its cell with the Python translator,
        # the same one papermill uses for the python3 kernel we execute with.
        inspected = _inspect_python_cell(path)
    except Exception as exc:  # unreadable JSON, not a notebook, ...
        raise CBDError(f"cannot read the parameters of {path}: {_one_line(exc)}") from None
    return {name: info["default"] for name, info in inspected.items()}


def _inspect_python_cell(path: Path) -> dict:
    import nbformat
    from papermill.translators import papermill_translators

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            params = papermill_translators.find_translator("python3", "python").inspect(cell)
            return {p.name: p._asdict() for p in params}
    return {}


def _literal(source: str) -> tuple[bool, Any]:
    """(True, value) when a default is a Python literal, else (False, None)."""
    try:
        return True, ast.literal_eval(source)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def _fits_default(value: Any, default: Any) -> bool:
    """Whether a YAML-parsed value has the type of a notebook's default literal (None accepts anything)."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, list)
    if isinstance(default, dict):
        return isinstance(value, dict)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def _type_word(default: Any) -> str:
    if isinstance(default, bool):
        return "a boolean (true/false)"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, (list, tuple)):
        return "a list"
    if isinstance(default, dict):
        return "a mapping"
    if isinstance(default, str):
        return "a string"
    return type(default).__name__


def validate_keys(values: dict, notebooks: list[Notebook], sources: dict) -> None:
    """Every key is a Params field or declared by a notebook, and has the right type.

    ``sources`` says where each key came from (``-p`` or the parameter file) for the messages.
    """
    fields = config.field_names()
    notebook_keys = sorted({k for nb in notebooks for k in nb.declared} - set(fields))
    known = fields + notebook_keys
    for key, value in values.items():
        where = sources.get(key, f"{key}={_yaml_scalar(value)}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else f"known parameters: {', '.join(known)}"
            raise CBDError(f"{where}: unknown parameter {key!r}: no notebook or schema field declares it; {hint}")
        if key in fields:
            try:
                config.check_value(key, value)
            except CBDError as error:
                raise CBDError(f"{where}: {error}") from None
            continue
        for nb in notebooks:
            if key not in nb.declared:
                continue
            ok, default = _literal(nb.declared[key])
            if ok and not _fits_default(value, default):
                raise CBDError(f"{where}: parameter {key!r} must be {_type_word(default)} (its default in {nb.name} "
                               f"is {nb.declared[key]}), got {value!r} ({type(value).__name__})")


def _checked_params(values: dict, sources: dict) -> config.Params:
    """``config.make_params``, its range errors prefixed with where the value came from."""
    try:
        return config.make_params(values)
    except config.ParameterError as error:
        where = sources.get(error.key)
        raise CBDError(f"{where}: {error}" if where else str(error)) from None


def notebook_parameters(nb: Notebook, params: config.Params, extra: dict) -> dict:
    """What papermill injects into one notebook: the keys it declares, nothing else.

    Schema fields come from the complete ``Params`` (file + overrides + schema defaults), so
    every notebook sees the same experiment whatever its own defaults; notebook-only keys are
    passed only when given (else the notebook keeps its default).
    """
    values = dataclasses.asdict(params)
    out = {}
    for key in nb.declared:
        if key in values:
            out[key] = values[key]
        elif key in extra:
            out[key] = extra[key]
    return out


# --- run -----------------------------------------------------------------------------------

def run_pipeline(params_path: str | os.PathLike | None = None, overrides: dict | None = None, progress: bool = True,
                 notebooks_dir: str | os.PathLike | None = None) -> Path:
    """Execute the numbered notebooks into ``$CBD_RESULTS_DIR/<run_name>/``; returns the run folder."""
    overrides = dict(overrides or {})
    params_file = Path(params_path) if params_path is not None else config.params_dir() / "default.yaml"
    file_values = config.load_params_file(params_file)
    values = {**file_values, **overrides}
    if isinstance(values.get("data"), str) and not Path(values["data"]).expanduser().is_absolute():
        # The kernels run in notebooks/: a relative path means the one the command was started from.
        values["data"] = str(Path(values["data"]).expanduser().resolve())
    sources = {k: f"{params_file}" for k in file_values}
    sources.update({k: f"-p {k}={_yaml_scalar(v)}" for k, v in overrides.items()})

    fields = set(config.field_names())
    # Schema fields first: their types need no notebook. Then unknown and notebook-only keys.
    validate_keys({k: v for k, v in values.items() if k in fields}, [], sources)
    notebooks = discover_notebooks(notebooks_dir if notebooks_dir is not None else default_notebooks_dir())
    validate_keys(values, notebooks, sources)
    params = _checked_params({k: v for k, v in values.items() if k in fields}, sources)
    extra = {k: v for k, v in values.items() if k not in fields}
    settings = config.resolve(params)
    if settings.smoke:
        given = {k: v for k, v in values.items() if k in fields}
        origins = {k: "-p" if k in overrides else params_file.name for k in given}
        replaced = config.format_smoke_replacements(given, origins)
        if replaced:
            log.warning(replaced)
    declared_anywhere = {k for nb in notebooks for k in nb.declared}
    for key in sorted(set(values) - declared_anywhere):
        log.warning("warning: no notebook declares %r; it is recorded in params.yaml but no notebook receives it", key)

    run_dir = runs.ensure_run_dir(runs.run_dir_for(params.run_name))
    # One writer for the whole pipeline: a second invocation (or a notebook opened by hand) is
    # refused at once, while the kernels started here work under this lock with its token.
    with runs.run_lock(run_dir), kernel_environment(run_dir):
        _run_notebooks(run_dir, settings, params, extra, notebooks,
                       format_command(params_path, overrides), params_file, overrides, progress)
    return run_dir


def _run_notebooks(run_dir: Path, settings: config.Settings, params: config.Params, extra: dict, notebooks: list,
                   command: str, params_file: Path, overrides: dict, progress: bool) -> None:
    """The notebooks in order, then ``summary.md`` and the ``index.csv`` line (under the run's lock)."""
    # The run-folder rules before any notebook runs: refuse other parameters (unless overwrite),
    # else start or resume. The notebooks apply the same rules again with the same settings.
    runs.prepare_run_dir(run_dir, settings)

    log.info("run %s -> %s (%d notebooks)", params.run_name, run_dir, len(notebooks))
    ledger = run_dir / runs.NOTEBOOK_TIMES  # wall times summed over invocations (resumed runs)
    with _followed(run_dir, progress_mode(progress, settings.smoke)), runs.timed(ledger, "total"):
        for nb in notebooks:
            log.info("running %s ...", nb.name)
            with runs.timed(ledger, nb.name):
                seconds = execute_notebook(nb, run_dir, notebook_parameters(nb, params, extra))
            log.info("%s done in %s", nb.name, format_seconds(seconds))
    times = runs.wall_times(ledger)
    timings = {nb.name: times[nb.name]["s"] for nb in notebooks}
    resumed = {name for name, entry in times.items() if entry["resumed"]}
    wall_s = times["total"]["s"]

    metrics = _read_metrics(run_dir, required=False)
    if metrics is None:
        log.warning("warning: the notebooks wrote no metrics.json in %s; summary.md has no results table", run_dir)
    stored = runs.read_params_yaml(run_dir) or runs.effective_params(settings)
    text = summary_markdown(run_dir, metrics, params=stored, command=command, params_file=params_file,
                            overrides=overrides, timings=timings, wall_s=wall_s, resumed=resumed)
    summary = run_dir / "summary.md"
    write_text(summary, text)
    append_index(index_row(run_dir, metrics, stored, wall_s))
    print(summary)


# Set for the kernels: the command's package, so they import the same cbdlib (checked by workbook.setup).
PACKAGE_ENV = "CBD_PACKAGE_DIR"


def package_dir() -> Path:
    """The folder of the ``cbdlib`` package this process imported."""
    return Path(__file__).resolve().parent


@contextlib.contextmanager
def kernel_environment(run_dir: Path):
    """The environment the notebook kernels start with: this process's package first on their
    ``PYTHONPATH``, its resolved results folder, and the token of its lock on ``run_dir``.

    Without it a kernel imports whichever ``cbdlib`` its own ``sys.path`` finds (an editable
    install of another clone) and writes into that clone's ``results/``.
    """
    path = [str(package_dir().parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                          if p and p != str(package_dir().parent)]
    values = {"PYTHONPATH": os.pathsep.join(path), "CBD_RESULTS_DIR": str(runs.results_root().resolve()),
              PACKAGE_ENV: str(package_dir()), runs.LOCK_TOKEN_ENV: runs.lock_token(run_dir)}
    for name in ("CBD_CIFAR10", "CBD_CIFAR100", "CBD_CACHE_DIR"):  # the kernels run in notebooks/
        if os.environ.get(name):
            values[name] = str(Path(os.environ[name]).expanduser().resolve())
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute_notebook(nb: Notebook, run_dir: Path, parameters: dict) -> float:
    """Run one notebook with papermill into the run folder; returns its wall time in seconds."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output = run_dir / nb.name
    # papermill rewrites its output after every cell: write a temporary copy and rename it at the
    # end, so a full disk or a kill never leaves the executed notebook as broken JSON.
    partial = run_dir / f".partial_{nb.name}"
    t0 = time.perf_counter()
    try:
        with _quiet_logger("papermill"):
            papermill.execute_notebook(str(nb.path), str(partial), parameters=parameters, kernel_name="python3",
                                       cwd=str(nb.path.parent), progress_bar=False, log_output=False,
                                       config=kernel_config())
    except PapermillExecutionError as exc:
        _keep_executed(partial, output)
        raise CBDError(f"{nb.name} failed in cell {exc.exec_count}: {_error_line(exc.ename, exc.evalue)}; "
                       f"the partly executed notebook is {output}") from None
    except _kernel_errors() as exc:
        # The kernel died (out of memory), is missing, or a cell timed out: not a bug of the notebook.
        _keep_executed(partial, output)
        raise CBDError(f"{nb.name} stopped: {type(exc).__name__}: {_one_line(exc)}; "
                       f"the partly executed notebook is {output}") from None
    except OSError as exc:  # the disk is full (or the folder went away) while papermill writes
        partial.unlink(missing_ok=True)
        kept = "the previous copy is kept" if output.exists() else "nothing was kept"
        raise CBDError(f"could not write the executed notebook {output}: {exc.strerror or exc} ({kept}); "
                       f"free some space and rerun the same command to resume") from None
    _keep_executed(partial, output)
    return time.perf_counter() - t0


def _keep_executed(partial: Path, output: Path) -> None:
    """Rename papermill's copy over the executed notebook, if it is whole; relay its warnings."""
    try:
        executed = json.loads(partial.read_text())
    except (OSError, ValueError):
        partial.unlink(missing_ok=True)
        return
    os.replace(partial, output)
    for line in notebook_warnings(executed):
        log.warning("%s (%s)", line, output.name)


def notebook_warnings(executed: dict) -> list[str]:
    """The ``warning:`` lines a notebook's cells printed (recovery notes, skipped damage, ...)."""
    lines = []
    for cell in executed.get("cells", []):
        for output in cell.get("outputs", []):
            text = output.get("text", "")
            text = "".join(text) if isinstance(text, list) else str(text)
            lines += [line.strip() for line in text.splitlines() if line.strip().startswith("warning:")]
    return list(dict.fromkeys(lines))


def _kernel_errors() -> tuple:
    from jupyter_client.kernelspec import NoSuchKernel
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    return (DeadKernelError, CellTimeoutError, NoSuchKernel)


def _error_line(ename: str, evalue: str) -> str:
    lines = [line.strip() for line in str(evalue or "").splitlines() if line.strip()]
    return f"{ename}: {lines[0]}" if lines else str(ename)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def kernel_config():
    """The kernels' configuration: CurveZMQ keys provisioned by the kernel manager where
    jupyter_client and the kernel support them, so the kernels' local sockets are encrypted
    (and ipykernel does not warn that they are not)."""
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config

    config = Config()
    if KernelManager.class_traits().get("transport_encryption") is not None:
        import zmq

        if zmq.has("curve"):
            config.KernelManager.transport_encryption = "auto"
    return config


def _is_tty() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress_mode(progress: bool, smoke: bool) -> str | None:
    """``bar`` in a terminal, ``lines`` otherwise (CI, nohup), None when asked for none or smoke."""
    if not progress or smoke:
        return None
    return "bar" if _is_tty() else "lines"


@contextlib.contextmanager
def _followed(run_dir: Path, mode: str | None):
    """Follow the run folder's history while the notebooks run (see ``cbdlib.progress``); the
    kernels, told so by ``CBD_PROGRESS``, then print one line per model and no bars."""
    from .progress import PROGRESS_ENV, RunFollower

    previous = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "parent"
    follower = RunFollower(run_dir, mode).start() if mode is not None else None
    try:
        if mode == "bar":
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():  # log lines print above the bar
                yield
        else:
            yield
    finally:
        if follower is not None:
            follower.stop()
        if previous is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = previous


def format_command(params_path, overrides: dict) -> str:
    """The ``python -m cbdlib run`` command that reproduces a run."""
    parts = ["python", "-m", "cbdlib", "run"]
    if params_path is not None:
        parts += ["--params", _display_path(Path(params_path))]
    for key, value in overrides.items():
        parts += ["-p", f"{key}={_yaml_scalar(value)}"]
    return " ".join(shlex.quote(p) for p in parts)


def _yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


def _display_path(path: Path) -> str:
    """A path relative to the project root when it lies inside it, else as given."""
    try:
        return str(path.resolve().relative_to(config.project_root()))
    except ValueError:
        return str(path)


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _read_metrics(run_dir: Path, required: bool = True) -> dict | None:
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        if required:
            raise CBDError(f"{run_dir} has no metrics.json (has the run finished?)")
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CBDError(f"{path} is not valid JSON: {_one_line(exc)}") from None


# --- summary.md ------------------------------------------------------------------------------

def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def format_split_table(metrics: dict) -> str:
    """Methods x splits (all, many, medium, few, head, mid, tail) in %, mean ± std over seeds."""
    splits = metrics.get("splits", {})
    header = ["method", "seeds"] + [
        key if key == "all" else f"{key} ({len(splits.get(key, []))})" for key in SPLIT_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name in runs.method_order(list(metrics.get("methods", {}))):
        record = metrics["methods"][name]
        std = metrics.get("std", {}).get(name, {})
        seeds = record.get("seeds") or metrics.get("seeds", [])
        cells = [f"`{name}`", str(len(seeds))]
        for key in SPLIT_COLUMNS:
            mean = record.get(key)
            if mean is None:
                cells.append("n/a")
            elif len(seeds) > 1 and std.get(key) is not None:
                cells.append(f"{_percent(mean)} ± {_percent(std[key])}")
            else:
                cells.append(_percent(mean))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _split_description(metrics: dict) -> list[str]:
    from .data.stats import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD

    splits = metrics.get("splits", {})
    n = {k: len(splits.get(k, [])) for k in SPLIT_COLUMNS[1:]}
    return [
        f"- many-shot (> {MANY_SHOT_THRESHOLD} training images): {n['many']} class{'' if n['many'] == 1 else 'es'}; "
        f"medium ({FEW_SHOT_THRESHOLD}-{MANY_SHOT_THRESHOLD}): {n['medium']}; "
        f"few (< {FEW_SHOT_THRESHOLD}): {n['few']}",
        f"- head / mid / tail (thirds by training count): {n['head']} / {n['mid']} / {n['tail']} classes",
    ]


def summary_markdown(run_dir: str | os.PathLike, metrics: dict | None, *, params: dict | None = None,
                     command: str | None = None, params_file: str | os.PathLike | None = None,
                     overrides: dict | None = None, timings: dict | None = None, wall_s: float | None = None,
                     merged_from: list | None = None, resumed: set | None = None) -> str:
    """The run folder's ``summary.md``: how it was produced, the data, the results, the evidence.

    ``timings`` and ``wall_s`` are summed over invocations; ``resumed`` names the notebooks (and
    ``"total"``) that an earlier, interrupted invocation had started.
    """
    run_dir = Path(run_dir)
    params = params or {}
    title = params.get("run_name") or run_dir.name
    out = [f"# {title}", ""]
    if params.get("smoke"):
        out += ["**Smoke run**: tiny model, a few epochs, a handful of images. It checks the plumbing; "
                "its numbers are not results.", ""]

    out += ["## How this was produced", ""]
    if merged_from:
        out.append(f"Merged with `python -m cbdlib aggregate` from {len(merged_from)} run folders "
                   "(mean and std over all their training seeds):")
        out += [f"- `{entry['path']}`: seeds {', '.join(map(str, entry['seeds']))}" for entry in merged_from]
        short = (metrics or {}).get("partial") or {}
        if short:
            every = len((metrics or {}).get("seeds", []))
            out.append("- **partial merge** (`--partial`): " + "; ".join(
                f"`{m}` is the mean of {len(s)} of {every} seeds ({', '.join(map(str, s)) or 'none'})"
                for m, s in short.items()))
    if command:
        out.append(f"- command: `{command}`")
    if params_file is not None:
        out.append(f"- parameter file: `{_display_path(Path(params_file))}`")
    if command is not None or overrides:
        shown = ", ".join(f"`{k}={_yaml_scalar(v)}`" for k, v in (overrides or {}).items()) or "none"
        out.append(f"- overrides: {shown}")
    out.append(f"- written: {_now_iso()}")
    out.append("")

    if metrics is not None:
        counts = metrics.get("class_counts", [])
        out += ["## Data", ""]
        measured = f" (measured max/min {max(counts) / min(counts):.1f})" if counts and min(counts) > 0 else ""
        out.append(f"- dataset: {metrics.get('dataset')}, imbalance ratio {metrics.get('imbalance_ratio')}{measured}"
                   f"{', profile ' + str(params['profile']) if params.get('profile') else ''}")
        out.append(f"- {len(counts)} classes, {sum(counts)} training images; class counts by label: "
                   f"{' '.join(str(c) for c in counts)}")
        out += _split_description(metrics)
        out.append("")

        seeds = metrics.get("seeds", [])
        out += ["## Results", "",
                f"Test top-1 accuracy in %, final epoch, mean ± std over training seeds {seeds} "
                "(population std; one seed shows the mean only). Split headers give their number of classes; "
                "n/a: no class in that split.", "",
                format_split_table(metrics), ""]
        if any(b in metrics.get("methods", {}) for b in config.DECOUPLED_BASELINES):
            out += [BASELINES_NOTE, ""]
    else:
        out += ["## Results", "", "No `metrics.json` in this folder: the notebooks wrote no results.", ""]

    if params:
        out += ["## Parameters that matter", "", "| parameter | value |", "|---|---|"]
        out += [f"| {k} | `{_yaml_scalar(params[k])}` |" for k in KEY_PARAMETERS if k in params]
        note = "`lr` is the learning rate used"
        if (run_dir / "params.yaml").exists():
            note += "; every parameter is in [params.yaml](params.yaml)"
        out += ["", note + ".", ""]

    if metrics is not None:
        out += ["## Evidence", ""]
        out.append(f"- device: {metrics.get('device')}")
        out.append(f"- precision of the training steps: {metrics.get('precision', 'not recorded')} "
                   f"(evaluation is float32)")
        out.append(f"- torch: {metrics.get('torch')}")
        out.append(f"- git commit: `{metrics.get('git_commit')}`")
        out.append("")

    resumed = resumed or set()
    if timings:
        out += ["## Wall time", "", "Summed over every invocation of the command; *resumed*: an earlier "
                "invocation was interrupted and this one went on from its checkpoints.", "",
                "| stage | wall time |", "|---|---:|"]
        out += [f"| {name} | {format_seconds(seconds)}{' (resumed)' if name in resumed else ''} |"
                for name, seconds in timings.items()]
        total = wall_s if wall_s is not None else sum(timings.values())
        out += [f"| **total** | {format_seconds(total)}{' (resumed)' if 'total' in resumed else ''} |", ""]
    if metrics is not None and metrics.get("stage_times_s"):
        again = set(metrics.get("resumed_stages", []))
        out.append("Training stages (summed over every invocation of the engine): " + ", ".join(
            f"{k} {format_seconds(v)}{' (resumed)' if k in again else ''}" for k, v in metrics["stage_times_s"].items()))
        out.append("")

    figures = sorted((run_dir / "figures").glob("*.png")) if (run_dir / "figures").is_dir() else []
    tables = sorted((run_dir / "figures").glob("*.csv")) if (run_dir / "figures").is_dir() else []
    if figures or tables:
        out += ["## Figures", ""]
        for fig in figures:
            out += [f"![{fig.stem}](figures/{fig.name})", ""]
        if tables:
            out += ["Tables: " + ", ".join(f"[{t.name}](figures/{t.name})" for t in tables), ""]
    notebooks = sorted(p for p in run_dir.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))
    if notebooks:
        out += ["## Executed notebooks", ""]
        out += [f"- [{p.name}]({p.name})" for p in notebooks]
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# --- results/index.csv ----------------------------------------------------------------------

def index_row(run_dir: Path, metrics: dict | None, params: dict, wall_s: float) -> dict:
    metrics = metrics or {}
    methods = metrics.get("methods", {})
    baselines = [(methods[b]["all"], b) for b in BASELINES if b in methods and methods[b].get("all") is not None]
    best_all, best = max(baselines) if baselines else (None, "")
    cbd_ens = methods.get("cbd_ens", {}).get("all")
    return {
        "finished_at": _now_iso(),
        "run_name": params.get("run_name", run_dir.name),
        "dataset": metrics.get("dataset", params.get("dataset", "")),
        "imbalance_ratio": metrics.get("imbalance_ratio", params.get("imbalance_ratio", "")),
        "seeds": " ".join(str(s) for s in metrics.get("seeds", params.get("seeds", []))),
        "arch": params.get("arch", ""),
        "epochs": params.get("epochs", ""),
        "cbd_ens_all": "" if cbd_ens is None else f"{cbd_ens:.4f}",
        "best_baseline": best,
        "best_baseline_all": "" if best_all is None else f"{best_all:.4f}",
        "device": metrics.get("device", ""),
        "git_commit": metrics.get("git_commit", ""),
        "wall_s": f"{wall_s:.1f}",
        "path": str(run_dir),
    }


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside ``path`` so two runs finishing together do not lose a line."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def append_index(row: dict, index_path: Path | None = None) -> Path:
    """Add one line to ``<results>/index.csv`` (header created if absent), written atomically."""
    path = index_path or runs.results_root() / "index.csv"
    with _locked(path):
        rows, columns = [], list(INDEX_COLUMNS)
        if path.exists():
            reader = csv.DictReader(io.StringIO(path.read_text()))
            columns += [c for c in (reader.fieldnames or []) if c not in columns]
            rows = list(reader)
        rows.append(row)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(path, buffer.getvalue())
    return path


# --- aggregate -------------------------------------------------------------------------------

# Parameters that may differ between runs merged by aggregate (the rest define the experiment).
MERGEABLE_KEYS = runs.RESUMABLE_KEYS | {"seeds", "run_name", "data"}


def aggregate_runs(run_dirs: list, out: str | os.PathLike, partial: bool = False) -> Path:
    """Merge run folders of different training seeds of one experiment into ``out`` (mean and std).

    A run whose methods did not all finish is refused; with ``partial`` it is merged and every
    mean says (on the console and in ``summary.md``) how many seeds it covers.
    """
    if not run_dirs:
        raise CBDError("aggregate needs at least one run folder")
    out = Path(out)
    loaded = []
    for run in run_dirs:
        run = Path(run)
        if not run.is_dir():
            raise CBDError(f"run folder not found: {run}")
        if out.resolve() == run.resolve():
            raise CBDError(f"--out {out} is one of the run folders; choose a new folder")
        metrics = _read_metrics(run)
        try:
            runs.validate_metrics(metrics)
        except (CBDError, ValueError) as exc:
            raise CBDError(f"{run}/metrics.json: {_one_line(exc)}") from None
        evaluations = runs.load_evaluations(run)
        if not evaluations:
            raise CBDError(f"{run} has no evaluations/seed_*/*.json to merge")
        seeds = sorted({s for per_seed in evaluations.values() for s in per_seed})
        loaded.append({"path": run, "metrics": metrics, "evaluations": evaluations, "seeds": seeds,
                       "params": runs.read_params_yaml(run)})

    first = loaded[0]
    for other in loaded[1:]:
        for key in ("dataset", "class_counts", "imbalance_ratio"):
            if other["metrics"][key] != first["metrics"][key]:
                raise CBDError(f"cannot merge {first['path']} and {other['path']}: different {key} "
                               f"({_short(first['metrics'][key])} vs {_short(other['metrics'][key])})")
        if first["params"] and other["params"]:
            differ = sorted(k for k in set(first["params"]) | set(other["params"])
                            if k not in MERGEABLE_KEYS and first["params"].get(k) != other["params"].get(k))
            if differ:
                detail = ", ".join(f"{k}: {first['params'].get(k)!r} vs {other['params'].get(k)!r}" for k in differ[:4])
                raise CBDError(f"cannot merge {first['path']} and {other['path']}: different parameters ({detail})")
    owner: dict[int, Path] = {}
    for entry in loaded:
        for seed in entry["seeds"]:
            if seed in owner:
                raise CBDError(f"seed {seed} appears in both {owner[seed]} and {entry['path']}; "
                               "aggregate merges runs of different training seeds")
            owner[seed] = entry["path"]

    merged: dict[str, dict[int, dict]] = {}
    for entry in loaded:
        for method, per_seed in entry["evaluations"].items():
            merged.setdefault(method, {}).update(per_seed)
    short = _short_coverage(loaded, merged, sorted(owner), partial)
    prov = {key: _joined(entry["metrics"].get(key, "unknown") for entry in loaded)
            for key in ("device", "torch", "git_commit", "precision")}
    m0 = first["metrics"]
    metrics = runs.build_metrics(merged, dataset=m0["dataset"], imbalance_ratio=m0["imbalance_ratio"],
                                 class_counts=m0["class_counts"], splits=m0["splits"], seeds=sorted(owner),
                                 prov=prov)
    merged_from = [{"path": str(entry["path"]), "seeds": entry["seeds"]} for entry in loaded]
    metrics["merged_from"] = merged_from
    if short:
        metrics["partial"] = {method: seeds for method, seeds in short.items()}
    runs.validate_metrics(metrics)

    _prepare_aggregate_dir(out)
    for entry in loaded:
        for method, per_seed in entry["evaluations"].items():
            for seed in per_seed:
                source = runs.evaluation_path(entry["path"], seed, method)
                write_bytes(runs.evaluation_path(out, seed, method), source.read_bytes())
    runs.write_metrics(out, metrics, _class_names(loaded, len(m0["class_counts"])))
    params = dict(first["params"] or {})
    if params:
        params["seeds"] = sorted(owner)
    params["run_name"] = out.name
    text = summary_markdown(out, metrics, params=params, merged_from=merged_from)
    write_text(out / "summary.md", text)
    log.info("merged %d runs (seeds %s) into %s", len(loaded), sorted(owner), out)
    for method, seeds in short.items():
        log.warning("warning: partial merge: %s is the mean of %d of %d seeds (%s)", method, len(seeds),
                    len(owner), ", ".join(map(str, seeds)))
    print(out / "summary.md")
    return out


def _expected_methods(params: dict | None) -> list[str]:
    """The methods a run folder's parameters ask for (its evaluations must hold each, for every seed)."""
    if not params:
        return []
    try:
        methods = params.get("methods") or config.all_method_names(params.get("teachers") or [])
    except CBDError:
        return []
    return [m for m in methods if m != "teachers"]


def _short_coverage(loaded: list, merged: dict, seeds: list, partial: bool) -> dict[str, list]:
    """{method: seeds it covers} for every method that misses a seed; refused unless ``partial``."""
    how = ("finish it with the command that made it, or pass --partial to merge what there is "
           "(each mean then says how many seeds it covers)")
    for entry in loaded:
        missing = [f"{m} (seed {s})" for s in entry["seeds"] for m in _expected_methods(entry["params"])
                   if s not in entry["evaluations"].get(m, {})]
        if missing and not partial:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise CBDError(f"cannot merge {entry['path']}: the run is unfinished (no evaluation of {shown}); {how}")
    short = {m: sorted(per_seed) for m, per_seed in merged.items() if sorted(per_seed) != seeds}
    for entry in loaded:  # a method that must be there but is in no run at all
        for m in _expected_methods(entry["params"]):
            if m not in merged:
                short[m] = []
    if short and not partial:
        method, covered = next(iter(short.items()))
        lacking = [str(e["path"]) for e in loaded if not set(e["seeds"]) <= set(covered)]
        raise CBDError(f"cannot merge: {method} has results for seeds {covered} of {seeds} "
                       f"({', '.join(lacking[:2])} lacks it); {how}")
    return {m: short[m] for m in runs.method_order(list(short))}


def _prepare_aggregate_dir(out: Path) -> None:
    """``out`` is new, empty, or a previous aggregate (its evaluations are replaced); never a run folder."""
    if (out / "params.yaml").exists() or (out / "checkpoints").exists():
        raise CBDError(f"{out} is a run folder; aggregate writes to a new folder")
    if (out / "metrics.json").exists():
        previous = _read_metrics(out, required=False) or {}
        if "merged_from" not in previous:
            raise CBDError(f"{out} already holds a metrics.json that is not an aggregate; choose a new folder")
        shutil.rmtree(out / "evaluations", ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CBDError(f"cannot create {out}: {exc.strerror or exc}") from None


def _class_names(loaded: list, num_classes: int) -> list:
    """Class names from an evaluation record, else a run's per_class.csv, else the label numbers."""
    for entry in loaded:
        for per_seed in entry["evaluations"].values():
            for record in per_seed.values():
                names = record.get("class_names")
                if isinstance(names, list) and len(names) == num_classes:
                    return [str(n) for n in names]
    for entry in loaded:
        path = entry["path"] / "per_class.csv"
        if path.exists():
            names: dict[int, str] = {}
            with contextlib.suppress(csv.Error, KeyError, ValueError):
                for row in csv.DictReader(io.StringIO(path.read_text())):
                    names[int(row["label"])] = row["class_name"]
            if len(names) == num_classes and set(names) == set(range(num_classes)):
                return [names[i] for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


def _joined(values) -> str:
    distinct = list(dict.fromkeys(str(v) for v in values))
    return "; ".join(distinct)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
