"""The parameters of the four notebooks: what each declares, what papermill injected, and
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
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from .config import field_names, project_root
from .errors import CBDError, one_line
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


def notebook_path(notebook: str) -> Path:
    """The notebook's file: in the working directory (where papermill, nbval and JupyterLab start
    its kernel) when it is there, else in the project's ``notebooks/``."""
    if notebook not in NOTEBOOK_FILES:
        raise CBDError(f"unknown notebook {notebook!r}; choose one of {', '.join(NOTEBOOK_FILES)}")
    name = NOTEBOOK_FILES[notebook]
    for folder in (Path.cwd(), project_root() / "notebooks"):
        if (folder / name).is_file():
            return folder / name
    raise CBDError(f"cannot find {name} (looked in {Path.cwd()} and {project_root() / 'notebooks'}), "
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


def assigned_names(tree: ast.Module) -> list[str]:
    """The names a cell assigns at top level, in order, once each."""
    return [name for name, _ in assignments(tree)]


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
        if isinstance(source, str) and source.lstrip().startswith(INJECTED_HEADER):
            try:
                return assigned_names(ast.parse(source))
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

