"""The notebooks of a run and their parameters: which notebooks, what each declares, and
the checks that stop a run with a one-line error before any notebook starts."""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from .. import config
from ..errors import CBDError
from ..notebook_params import NOTEBOOK_PATTERN, declared_in
from ..param_rules import ParameterError
from ..plain_values import check_plain
from ..text import did_you_mean


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


def _literal(source: str) -> tuple[bool, Any]:
    """(True, value) when a default is a Python literal, else (False, None)."""
    try:
        return True, ast.literal_eval(source)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def checked_values(values: dict, notebooks: list[Notebook], sources: dict) -> config.Params:
    """The one check of ``cbdlib run``'s values: every key plain, known to the schema or to a notebook,
    and of the right type and range (``config.make_params`` for the schema's keys, the default's type
    for a notebook's own). Returns the schema's ``Params``; ``sources`` says where each key came from
    (``-p`` or the parameter file) for the messages."""
    fields = config.field_names()
    notebook_keys = sorted({k for nb in notebooks for k in nb.declared} - set(fields))
    known = fields + notebook_keys
    for key, value in values.items():
        check_plain(value, f"{sources.get(key, key)}: parameter {key!r}")  # before it is printed or injected
        where = sources.get(key, f"{key}={yaml_scalar(value)}")
        if key not in known:
            hint = did_you_mean(key, known, n=3) or f"; known parameters: {', '.join(known)}"
            raise CBDError(f"{where}: unknown parameter {key!r}: no notebook or schema field declares it{hint}")
        for nb in notebooks if key not in fields else ():
            ok, default = _literal(nb.declared.get(key, "None"))
            if ok and default is not None and not config.fits_type(value, type(default)):
                raise CBDError(f"{where}: parameter {key!r} must be {config.type_word(type(default))} (its default "
                               f"in {nb.name} is {nb.declared[key]}), got {value!r} ({type(value).__name__})")
    try:
        return config.make_params({k: v for k, v in values.items() if k in fields})
    except ParameterError as error:
        raise CBDError(f"{sources.get(error.key, error.key)}: {error}") from None


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
