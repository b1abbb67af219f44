"""The notebooks of a run and their parameters: which notebooks, what each declares, and
the checks that stop a run with a one-line error before any notebook starts."""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .. import config
from ..errors import CBDError, one_line
from ..param_rules import ParameterError
from ..plain_values import check_plain

NOTEBOOK_PATTERN = re.compile(r"^\d{2}_.+\.ipynb$")


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
    return [Notebook(p, declared_parameters(p)) for p in paths]


def declared_parameters(path: Path) -> dict:
    """{name: default source text} of a notebook's ``parameters`` cell (papermill's inspection)."""
    import papermill

    try:
        with quiet_logger("papermill"):
            inspected = papermill.inspect_notebook(str(path))
    except ValueError:
        # No kernel name in the notebook's metadata: inspect its cell with the Python translator,
        # the same one papermill uses for the python3 kernel we execute with.
        inspected = _inspect_python_cell(path)
    except Exception as exc:  # unreadable JSON, not a notebook, ...
        raise CBDError(f"cannot read the parameters of {path}: {one_line(exc)}") from None
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


def validate_keys(values: dict, notebooks: list[Notebook], sources: dict) -> None:
    """Every key is a Params field or declared by a notebook, and has the right type.

    ``sources`` says where each key came from (``-p`` or the parameter file) for the messages.
    """
    fields = config.field_names()
    notebook_keys = sorted({k for nb in notebooks for k in nb.declared} - set(fields))
    known = fields + notebook_keys
    for key, value in values.items():
        check_plain(value, f"{sources.get(key, key)}: parameter {key!r}")  # before it is printed or injected
        where = sources.get(key, f"{key}={yaml_scalar(value)}")
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
            if ok and default is not None and not config.fits_type(value, type(default)):
                raise CBDError(f"{where}: parameter {key!r} must be {config.type_word(type(default))} (its default "
                               f"in {nb.name} is {nb.declared[key]}), got {value!r} ({type(value).__name__})")


def checked_params(values: dict, sources: dict) -> config.Params:
    """``config.make_params``, its range errors prefixed with where the value came from."""
    try:
        return config.make_params(values)
    except ParameterError as error:
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
    for key, value in out.items():  # papermill writes these as source code: plain literals only
        check_plain(value, f"{nb.name}: parameter {key!r}")
    return out


def yaml_scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


@contextlib.contextmanager
def quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
