"""Figures and tables of the workbook: dataset long tail, split accuracies, per-class gains, t-SNE.

Every plotting function takes plain data (lists, numpy arrays, the ``metrics.json`` dict),
builds its own figure with matplotlib's object API and returns the
:class:`matplotlib.figure.Figure`; with ``path`` it also writes a PNG there first
(parent folders created, dpi 120, tight bounding box). The module never calls
``matplotlib.use()``: the notebook or the test chooses the backend.

``metrics`` schema (see ``cbdlib/metrics.py``)::

    {"class_counts": [...], "splits": {"many": [...], ..., "tail": [...]}, "seeds": [...],
     "methods": {NAME: {"all", "many", "medium", "few", "head", "mid", "tail": float|None,
                        "per_class": [acc by label]}},
     "std": {NAME: {same keys, std over seeds}}}

A split accuracy of ``None`` (no class in that split) is drawn as missing and written "n/a".
"""
from __future__ import annotations

import base64
import contextlib
import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np

from .data.stats import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD, SHOT_SPLITS, THIRDS
from .errors import CBDError
from .methods import BASELINES, best_baseline, method_label
from .metrics import ACCURACY_KEYS

__all__ = [
    "SPLIT_KEYS",
    "class_histogram",
    "confusion_matrix_plot",
    "counts_table",
    "cumulative_share",
    "gain_vs_class_size",
    "method_explorer",
    "method_label",
    "per_class_accuracy",
    "sample_grid",
    "save_figure",
    "split_accuracy_bars",
    "split_accuracy_frame",
    "split_accuracy_table",
    "subsample_indices",
    "tau_curve",
    "training_curves",
    "tsne_embed",
    "tsne_pair",
    "tsne_plot",
]

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
_DPI = 120
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
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", format="png")


def _plt():
    # pyplot only to create figures (so notebooks display them); imported late so that
    # a backend chosen by the caller after importing cbdlib still applies.
    import matplotlib.pyplot as plt

    return plt


def _sns():
    import seaborn as sns

    return sns


@contextlib.contextmanager
def _style():
    """Temporary whitegrid style; nothing global is left changed."""
    sns = _sns()
    # Load the backend first: if it first loads inside rc_context (Jupyter's inline backend
    # does), leaving the context switches interactive display off for later figures.
    _plt()._get_backend_mod()
    with sns.axes_style("whitegrid"), matplotlib.rc_context({"axes.titleweight": "bold"}):
        yield


def _palette(n: int) -> list:
    """``n`` distinguishable colours: seaborn colorblind first, tab20 beyond ten."""
    sns = _sns()
    base = list(sns.color_palette("colorblind", 10))
    if n <= len(base):
        return base[:max(n, 0)]
    extra = list(sns.color_palette("tab20", 20))
    colours = base + extra
    while len(colours) < n:
        colours += colours
    return colours[:n]


def _split_colours() -> dict:
    """One colour per split; the shot splits and thirds share the same blue/orange/red trio."""
    pal = _palette(10)
    return {
        "many": pal[0], "medium": pal[1], "few": pal[3],
        "head": pal[0], "mid": pal[1], "tail": pal[3],
        "all": pal[7],
    }


def _order_by_count(class_counts) -> np.ndarray:
    """Labels sorted by training count, descending; ties by label (as cbdlib.data.stats)."""
    counts = np.asarray(class_counts)
    return np.array(sorted(range(len(counts)), key=lambda c: (-counts[c], c)), dtype=int)


def _names(num_classes: int, class_names=None, metrics: Mapping | None = None) -> list[str]:
    if class_names is None and metrics is not None:
        class_names = metrics.get("class_names")
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    class_names = [str(n) for n in class_names]
    if len(class_names) != num_classes:
        raise PlotInputError(f"class_names has {len(class_names)} entries but there are {num_classes} classes")
    return class_names


def _membership(splits: Mapping, keys: Sequence[str]) -> dict[int, str]:
    """label -> first split of ``keys`` that holds it (one pass, so 1000-class datasets stay fast)."""
    out: dict[int, str] = {}
    for k in reversed(list(keys)):
        for c in splits.get(k, ()) or ():
            out[int(c)] = k
    return out


def _thirds(class_counts) -> dict[str, list[int]]:
    """head/mid/tail by ``numpy.array_split`` of the sorted labels (same rule as cbdlib.data.stats)."""
    parts = np.array_split(_order_by_count(class_counts), 3)
    return {k: sorted(p.tolist()) for k, p in zip(THIRDS, parts)}


def _methods(metrics: Mapping, methods=None) -> list[str]:
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


def _float(v) -> float:
    """None (no class in the split) -> NaN, everything else -> float."""
    return float("nan") if v is None else float(v)


def _per_class(metrics: Mapping, method: str) -> np.ndarray:
    pc = metrics["methods"][method].get("per_class")
    if pc is None:
        raise PlotInputError(f"method {method!r} has no per_class accuracies in metrics")
    return np.array([_float(v) for v in pc], dtype=float)


def _tick_labels(ax, positions, labels, num: int, axis_label: str) -> None:
    """Class tick labels: rotated when crowded, dropped (generic axis label) beyond 30 classes."""
    if num > 30:
        ax.set_xticks([])
        ax.set_xlabel("classes sorted by training images")
        return
    ax.set_xticks(positions)
    rotate = num > 10 or max((len(s) for s in labels), default=0) > 8
    ax.set_xticklabels(labels, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.set_xlabel(axis_label)


def _pct_axis(ax, axis: str = "y") -> None:
    from matplotlib.ticker import PercentFormatter

    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(100, decimals=0))


# --------------------------------------------------------------------------- dataset


def class_histogram(class_counts, splits, class_names=None, path=None):
    """Training images per class (sorted descending, log y) coloured by many/medium/few split.

    Dashed lines mark the many-shot (100) and few-shot (20) thresholds; the legend gives
    the number of classes in each split.
    """
    from matplotlib.patches import Patch

    counts = np.asarray(class_counts, dtype=float)
    if counts.size == 0:
        raise PlotInputError("class_counts is empty")
    names = _names(len(counts), class_names)
    order = _order_by_count(counts)
    colours = _split_colours()
    grey = (0.6, 0.6, 0.6)
    shot = _membership(splits, SHOT_SPLITS)
    bar_colours = [colours.get(shot.get(int(c)), grey) for c in order]
    with _style():
        fig, ax = _plt().subplots(figsize=(max(6.0, min(0.35 * len(counts) + 3, MAX_WIDTH_IN)), 4.2))
        x = np.arange(len(order))
        # Bars start at 0.8 so a class with 1 image is still visible on the log axis.
        ax.bar(x, counts[order], color=bar_colours, edgecolor="white", linewidth=0.5, width=0.85)
        ax.set_yscale("log")
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.set_ylim(bottom=0.8, top=max(counts.max() * 2.0, MANY_SHOT_THRESHOLD * 2))
        for thr, text in ((MANY_SHOT_THRESHOLD, f"many-shot: > {MANY_SHOT_THRESHOLD}"),
                          (FEW_SHOT_THRESHOLD, f"few-shot: < {FEW_SHOT_THRESHOLD}")):
            ax.axhline(thr, color="0.3", linestyle="--", linewidth=1)
            ax.text(len(order) - 0.5, thr * 1.06, text, ha="right", va="bottom", fontsize=8, color="0.2",
                    bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.85))
        handles = [Patch(color=colours[k], label=f"{SPLIT_LABELS[k]}: {len(splits.get(k, []) or [])} classes")
                   for k in SHOT_SPLITS]
        ax.legend(handles=handles, loc="upper right", bbox_to_anchor=(1.0, 0.93), fontsize=8, frameon=True)
        _tick_labels(ax, x, [names[c] for c in order], len(order), "class (sorted by training images)")
        ax.set_ylabel("training images (log scale)")
        ratio = counts.max() / counts.min() if counts.min() > 0 else float("inf")
        ax.set_title(f"Training images per class ({int(counts.sum())} images, imbalance {ratio:.0f}:1)")
        ax.grid(axis="x", visible=False)
        fig.tight_layout()
    save_figure(fig, path)
    return fig


def cumulative_share(class_counts, path=None):
    """Cumulative share of training images (%) against share of classes (%), largest classes first.

    The diagonal is a balanced dataset; the annotation gives the share held by the head third.
    """
    counts = np.asarray(class_counts, dtype=float)
    if counts.size == 0 or counts.sum() <= 0:
        raise PlotInputError("class_counts is empty or sums to zero")
    c = len(counts)
    sorted_counts = counts[_order_by_count(counts)]
    x = np.concatenate([[0.0], np.arange(1, c + 1) / c * 100])
    y = np.concatenate([[0.0], np.cumsum(sorted_counts) / sorted_counts.sum() * 100])
    n_head = len(_thirds(counts)["head"])
    head_share = y[n_head]
    pal = _palette(10)
    with _style():
        fig, ax = _plt().subplots(figsize=(5.5, 5))
        ax.plot([0, 100], [0, 100], linestyle="--", color="0.5", linewidth=1, label="balanced dataset")
        ax.plot(x, y, marker="o" if c <= 50 else None, markersize=4, color=pal[0], linewidth=2,
                label="this dataset")
        ax.fill_between(x, x, y, color=pal[0], alpha=0.12)
        ax.plot([x[n_head], x[n_head]], [0, head_share], color=pal[3], linestyle=":", linewidth=1.2)
        ax.plot([0, x[n_head]], [head_share, head_share], color=pal[3], linestyle=":", linewidth=1.2)
        ax.annotate(f"head third ({n_head} of {c} classes)\nholds {head_share:.1f}% of images",
                    xy=(x[n_head], head_share), xytext=(x[n_head] + 8, max(head_share - 28, 8)),
                    fontsize=9, arrowprops=dict(arrowstyle="->", color=pal[3]), color="0.15")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 101)
        _pct_axis(ax, "x")
        _pct_axis(ax, "y")
        ax.set_xlabel("share of classes (largest first)")
        ax.set_ylabel("cumulative share of training images")
        ax.set_title("How concentrated are the training images?")
        ax.legend(loc="lower right", fontsize=9)
        fig.tight_layout()
    save_figure(fig, path)
    return fig


def _sample_rows(splits) -> list[str]:
    """Rows of the sample grid: the non-empty shot splits, then the three thirds."""
    rows = [k for k in SHOT_SPLITS if splits.get(k)]
    return rows + [k for k in THIRDS if splits.get(k)]


def sample_grid(images_uint8_nhwc, labels, class_counts, splits, class_names=None, per_split=6, seed=0,
                path=None):
    """A grid of training images: one row per non-empty many/medium/few split, then head/mid/tail.

    Each row draws up to ``per_split`` images, cycling over the split's classes so that as many
    classes as possible appear; each image is titled with its class name and training count.
    Accepts (N, H, W, C) with C in {1, 3} or (N, H, W) grey images.
    """
    images = np.asarray(images_uint8_nhwc)
    labels = np.asarray(labels).astype(int)
    if images.ndim not in (3, 4) or len(images) != len(labels):
        raise PlotInputError(f"expected images (N,H,W[,C]) and N labels, got {images.shape} and {labels.shape}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    counts = np.asarray(class_counts)
    names = _names(len(counts), class_names)
    rows = _sample_rows(splits)
    if not rows:
        raise PlotInputError("every split is empty")
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    per_split = max(1, int(per_split))
    colours = _split_colours()
    fig, axes = _plt().subplots(len(rows), per_split, squeeze=False,
                                figsize=(min(1.5 * per_split + 0.6, MAX_WIDTH_IN), 1.75 * len(rows)))
    for r, split in enumerate(rows):
        # Largest classes of the split first, then cycle so every class gets a turn; with more
        # classes than slots, a random subset of classes (still in count order) shows the variety.
        members = set(int(c) for c in splits[split])
        classes = [int(c) for c in _order_by_count(counts) if c in members and c in by_class]
        if len(classes) > per_split:
            chosen = set(rng.choice(classes, size=per_split, replace=False).tolist())
            classes = [c for c in classes if c in chosen]
        picks = []
        pools = {c: list(rng.permutation(by_class[c])) for c in classes}
        while classes and len(picks) < per_split and any(pools.values()):
            for c in classes:
                if pools[c] and len(picks) < per_split:
                    picks.append((c, pools[c].pop()))
        for j in range(per_split):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(picks):
                c, i = picks[j]
                ax.imshow(images[i], cmap="gray" if images.ndim == 3 else None, interpolation="nearest")
                ax.set_title(f"{names[c]}\n({int(counts[c])} imgs)", fontsize=8)
            if j == 0:
                ax.set_ylabel(SPLIT_LABELS[split].replace(" (", "\n("), fontsize=9, color=colours[split],
                              fontweight="bold")
    fig.suptitle("Sample training images by split", fontweight="bold")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def counts_table(class_counts, splits, class_names=None):
    """One row per class, largest first: label, name, count, share (%), shot split, third."""
    import pandas as pd

    counts = np.asarray(class_counts)
    names = _names(len(counts), class_names)
    total = counts.sum()
    thirds = {k: v for k, v in splits.items() if k in THIRDS and v} or _thirds(counts)
    shot, third = _membership(splits, SHOT_SPLITS), _membership(thirds, THIRDS)
    rows = []
    for c in _order_by_count(counts):
        rows.append({
            "label": int(c),
            "name": names[c],
            "count": int(counts[c]),
            "share (%)": round(float(counts[c] / total * 100) if total else 0.0, 2),
            "shot split": shot.get(int(c), ""),
            "third": third.get(int(c), ""),
        })
    df = pd.DataFrame(rows, columns=["label", "name", "count", "share (%)", "shot split", "third"])
    df.index = pd.RangeIndex(1, len(df) + 1, name="rank")
    return df


# --------------------------------------------------------------------------- accuracy tables


def split_accuracy_frame(metrics, methods=None, std=False):
    """Raw split accuracies (fractions in [0, 1], NaN where None): rows = methods, columns = splits.

    With ``std=True`` the same frame of standard deviations over seeds (NaN when absent).
    """
    import pandas as pd

    names = _methods(metrics, methods)
    source = (metrics.get("std") or {}) if std else metrics["methods"]
    data = [[_float((source.get(m) or {}).get(k)) for k in SPLIT_KEYS] for m in names]
    df = pd.DataFrame(data, index=pd.Index(names, name="method"), columns=list(SPLIT_KEYS), dtype=float)
    return df


def split_accuracy_table(metrics, methods=None):
    """Split accuracies as strings "mean ± std" in % with one decimal; "n/a" for None.

    The std comes from ``metrics["std"]``; where it is missing only the mean is written.
    """
    mean = split_accuracy_frame(metrics, methods)
    std = split_accuracy_frame(metrics, methods, std=True)

    def fmt(m, s):
        if math.isnan(m):
            return "n/a"
        return f"{m * 100:.1f}" if math.isnan(s) else f"{m * 100:.1f} ± {s * 100:.1f}"

    out = mean.copy().astype(object)
    for r in mean.index:
        for k in mean.columns:
            out.loc[r, k] = fmt(mean.loc[r, k], std.loc[r, k])
    return out


def split_accuracy_bars(metrics, methods=None, splits=SPLIT_KEYS, path=None):
    """Grouped bars: x = split, one bar per method, error bars = std over seeds, y in %.

    A split without classes (None) gets no bar and an "n/a" mark (one for the group when no
    method has it).
    """
    names = _methods(metrics, methods)
    splits = list(splits)
    mean = split_accuracy_frame(metrics, names).reindex(columns=splits) * 100
    std = split_accuracy_frame(metrics, names, std=True).reindex(columns=splits) * 100
    members = metrics.get("splits", {}) or {}
    n_cls = len(metrics.get("class_counts", []) or [])
    pal = _palette(len(names))
    width = 0.8 / max(len(names), 1)
    with _style():
        wide = max(7.0, 1.0 + len(splits) * (0.35 + 0.22 * len(names)))
        fig, ax = _plt().subplots(figsize=(min(wide, MAX_WIDTH_IN), 4.5))
        x = np.arange(len(splits))
        for i, m in enumerate(names):
            pos = x - 0.4 + width * (i + 0.5)
            h = mean.loc[m].to_numpy(dtype=float)
            e = std.loc[m].to_numpy(dtype=float)
            ok = ~np.isnan(h)
            ax.bar(pos[ok], h[ok], width=width * 0.95, color=pal[i], label=method_label(m),
                   yerr=np.nan_to_num(e[ok]) if np.any(~np.isnan(e[ok])) else None,
                   error_kw=dict(ecolor="0.25", elinewidth=1, capsize=2))
            for j in np.flatnonzero(~ok):
                if not mean.iloc[:, j].isna().all():  # splits empty for every method get one mark below
                    ax.text(pos[j], 1, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="0.4")
        for j in np.flatnonzero(mean.isna().all(axis=0).to_numpy()):
            ax.text(x[j], 1, "n/a", ha="center", va="bottom", fontsize=9, color="0.4")
        ticks = []
        for k in splits:
            n = n_cls if k == "all" else len(members.get(k, []) or [])
            known = bool(n_cls) if k == "all" else k in members
            ticks.append(f"{k}\n({n} classes)" if known else k)
        ax.set_xticks(x)
        ax.set_xticklabels(ticks)
        top = np.nanmax((mean + std.fillna(0)).to_numpy()) if np.any(~np.isnan(mean.to_numpy())) else 100
        ax.set_ylim(0, min(105, max(10, top * 1.12)))
        _pct_axis(ax)
        ax.set_xlabel("class split")
        ax.set_ylabel("top-1 accuracy")
        seeds = metrics.get("seeds") or []
        ax.set_title("Accuracy per class split" + (f" (mean ± std over {len(seeds)} seeds)" if len(seeds) > 1 else ""))
        ax.grid(axis="x", visible=False)
        fig.tight_layout()
        # Under the figure, in rows: a legend at the side would take the bars' width.
        ax.legend(fontsize=8, ncol=min(len(names), 5), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  bbox_transform=fig.transFigure, frameon=False)
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- per class


def per_class_accuracy(metrics, methods=None, class_names=None, path=None, classes=None):
    """Per-class accuracy (%) of each method, classes sorted by training images (descending).

    The training counts are drawn as light bars on a secondary log axis. ``classes``
    (labels) restricts the plot to a subset, still in count order.
    """
    names = _methods(metrics, methods)
    counts = np.asarray(metrics["class_counts"], dtype=float)
    cls_names = _names(len(counts), class_names, metrics)
    order = _order_by_count(counts)
    if classes is not None:
        keep = set(int(c) for c in classes)
        order = np.array([c for c in order if c in keep], dtype=int)
    if len(order) == 0:
        raise PlotInputError("no classes to plot")
    x = np.arange(len(order))
    pal = _palette(len(names))
    with _style():
        fig, ax = _plt().subplots(figsize=(max(7.0, min(0.4 * len(order) + 3, MAX_WIDTH_IN - 0.5)), 4.6))
        ax2 = ax.twinx()
        ax2.bar(x, counts[order], color="0.85", width=0.8, label="training images", zorder=0)
        ax2.set_yscale("log")
        ax2.set_ylim(0.8, counts.max() * 4)
        ax2.set_ylabel("training images (grey bars, log scale)", color="0.45")
        ax2.tick_params(axis="y", colors="0.45")
        ax2.grid(False)
        # Accuracy lines above the count bars: raise the primary axes and make its background clear.
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        marker = "o" if len(order) <= 60 else None
        for i, m in enumerate(names):
            acc = _per_class(metrics, m)
            if len(acc) != len(counts):
                raise PlotInputError(f"{m}: per_class has {len(acc)} values for {len(counts)} classes")
            ax.plot(x, acc[order] * 100, marker=marker, markersize=4, linewidth=1.6, color=pal[i],
                    label=method_label(m))
        ax.set_ylim(-2, 102)
        ax.set_xlim(-0.6, len(order) - 0.4)
        _pct_axis(ax)
        ax.set_ylabel("per-class accuracy")
        _tick_labels(ax, x, [f"{cls_names[c]} ({int(counts[c])})" for c in order], len(order),
                     "class (training images), largest first")
        # Legend above the axes: on the right it would collide with the secondary axis label.
        ncol = min(len(names), 4)
        ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=ncol, frameon=False)
        ax.set_title("Per-class accuracy, classes sorted by training images",
                     pad=8 + 15 * math.ceil(len(names) / ncol))
        fig.tight_layout()
    save_figure(fig, path)
    return fig


def _best_baseline(metrics, method, baselines) -> str:
    best = best_baseline(metrics, BASELINES if baselines is None else tuple(baselines), exclude=method)
    if best is None:
        raise PlotInputError(f"no baseline with an 'all' accuracy to compare {method!r} against; "
                             f"methods present: {list(metrics['methods'])}")
    return best


def gain_vs_class_size(metrics, method="cbd_ens", baselines=None, path=None, class_names=None):
    """Per-class gain (percentage points) of ``method`` over the best baseline vs training count (log x).

    The best baseline is the one of ``baselines`` with the highest overall accuracy
    (default: those present among ``methods.BASELINES``);
    its name is in the title. Points are coloured by many/medium/few split.
    """
    if method not in metrics.get("methods", {}):
        raise PlotInputError(f"method {method!r} is not in metrics; available: {list(metrics.get('methods', {}))}")
    best = _best_baseline(metrics, method, baselines)
    counts = np.asarray(metrics["class_counts"], dtype=float)
    gain = (_per_class(metrics, method) - _per_class(metrics, best)) * 100
    splits = metrics.get("splits") or {}
    names = _names(len(counts), class_names, metrics)
    colours = _split_colours()
    with _style():
        fig, ax = _plt().subplots(figsize=(7, 4.5))
        ax.axhline(0, color="0.3", linewidth=1, zorder=1)
        for k in SHOT_SPLITS:
            idx = np.array([c for c in splits.get(k, []) or []], dtype=int)
            if idx.size == 0:
                continue
            mean_gain = np.nanmean(gain[idx]) if np.any(~np.isnan(gain[idx])) else float("nan")
            ax.scatter(counts[idx], gain[idx], s=42, color=colours[k], edgecolor="white", zorder=3,
                       label=f"{SPLIT_LABELS[k]}: mean {mean_gain:+.1f} pp")
        shot = _membership(splits, SHOT_SPLITS)
        unassigned = np.array([c for c in range(len(counts)) if c not in shot], dtype=int)
        if unassigned.size:
            ax.scatter(counts[unassigned], gain[unassigned], s=42, color="0.5", zorder=3, label="classes")
        if len(counts) <= 20:
            for c in range(len(counts)):
                if not np.isnan(gain[c]):
                    ax.annotate(names[c], (counts[c], gain[c]), xytext=(4, 3), textcoords="offset points",
                                fontsize=7, color="0.3")
        ax.set_xscale("log")
        for thr in (FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD):
            # Only thresholds inside the data range, so they do not stretch the axis.
            if not counts.min() < thr < counts.max():
                continue
            ax.axvline(thr, color="0.6", linestyle="--", linewidth=0.8, zorder=0)
        lim = np.nanmax(np.abs(gain)) if np.any(~np.isnan(gain)) else 1.0
        ax.set_ylim(-max(lim, 1) * 1.2, max(lim, 1) * 1.2)
        ax.set_xlabel("training images of the class (log scale)")
        ax.set_ylabel("accuracy gain (percentage points)")
        base_all = metrics["methods"][best]["all"] * 100
        best_name = method_label(best) + (f" [{best}]" if method_label(best) != best else "")
        ax.set_title(f"{method_label(method)} vs best baseline {best_name} (all: {base_all:.1f}%)")
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
    save_figure(fig, path)
    return fig


def confusion_matrix_plot(confusion, class_names=None, normalize=True, title=None, path=None):
    """Seaborn heatmap of a (C, C) count matrix, rows = true class; rows normalised to 1 when asked.

    Cells are annotated only for C <= 20; tick labels are dropped beyond 30 classes.
    """
    sns = _sns()
    cm = np.asarray(confusion, dtype=float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise PlotInputError(f"confusion must be a square (C, C) matrix, got shape {cm.shape}")
    c = cm.shape[0]
    names = _names(c, class_names)
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        # A class without test images keeps a zero row rather than NaN.
        cm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    annot = c <= 20
    size = min(max(4.5, 0.45 * c + 2), MAX_WIDTH_IN - 1.5)
    fig, ax = _plt().subplots(figsize=(size + 1, size))
    labels = names if c <= 30 else False
    sns.heatmap(cm, ax=ax, cmap="Blues", vmin=0, vmax=1 if normalize else None, square=True,
                annot=annot, fmt=".2f" if normalize else ".0f", annot_kws={"fontsize": 7 if c > 10 else 9},
                xticklabels=labels, yticklabels=labels, linewidths=0.3 if c <= 30 else 0, linecolor="white",
                cbar_kws={"label": "share of the true class" if normalize else "images", "shrink": 0.8})
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if c <= 30:
        ax.tick_params(axis="x", labelrotation=45 if c > 8 else 0)
        ax.tick_params(axis="y", labelrotation=0)
    ax.set_title(title or ("Confusion matrix (row-normalised)" if normalize else "Confusion matrix (counts)"),
                 fontweight="bold")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- t-SNE


def subsample_indices(n: int, max_points=None, seed: int = 0) -> np.ndarray:
    """The row indices ``tsne_embed`` keeps: all ``n`` rows, or a sorted random ``max_points`` of them."""
    if max_points is None or n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(max_points), replace=False))


def tsne_embed(features, seed=0, perplexity=30.0, max_points=None):
    """2-D t-SNE of ``features`` (N, D) with scikit-learn (init="pca", random_state=seed).

    The perplexity is clipped below N/3 so tiny inputs work. With ``max_points`` only the rows
    ``subsample_indices(N, max_points, seed)`` are embedded (slice the labels the same way).
    """
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    x = x.reshape(len(x), -1)[subsample_indices(len(x), max_points, seed)]
    n = len(x)
    if n == 0:
        return np.zeros((0, 2))
    if n < 4:
        # Too few points for t-SNE: spread them on a line, deterministic.
        return np.stack([np.arange(n, dtype=float) - (n - 1) / 2, np.zeros(n)], axis=1)
    if x.shape[1] < 2:
        # PCA initialisation needs two feature columns.
        x = np.concatenate([x, np.zeros((n, 2 - x.shape[1]))], axis=1)
    perp = float(min(perplexity, max((n - 1) / 3.0, 1.0)))
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed, learning_rate="auto")
    return tsne.fit_transform(x)


def tsne_plot(embedding_2d, labels, tail_classes, class_names=None, title=None, ax=None, path=None,
              legend=True):
    """Scatter of a precomputed 2-D embedding coloured by class; tail-class points as bigger 'x'.

    tab10 / tab20 colours up to 20 classes (with a class legend), a continuous colormap and a
    colour bar beyond. Draws into ``ax`` when given; returns the figure either way.
    """
    from matplotlib.lines import Line2D

    emb = np.asarray(embedding_2d, dtype=float)
    labels = np.asarray(labels).astype(int)
    if emb.ndim != 2 or emb.shape[1] != 2 or len(emb) != len(labels):
        raise PlotInputError(f"expected an (N, 2) embedding and N labels, got {emb.shape} and {labels.shape}")
    tail = set(int(c) for c in tail_classes)
    num = int(max(labels.max() + 1 if labels.size else 0, max(tail, default=-1) + 1))
    if class_names is not None:
        num = max(num, len(class_names))
    names = _names(num, class_names)
    plt = _plt()
    with _style():
        if ax is None:
            fig, ax = plt.subplots(figsize=(6.5, 5.5))
        else:
            fig = ax.figure
        present = sorted(set(labels.tolist()))
        if num <= 20:
            cmap = plt.get_cmap("tab10" if num <= 10 else "tab20")
            colour = {c: cmap(c % cmap.N) for c in present}
            for c in present:
                pts = emb[labels == c]
                is_tail = c in tail
                ax.scatter(pts[:, 0], pts[:, 1], color=colour[c], marker="x" if is_tail else "o",
                           s=46 if is_tail else 14, linewidths=1.6 if is_tail else 0.3,
                           edgecolors=None if is_tail else "white", alpha=0.9,
                           label=names[c] + (" (tail)" if is_tail else ""))
        else:
            cmap = plt.get_cmap("viridis")
            norm = matplotlib.colors.Normalize(vmin=0, vmax=max(num - 1, 1))
            is_tail = np.isin(labels, list(tail))
            sc = ax.scatter(emb[~is_tail, 0], emb[~is_tail, 1], c=labels[~is_tail], cmap=cmap, norm=norm,
                            marker="o", s=10, alpha=0.8, linewidths=0)
            ax.scatter(emb[is_tail, 0], emb[is_tail, 1], c=labels[is_tail], cmap=cmap, norm=norm,
                       marker="x", s=40, linewidths=1.4)
            fig.colorbar(sc, ax=ax, label="class label", shrink=0.8)
        if legend:
            handles, _ = ax.get_legend_handles_labels()
            key = Line2D([], [], color="0.2", marker="x", linestyle="none", markersize=7, label="x = tail class")
            ax.legend(handles=handles + [key], fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                      ncol=1, frameon=True)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_title(title or "t-SNE of features")
    save_figure(fig, path)
    return fig


def tsne_pair(features_a, features_b, labels, tail_classes, titles=("teacher", "CBD-ENS student"),
              class_names=None, seed=0, path=None, max_points=None):
    """Two side-by-side t-SNE panels (e.g. teacher vs student features of the same images)."""
    labels = np.asarray(labels)
    if len(features_a) != len(labels) or len(features_b) != len(labels):
        raise PlotInputError("features_a, features_b and labels must have the same number of rows")
    keep = subsample_indices(len(labels), max_points, seed)
    with _style():
        fig, axes = _plt().subplots(1, 2, figsize=(MAX_WIDTH_IN - 1.2, 4.4))
    for i, (feats, ttl) in enumerate(zip((features_a, features_b), titles)):
        emb = tsne_embed(np.asarray(feats)[keep], seed=seed)
        # One legend (right panel) is enough: both panels share colours.
        tsne_plot(emb, labels[keep], tail_classes, class_names=class_names, title=ttl, ax=axes[i],
                  legend=i == 1)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- training


_CURVE_LABELS = {
    "loss": "total loss", "ce": "cross-entropy loss", "distill": "distillation loss",
    "val_acc": "validation accuracy", "train_acc": "training accuracy", "lr": "learning rate",
}


def training_curves(history, keys=("loss", "ce", "distill", "val_acc", "lr"), title=None, path=None):
    """One subplot per key present in any epoch record; one line per (model, seed).

    ``history`` is a list of per-epoch dicts (``model``, ``seed``, ``epoch`` and values; a
    value may be missing or None). Accuracy keys in [0, 1] are shown in %.
    """
    from matplotlib.ticker import MaxNLocator

    records = [r for r in (history or []) if isinstance(r, Mapping)]
    present = [k for k in keys if any(r.get(k) is not None for r in records)]
    runs: dict[tuple, list] = {}
    for r in records:
        runs.setdefault((str(r.get("model", "model")), r.get("seed")), []).append(r)
    seeds_of: dict[str, set] = {}
    for model, seed in runs:
        seeds_of.setdefault(model, set()).add(seed)
    models = list(dict.fromkeys(m for m, _ in runs))
    pal = _palette(len(models))
    styles = ["-", "--", ":", "-."]
    plt = _plt()
    with _style():
        if not present:
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.text(0.5, 0.5, "no training history", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            ax.set_title(title or "Training curves")
            save_figure(fig, path)
            return fig
        ncols = 2 if len(present) == 4 else min(3, len(present))
        nrows = math.ceil(len(present) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(min(3.4 * ncols, MAX_WIDTH_IN), 2.7 * nrows + 0.4),
                                 squeeze=False)
        flat = list(axes.ravel())
        for extra in flat[len(present):]:
            fig.delaxes(extra)
        for ax, key in zip(flat, present):
            is_acc = key.endswith("acc")
            for (model, seed), recs in runs.items():
                pts = [(r.get("epoch", i), r.get(key)) for i, r in enumerate(recs) if r.get(key) is not None]
                if not pts:
                    continue
                pts.sort(key=lambda p: p[0])
                ep = np.array([p[0] for p in pts], dtype=float)
                val = np.array([p[1] for p in pts], dtype=float)
                if is_acc and np.nanmax(val) <= 1.0:
                    val = val * 100
                several = len(seeds_of[model]) > 1
                seed_rank = sorted(seeds_of[model], key=str).index(seed)
                ax.plot(ep, val, color=pal[models.index(model)], linestyle=styles[seed_rank % len(styles)],
                        marker="o" if len(ep) <= 15 else None, markersize=3, linewidth=1.5,
                        label=f"{model} (seed {seed})" if several else model)
            ax.set_title(_CURVE_LABELS.get(key, key))
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if is_acc:
                _pct_axis(ax)
                ax.set_ylabel("accuracy")
            else:
                ax.set_ylabel(key)
            if key == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        handles, labels = flat[0].get_legend_handles_labels()
        for ax in flat[1:len(present)]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        if title:
            fig.suptitle(title, fontweight="bold")
        fig.tight_layout()
        # A shared legend under the panels, so that no curve is hidden by it.
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 4),
                   fontsize=8, frameon=False)
    save_figure(fig, path)
    return fig


def tau_curve(curves, path=None, title="τ-norm: balanced validation accuracy against τ"):
    """Balanced validation accuracy (%) against tau, one line per seed, the chosen tau marked.

    ``curves`` is ``{seed: {"tau": [...], "val_acc": [...], "chosen": tau}}`` (as
    ``cbdlib.workbook.tau_curves`` reads it from a run folder); accuracies are fractions.
    """
    plt = _plt()
    with _style():
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        if not curves:
            ax.text(0.5, 0.5, "no τ-norm validation curve", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            ax.set_title(title)
            save_figure(fig, path)
            return fig
        pal = _palette(len(curves))
        for colour, (seed, curve) in zip(pal, curves.items()):
            tau = np.asarray(curve["tau"], dtype=float)
            acc = 100 * np.asarray(curve["val_acc"], dtype=float)
            if tau.shape != acc.shape or tau.ndim != 1 or len(tau) == 0:
                raise PlotInputError(f"seed {seed}: tau and val_acc must be lists of the same length, "
                                     f"got {tau.shape} and {acc.shape}")
            ax.plot(tau, acc, color=colour, marker="o", markersize=3, linewidth=1.5, label=f"seed {seed}")
            chosen = curve.get("chosen")
            if chosen is not None:
                at = int(np.argmin(np.abs(tau - float(chosen))))
                ax.plot([tau[at]], [acc[at]], marker="*", markersize=12, color=colour, linestyle="none",
                        markeredgecolor="black", label=f"chosen τ = {tau[at]:g} (seed {seed})")
        ax.set_xlabel("τ (classifier weights divided by their norm to the power τ)")
        ax.set_ylabel("balanced validation accuracy (%)")
        ax.set_title(title)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- widget


def _png_bundle(fig) -> dict:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": "<figure>"}}


def method_explorer(metrics, class_names=None):
    """Interactive explorer: pick methods and a range of classes (by training-count rank).

    Returns an ``ipywidgets.VBox`` whose ``Output`` shows the per-class accuracy plot and the
    split table of the selected methods. ``box.refresh()`` redraws (the widgets call it on
    every change); ``box.last_figure`` / ``box.last_table`` hold what was drawn last.
    It builds and refreshes without a running kernel: the output is set as display data
    (PNG + HTML) directly on the ``Output`` widget.
    """
    import ipywidgets as w

    names = _methods(metrics)
    if not names:
        raise PlotInputError("metrics has no methods to explore")
    counts = np.asarray(metrics["class_counts"])
    cls_names = _names(len(counts), class_names, metrics)
    order = _order_by_count(counts)
    default = [m for m in names if m in ("ce", "cbd", "cbd_ens")] or names[:3]
    method_sel = w.SelectMultiple(options=[(method_label(m), m) for m in names], value=tuple(default),
                                  rows=min(len(names), 16), description="methods")
    class_range = w.IntRangeSlider(value=(0, len(order) - 1), min=0, max=len(order) - 1, step=1,
                                   description="class rank", continuous_update=False,
                                   layout=w.Layout(width="420px"))
    range_note = w.HTML()
    out = w.Output()
    box = w.VBox([w.HBox([method_sel, w.VBox([class_range, range_note])]), out])
    box.last_figure = None
    box.last_table = None

    def refresh(*_):
        plt = _plt()
        chosen = list(method_sel.value) or names[:1]
        lo, hi = class_range.value
        classes = order[lo:hi + 1]
        first, last = classes[0], classes[-1]
        range_note.value = (f"<small>classes {lo + 1}-{hi + 1} of {len(order)}: "
                            f"{cls_names[first]} ({int(counts[first])} imgs) … "
                            f"{cls_names[last]} ({int(counts[last])} imgs)</small>")
        fig = per_class_accuracy(metrics, chosen, class_names=cls_names, classes=classes)
        table = split_accuracy_table(metrics, chosen)
        out.outputs = (
            _png_bundle(fig),
            {"output_type": "display_data", "metadata": {},
             "data": {"text/html": table.to_html(), "text/plain": table.to_string()}},
        )
        if box.last_figure is not None:
            plt.close(box.last_figure)
        # Closed at once so pyplot does not show it again at the end of the cell.
        plt.close(fig)
        box.last_figure, box.last_table = fig, table

    method_sel.observe(refresh, names="value")
    class_range.observe(refresh, names="value")
    box.refresh = refresh
    refresh()
    return box
