"""What every figure shares: the style, colours, split labels, class-name and method checks, the PNG
writer. The figure families (``dataset``, ``accuracy``, ``tsne``, ``training``, ``widgets``) build on it."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np

from ..data.stats import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD, THIRDS
from ..errors import CBDError
from ..metrics import ACCURACY_KEYS

SPLIT_KEYS = ACCURACY_KEYS   # membership always comes from the metrics' `splits`; the thresholds only label
SPLIT_LABELS = {
    "all": "all",
    "many": f"many-shot (>{MANY_SHOT_THRESHOLD})",
    "medium": f"medium ({FEW_SHOT_THRESHOLD}-{MANY_SHOT_THRESHOLD})",
    "few": f"few-shot (<{FEW_SHOT_THRESHOLD})",
    "head": "head third",
    "mid": "mid third",
    "tail": "tail third",
}
DPI = 120
# Widest figure, legends included: 9.5 in is under 1000 px at the inline backend's 100 dpi, so
# JupyterLab shows every figure at full size on a laptop screen instead of shrinking its text.
MAX_WIDTH_IN = 9.5


class PlotInputError(CBDError, ValueError):
    """Bad input to a plotting function: a ``ValueError`` that the CLI also prints as one line."""


# --------------------------------------------------------------------------- helpers


def save_figure(fig, path) -> None:
    """Write ``fig`` as PNG to ``path`` (parents created); no-op for ``path=None``."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", format="png")


def pyplot():
    # pyplot only to create figures (so notebooks display them); imported late so that
    # a backend chosen by the caller after importing cbdlib still applies.
    import matplotlib.pyplot as plt

    return plt


def seaborn():
    import seaborn as sns

    return sns


@contextlib.contextmanager
def style():
    """Temporary whitegrid style; nothing global is left changed."""
    sns = seaborn()
    # Load the backend first: if it first loads inside rc_context (Jupyter's inline backend
    # does), leaving the context switches interactive display off for later figures.
    pyplot()._get_backend_mod()
    with sns.axes_style("whitegrid"), matplotlib.rc_context({"axes.titleweight": "bold"}):
        yield


def palette(n: int) -> list:
    """``n`` distinguishable colours: seaborn colorblind first, tab20 beyond ten."""
    sns = seaborn()
    base = list(sns.color_palette("colorblind", 10))
    if n <= len(base):
        return base[:max(n, 0)]
    extra = list(sns.color_palette("tab20", 20))
    colours = base + extra
    while len(colours) < n:
        colours += colours
    return colours[:n]


def split_colours() -> dict:
    """One colour per split; the shot splits and thirds share the same blue/orange/red trio."""
    pal = palette(10)
    return {
        "many": pal[0], "medium": pal[1], "few": pal[3],
        "head": pal[0], "mid": pal[1], "tail": pal[3],
        "all": pal[7],
    }


def order_by_count(class_counts) -> np.ndarray:
    """Labels sorted by training count, descending; ties by label (as cbdlib.data.stats)."""
    counts = np.asarray(class_counts)
    return np.array(sorted(range(len(counts)), key=lambda c: (-counts[c], c)), dtype=int)


def class_labels(num_classes: int, class_names=None, metrics: Mapping | None = None) -> list[str]:
    if class_names is None and metrics is not None:
        class_names = metrics.get("class_names")
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    class_names = [str(n) for n in class_names]
    if len(class_names) != num_classes:
        raise PlotInputError(f"class_names has {len(class_names)} entries but there are {num_classes} classes")
    return class_names


def membership(splits: Mapping, keys: Sequence[str]) -> dict[int, str]:
    """label -> first split of ``keys`` that holds it (one pass, so 1000-class datasets stay fast)."""
    out: dict[int, str] = {}
    for k in reversed(list(keys)):
        for c in splits.get(k, ()) or ():
            out[int(c)] = k
    return out


def thirds_of(class_counts) -> dict[str, list[int]]:
    """head/mid/tail by ``numpy.array_split`` of the sorted labels (same rule as cbdlib.data.stats)."""
    parts = np.array_split(order_by_count(class_counts), 3)
    return {k: sorted(p.tolist()) for k, p in zip(THIRDS, parts)}


def methods_in(metrics: Mapping, methods=None) -> list[str]:
    """Methods to show, in the given order (default: the order of ``metrics["methods"]``)."""
    available = list(metrics.get("methods", {}))
    if methods is None:
        return available
    if isinstance(methods, str):
        methods = [methods]
    missing = [m for m in methods if m not in metrics.get("methods", {})]
    if missing:
        raise PlotInputError(f"method(s) {missing} not in metrics; available: {available}")
    return list(methods)


def as_float(v) -> float:
    """None (no class in the split) -> NaN, everything else -> float."""
    return float("nan") if v is None else float(v)


def per_class_of(metrics: Mapping, method: str) -> np.ndarray:
    pc = metrics["methods"][method].get("per_class")
    if pc is None:
        raise PlotInputError(f"method {method!r} has no per_class accuracies in metrics")
    return np.array([as_float(v) for v in pc], dtype=float)


def tick_labels(ax, positions, labels, num: int, axis_label: str) -> None:
    """Class tick labels: rotated when crowded, dropped (generic axis label) beyond 30 classes."""
    if num > 30:
        ax.set_xticks([])
        ax.set_xlabel("classes sorted by training images")
        return
    ax.set_xticks(positions)
    rotate = num > 10 or max((len(s) for s in labels), default=0) > 8
    ax.set_xticklabels(labels, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.set_xlabel(axis_label)


def percent_axis(ax, axis: str = "y") -> None:
    from matplotlib.ticker import PercentFormatter

    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(100, decimals=0))
