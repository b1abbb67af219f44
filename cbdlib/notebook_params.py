"""The numbered notebooks and their parameters: which notebooks, what each declares, what papermill
injected, the checks that stop ``cbdlib run`` with a one-line error before any notebook starts, and
where notebook 03 finds the experiment it continues.

What a notebook declares is read from its own ``parameters`` cell (``declared_in``, the one reader
of a cell, used by the kernels and by ``cbdlib run``), so the cells are the one list: add a line to
a cell and the notebook accepts that parameter. ``NOTEBOOK_FILES`` is the one list of notebooks.
Notebook 03 continues the experiment that notebook 02 started in the same run folder; it
declares only what may change between the two without changing results (``STAGE_TWO_KEYS``)
and takes everything else from the folder's ``params.yaml``.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from . import config
from .errors import CBDError, one_line
from .param_rules import ParameterError
from .plain_values import check_plain
from .runs import RESUMABLE_KEYS, read_params_yaml
from .text import did_you_mean

NOTEBOOK_FILES = {
    "01": "01_long_tail_statistics.ipynb",
    "02": "02_teacher_training.ipynb",
    "03": "03_class_balanced_distillation.ipynb",
    "04": "04_per_split_analysis.ipynb",
}
# A folder's numbered notebooks run in this order by ``cbdlib run`` (NOTEBOOK_FILES above, or a test's own).
NOTEBOOK_PATTERN = re.compile(r"^\d{2}_.+\.ipynb$")
# What notebook 03 may set itself: the run folder, and the keys that do not change a run's
# results (overwrite excepted: notebook 03 must never clear notebook 02's models).
STAGE_TWO_KEYS = ("run_name", *sorted(RESUMABLE_KEYS - {"overwrite"}))
# papermill writes its injected cell with this first line (PythonTranslator.comment("Parameters")).
INJECTED_HEADER = "# Parameters"


def default_notebooks_dir() -> Path:
    return config.project_root() / "notebooks"


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
    return [Notebook(p, declared_in(p)) for p in paths]


def notebook_path(notebook: str) -> Path:
    """The notebook's file: in the working directory (where papermill, nbval and JupyterLab start
    its kernel) when it is there, else in the project's ``notebooks/``."""
    if notebook not in NOTEBOOK_FILES:
        raise CBDError(f"unknown notebook {notebook!r}; choose one of {', '.join(NOTEBOOK_FILES)}")
    name = NOTEBOOK_FILES[notebook]
    for folder in (Path.cwd(), default_notebooks_dir()):
        if (folder / name).is_file():
            return folder / name
    raise CBDError(f"cannot find {name} (looked in {Path.cwd()} and {default_notebooks_dir()}), "
                   f"so its parameters are unknown")


def declared(notebook: str) -> tuple[str, ...]:
    """The names the notebook's ``parameters`` cell assigns, in order."""
    return tuple(declared_in(notebook_path(notebook)))


def declared_in(path: str | os.PathLike) -> dict:
    """``{name: default source text}`` of the cell tagged ``parameters`` in the notebook at ``path``."""
    return dict(_declared_in(str(path), os.stat(path).st_mtime_ns))


@lru_cache(maxsize=16)
def _declared_in(path: str, mtime_ns: int) -> tuple:  # mtime_ns: an edited cell is read again
    """The cell's assignments as papermill reads them (a test checks that they agree); parsed here
    with ``ast`` so that no kernel imports papermill to read one cell."""
    try:
        cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
        cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        tree = ast.parse(source)
    except StopIteration:
        raise CBDError(f"{path} has no cell tagged 'parameters'") from None
    except (OSError, ValueError, KeyError, TypeError, SyntaxError) as error:
        raise CBDError(f"cannot read the parameters of {path}: {one_line(error)}") from None
    return tuple((name, ast.get_source_segment(source, value)) for name, value in assignments(tree))


def assignments(tree: ast.Module) -> list[tuple[str, ast.expr]]:
    """``(name, value)`` of the cell's top-level assignments (``name = ...``, ``name: type = ...``),
    in order, once each."""
    found: dict = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        for t in targets:
            if isinstance(t, ast.Name) and t.id not in found:
                found[t.id] = node.value
    return list(found.items())


def collect_params(namespace: Mapping[str, Any], names=None) -> dict:
    """The values of ``names`` (default: every schema key) that ``namespace`` defines.

    A variable whose name is not one of ``names`` (a misspelt key, an import) is not collected.
    """
    names = config.field_names() if names is None else names
    return {name: namespace[name] for name in names if name in namespace}


def injected_names(namespace: Mapping[str, Any]) -> list[str]:
    """Names assigned by papermill's injected ``# Parameters`` cell (latest one), read from ``In``.

    Outside a kernel, or when nothing was injected, this is empty.
    """
    history = namespace.get("In")
    if not isinstance(history, (list, tuple)):
        return []
    for source in reversed(history):
        if isinstance(source, str) and source.lstrip().startswith(INJECTED_HEADER):
            try:
                return [name for name, _ in assignments(ast.parse(source))]
            except SyntaxError:
                return []
    return []


def check_injected(namespace: Mapping[str, Any], notebook: str) -> None:
    """Refuse a parameter injected into ``notebook`` that its parameters cell does not declare."""
    names = declared(notebook)
    unknown = [n for n in injected_names(namespace) if n not in names]
    if unknown:
        name = unknown[0]
        raise CBDError(f"notebook {notebook} has no parameter {name!r}{did_you_mean(name, names)}; its parameters: "
                       f"{', '.join(names)}")


def stage_two_values(values: Mapping[str, Any], run_dir: Path) -> dict:
    """Notebook 03's parameters: the run folder's ``params.yaml`` (written when notebook 02
    started the run), with the notebook's own ``STAGE_TWO_KEYS`` where they are not None."""
    stored = read_params_yaml(run_dir)
    if stored is None:
        raise CBDError(f"no run folder {run_dir} yet: run notebook 02_teacher_training.ipynb first (notebook 03 "
                       f"continues its experiment and reads the parameters from its params.yaml)")
    own = {k: v for k, v in values.items() if k in STAGE_TWO_KEYS and v is not None}
    return {**stored, **own, "overwrite": False}


def check_own_type(nb: Notebook, key: str, value: Any) -> None:
    """A notebook's own parameter (no schema key) takes the type of its default literal (any type
    where the default is None or no literal): the rule of ``cbdlib run`` and of notebook 04's setup."""
    try:
        default = ast.literal_eval(nb.declared.get(key, "None"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return
    if default is not None and not config.fits_type(value, type(default)):
        raise ParameterError(key, f"parameter {key!r} must be {config.TYPE_WORDS[type(default)]} (its default in "
                                  f"{nb.name} is {nb.declared[key]}), got {value!r} ({type(value).__name__})")


def checked_values(values: dict, notebooks: list[Notebook], sources: dict) -> config.Params:
    """The one check of ``cbdlib run``'s values: every key plain, known to the schema or to a notebook,
    and of the right type and range (``config.make_params`` for the schema's keys, ``check_own_type``
    for a notebook's own). Returns the schema's ``Params``; ``sources`` says where each key came from
    (``-p`` or the parameter file) for the messages."""
    fields = config.field_names()
    known = fields + sorted({k for nb in notebooks for k in nb.declared} - set(fields))
    try:
        for key, value in values.items():
            check_plain(value, f"{sources.get(key, key)}: parameter {key!r}")  # before it is printed or injected
            if key not in known:
                hint = did_you_mean(key, known, n=3) or f"; known parameters: {', '.join(known)}"
                raise ParameterError(key, f"unknown parameter {key!r}: no notebook or schema field declares it{hint}")
            for nb in notebooks if key not in fields else ():
                check_own_type(nb, key, value)
        return config.make_params({k: v for k, v in values.items() if k in fields})
    except ParameterError as error:
        raise CBDError(f"{sources.get(error.key, error.key)}: {error}") from None


def notebook_parameters(nb: Notebook, params: config.Params, extra: dict) -> dict:
    """What papermill injects into one notebook: the keys it declares, nothing else.

    Schema fields come from the complete ``Params`` (file + overrides + schema defaults), so
    every notebook sees the same experiment whatever its own defaults; notebook-only keys are
    passed only when given (else the notebook keeps its default).
    """
    given = {**extra, **dataclasses.asdict(params)}
    out = {key: given[key] for key in nb.declared if key in given}
    for key, value in out.items():  # papermill writes these as source code: plain literals only
        check_plain(value, f"{nb.name}: parameter {key!r}")
    return out
