"""Words for messages and reports, shared by the engine, the commands and the notebooks."""
from __future__ import annotations

import difflib


def did_you_mean(name, known, n: int = 2) -> str:
    """`` (did you mean a or b?)`` for the known names closest to ``name``; empty when none is close."""
    close = difflib.get_close_matches(str(name), list(known), n=n)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def first_few(items, most: int = 4) -> str:
    """``a, b, c, d and 3 more``: a long list named in a one-line message."""
    items = [str(item) for item in items]
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def format_seconds(seconds: float) -> str:
    """``12.3 s``, ``4 min 05 s``, ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
