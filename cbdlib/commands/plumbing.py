"""Shared command-line plumbing: logging to stderr and one-line errors instead of tracebacks."""
from __future__ import annotations

import functools
import logging
import sys

from ..errors import CBDError


def setup_logging(verbose: bool = True) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)


def exits_cleanly(main):
    """Run ``main``; a ``CBDError`` becomes ``error: <message>`` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except CBDError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
            return 130

    return wrapper
