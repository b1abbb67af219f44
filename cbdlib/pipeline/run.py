"""``python -m cbdlib run``: the numbered notebooks executed by papermill into one run folder,
under the run's lock, then its ``summary.md`` and a line in ``<results>/index.csv``."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from unittest import mock

from .. import config, runs
from ..analysis.reading import reading_lines
from ..config import yaml_scalar
from ..errors import CBDError, one_line
from ..io import write_text
from ..notebook_params import (
    Notebook,
    checked_values,
    default_notebooks_dir,
    discover_notebooks,
    notebook_parameters,
)
from ..plain_values import check_plain
from ..runs.records import load_metrics
from ..text import format_seconds
from .summary import append_index, display_path, index_row, summary_markdown

log = logging.getLogger("cbdlib.pipeline")


def run_pipeline(params_path: str | os.PathLike | None = None, overrides: dict | None = None, progress: bool = True,
                 notebooks_dir: str | os.PathLike | None = None) -> Path:
    """Execute the numbered notebooks into ``$CBD_RESULTS_DIR/<run_name>/``; returns the run folder."""
    overrides = dict(overrides or {})
    params_file = Path(params_path) if params_path is not None else config.params_dir() / "default.yaml"
    file_values = config.load_params_file(params_file)
    values = {**file_values, **overrides}
    for key, value in overrides.items():  # plain before the messages below print it (files: as read)
        check_plain(value, f"-p {key}")
    if isinstance(values.get("data"), str) and not Path(values["data"]).expanduser().is_absolute():
        # The kernels run in notebooks/: a relative path means the one the command was started from.
        values["data"] = str(Path(values["data"]).expanduser().resolve())
    sources = {k: f"{params_file}" for k in file_values}
    sources.update({k: f"-p {k}={yaml_scalar(v)}" for k, v in overrides.items()})

    fields = set(config.field_names())
    notebooks = discover_notebooks(notebooks_dir if notebooks_dir is not None else default_notebooks_dir())
    params = checked_values(values, notebooks, sources)  # the one check; everything below trusts it
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
                       format_command(params_path, overrides), params_file, progress)
    return run_dir


def _run_notebooks(run_dir: Path, settings: config.Settings, params: config.Params, extra: dict, notebooks: list,
                   command: str, params_file: Path, progress: bool) -> None:
    """The notebooks in order, then ``summary.md`` and the ``index.csv`` line (under the run's lock)."""
    # The run-folder rules before any notebook runs: refuse other parameters (unless overwrite),
    # else start or resume. The notebooks apply the same rules again with the same settings.
    runs.prepare_run_dir(run_dir, settings)

    log.info("run %s -> %s (%d notebooks)", params.run_name, run_dir, len(notebooks))
    ledger = run_dir / runs.NOTEBOOK_TIMES  # wall times summed over invocations (resumed runs)
    with _followed(run_dir, progress and not settings.smoke), runs.timed(ledger, "total"):
        for nb in notebooks:
            log.info("running %s ...", nb.name)
            with runs.timed(ledger, nb.name):
                seconds = execute_notebook(nb, run_dir, notebook_parameters(nb, params, extra))
            log.info("%s done in %s", nb.name, format_seconds(seconds))
    metrics = load_metrics(run_dir, required=False)
    if metrics is None:
        log.warning("warning: the notebooks wrote no metrics.json in %s; summary.md has no results table", run_dir)
    stored = dataclasses.asdict(settings.params)  # as prepare_run_dir wrote params.yaml
    reading = reading_lines(metrics, runs.load_evaluations(run_dir)) if metrics else []
    summary = run_dir / "summary.md"
    write_text(summary, summary_markdown(run_dir, metrics, params=stored, command=command, params_file=params_file,
                                         after_results=reading))
    append_index(index_row(run_dir, metrics, stored, runs.wall_times(ledger)["total"]["s"]))
    print(summary)


# Set for the kernels: the command's package, so they import the same cbdlib (checked by workbook.setup).
PACKAGE_ENV = "CBD_PACKAGE_DIR"


def package_dir() -> Path:
    """The folder of the ``cbdlib`` package this process imported."""
    return Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def kernel_environment(run_dir: Path, results_root: Path | None = None):
    """The environment the notebook kernels start with: this process's package first on their
    ``PYTHONPATH`` (else a kernel imports whichever ``cbdlib`` its own ``sys.path`` finds, an editable
    install of another clone, and writes into that clone's ``results/``), its resolved results folder
    (or ``results_root``), and the token of its lock on ``run_dir``."""
    here = str(package_dir().parent)
    path = [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    results = Path(results_root) if results_root is not None else runs.results_root()
    values = {"PYTHONPATH": os.pathsep.join(path), "CBD_RESULTS_DIR": str(results.resolve()),
              PACKAGE_ENV: str(package_dir()), runs.LOCK_TOKEN_ENV: runs.lock_token(run_dir)}
    for name in ("CBD_CIFAR10", "CBD_CIFAR100", "CBD_CACHE_DIR"):  # the kernels run in notebooks/
        if os.environ.get(name):
            values[name] = str(Path(os.environ[name]).expanduser().resolve())
    with mock.patch.dict(os.environ, values):
        yield


def execute_notebook(nb: Notebook, run_dir: Path, parameters: dict) -> float:
    """Run one notebook with papermill into the run folder; returns its wall time in seconds."""
    import papermill
    from jupyter_client.kernelspec import NoSuchKernel
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    output = run_dir / nb.name
    # papermill rewrites its output after every cell: write a temporary copy and rename it at the
    # end, so a full disk or a kill never leaves the executed notebook as broken JSON.
    partial = run_dir / f".partial_{nb.name}"
    partial.unlink(missing_ok=True)  # papermill opens it as it is: never write through a link left there
    logging.getLogger("papermill").setLevel(logging.WARNING)  # not a line per cell among the run's own
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(str(nb.path), str(partial), parameters=parameters, kernel_name="python3",
                                   cwd=str(nb.path.parent), progress_bar=False, log_output=False,
                                   config=kernel_config())
    except (PapermillExecutionError, DeadKernelError, CellTimeoutError, NoSuchKernel) as exc:
        _keep_executed(partial, output)
        if isinstance(exc, PapermillExecutionError):
            evalue = str(exc.evalue or "").strip()  # its first line, when it has one
            what = f"failed in cell {exc.exec_count}: {exc.ename}" + (f": {evalue.splitlines()[0]}" if evalue else "")
        else:  # the kernel died (out of memory), is missing, or a cell timed out: not a bug of the notebook
            what = f"stopped: {type(exc).__name__}: {one_line(exc)}"
        raise CBDError(f"{nb.name} {what}; the partly executed notebook is {output}") from None
    except OSError as exc:  # the disk is full (or the folder went away) while papermill writes
        partial.unlink(missing_ok=True)
        kept = "the previous copy is kept" if output.exists() else "nothing was kept"
        raise CBDError(f"could not write the executed notebook {output}: {exc.strerror or exc} ({kept}); "
                       f"free some space and rerun the same command to resume") from None
    _keep_executed(partial, output)
    return time.perf_counter() - t0


def _keep_executed(partial: Path, output: Path) -> None:
    """Rename papermill's copy over the executed notebook, if it is whole; relay the ``warning:``
    lines its cells printed (recovery notes, skipped damage, ...), each once."""
    try:
        executed = json.loads(partial.read_text())
    except (OSError, ValueError):
        partial.unlink(missing_ok=True)
        return
    os.replace(partial, output)
    texts = ["".join(out.get("text", "")) for cell in executed.get("cells", []) for out in cell.get("outputs", [])]
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip().startswith("warning:")]
    for line in dict.fromkeys(lines):
        log.warning("%s (%s)", line, output.name)


def kernel_config():
    """The kernels' configuration: CurveZMQ keys provisioned by the kernel manager where
    jupyter_client and the kernel support them, so the kernels' local sockets are encrypted
    (and ipykernel does not warn that they are not)."""
    import zmq
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config

    config = Config()
    if "transport_encryption" in KernelManager.class_traits() and zmq.has("curve"):
        config.KernelManager.transport_encryption = "auto"
    return config


@contextlib.contextmanager
def _followed(run_dir: Path, show: bool):
    """Follow the run folder's history while the notebooks run (see ``cbdlib.progress``): a bar in
    a terminal, one line per finished model otherwise (CI, nohup), nothing unless ``show``. The
    kernels, told so by ``CBD_PROGRESS``, then print one line per model and no bars."""
    from ..progress import PROGRESS_ENV
    from .follow import RunFollower

    mode = "bar" if sys.stderr.isatty() else "lines"
    with mock.patch.dict(os.environ, {PROGRESS_ENV: "parent"}), contextlib.ExitStack() as stack:
        if show:
            stack.callback(RunFollower(run_dir, mode).start().stop)
        if show and mode == "bar":
            from tqdm.contrib.logging import logging_redirect_tqdm

            stack.enter_context(logging_redirect_tqdm())  # log lines print above the bar
        yield


def format_command(params_path, overrides: dict) -> str:
    """The ``python -m cbdlib run`` command that reproduces a run."""
    parts = ["python", "-m", "cbdlib", "run"]
    if params_path is not None:
        parts += ["--params", display_path(Path(params_path))]
    for key, value in overrides.items():
        parts += ["-p", f"{key}={yaml_scalar(value)}"]
    return shlex.join(parts)


