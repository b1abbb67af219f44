"""Parameter values as plain data: what a YAML file or ``-p`` may hold, and what may reach a notebook.

papermill writes each parameter into the notebook as Python source. It quotes a value of a type it
does not know (``bytes`` from ``!!binary``, a date from ``!!timestamp``) without escaping it, so
such a value could run code in the kernel. Every value is therefore loaded with ``load_yaml``
(plain tags only, no aliases) and checked with ``check_plain`` before papermill sees it.
"""
from __future__ import annotations

from typing import Any

import yaml

from .errors import CBDError

# The tags of plain YAML data; anything else (!!binary, !!timestamp, !!set, !!omap, !!pairs,
# application tags) is refused.
_PLAIN_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "str", "seq", "map")}
# A parameter is a handful of literals; this bounds what a hostile value may make a check walk.
MAX_ITEMS = 100_000
MAX_DEPTH = 20


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (an alias bomb expands to 10^9 items when written out)
    and every non-plain tag, before anything is constructed."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _Refused(f"uses a YAML alias (*{self.peek_event().anchor}) at line {mark.line + 1}; "
                           f"write the value out in full (aliases are not accepted in parameters)")
        node = super().compose_node(parent, index)
        if node.tag not in _PLAIN_TAGS:
            raise _Refused(f"holds a value tagged {node.tag.replace('tag:yaml.org,2002:', '!!')} at line "
                           f"{node.start_mark.line + 1}; parameters are plain strings, numbers, booleans, null, "
                           f"lists and mappings")
        return node


class _Refused(Exception):
    pass


def load_yaml(text: str, where: str) -> Any:
    """``text`` parsed as plain YAML; a non-plain tag or an alias is a one-line ``CBDError`` naming ``where``.

    Other YAML errors propagate as ``yaml.YAMLError`` for the caller to word.
    """
    try:
        return yaml.load(text, Loader=_PlainLoader)  # noqa: S506  (a SafeLoader subclass)
    except _Refused as refused:
        raise CBDError(f"{where} {refused}") from None


def check_plain(value: Any, where: str) -> None:
    """Refuse anything but str, int, float, bool, None and lists / str-keyed dicts of those."""
    count = 0

    def walk(item: Any, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_ITEMS or depth > MAX_DEPTH:
            raise CBDError(f"{where}: the value is too large or too deeply nested for a parameter "
                           f"(more than {MAX_ITEMS} items or {MAX_DEPTH} levels)")
        if item is None or type(item) in (str, int, float, bool):
            return
        if type(item) is list:
            for element in item:
                walk(element, depth + 1)
            return
        if type(item) is dict:
            for key, element in item.items():
                if type(key) is not str:
                    raise CBDError(f"{where}: mapping keys must be strings, got {key!r} ({type(key).__name__})")
                walk(element, depth + 1)
            return
        raise CBDError(f"{where}: a value of type {type(item).__name__} is not a plain literal (str, int, float, "
                       f"bool, null, or lists and mappings of those), so it cannot be given to a notebook")

    walk(value, 0)
