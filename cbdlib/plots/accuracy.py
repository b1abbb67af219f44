"""Figures and tables of test accuracy: per split (table, bars), per class, the gain over the best
baseline against class size, confusion matrices."""
from __future__ import annotations

import math

import numpy as np

from ..data.stats import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD, SHOT_SPLITS
from ..methods import BASELINES, best_baseline, method_label
from .style import (
    MAX_WIDTH_IN,
    SPLIT_KEYS,
    SPLIT_LABELS,
    PlotInputError,
    as_float,
    class_labels,
    membership,
    methods_in,
    order_by_count,
    palette,
    per_class_of,
    percent_axis,
    pyplot,
    save_figure,
    seaborn,
    split_colours,
    style,
    tick_labels,
)


def split_accuracy_frame(metrics, methods=None, std=False):
    """Raw split accuracies (fractions in [0, 1], NaN where None): rows = methods, columns = splits.

    With ``std=True`` the same frame of standard deviations over seeds (NaN when absent).
    """
    import pandas as pd

    names = methods_in(metrics, methods)
    source = (metrics.get("std") or {}) if std else metrics["methods"]
    data = [[as_float((source.get(m) or {}).get(k)) for k in SPLIT_KEYS] for m in names]
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
    names = methods_in(metrics, methods)
    splits = list(splits)
    mean = split_accuracy_frame(metrics, names).reindex(columns=splits) * 100
    std = split_accuracy_frame(metrics, names, std=True).reindex(columns=splits) * 100
    members = metrics.get("splits", {}) or {}
    n_cls = len(metrics.get("class_counts", []) or [])
    pal = palette(len(names))
    width = 0.8 / max(len(names), 1)
    with style():
        wide = max(7.0, 1.0 + len(splits) * (0.35 + 0.22 * len(names)))
        fig, ax = pyplot().subplots(figsize=(min(wide, MAX_WIDTH_IN), 4.5))
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
        percent_axis(ax)
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


def per_class_accuracy(metrics, methods=None, class_names=None, path=None, classes=None):
    """Per-class accuracy (%) of each method, classes sorted by training images (descending).

    The training counts are drawn as light bars on a secondary log axis. ``classes``
    (labels) restricts the plot to a subset, still in count order.
    """
    names = methods_in(metrics, methods)
    counts = np.asarray(metrics["class_counts"], dtype=float)
    cls_names = class_labels(len(counts), class_names, metrics)
    order = order_by_count(counts)
    if classes is not None:
        keep = set(int(c) for c in classes)
        order = np.array([c for c in order if c in keep], dtype=int)
    if len(order) == 0:
        raise PlotInputError("no classes to plot")
    x = np.arange(len(order))
    pal = palette(len(names))
    with style():
        fig, ax = pyplot().subplots(figsize=(max(7.0, min(0.4 * len(order) + 3, MAX_WIDTH_IN - 0.5)), 4.6))
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
            acc = per_class_of(metrics, m)
            if len(acc) != len(counts):
                raise PlotInputError(f"{m}: per_class has {len(acc)} values for {len(counts)} classes")
            ax.plot(x, acc[order] * 100, marker=marker, markersize=4, linewidth=1.6, color=pal[i],
                    label=method_label(m))
        ax.set_ylim(-2, 102)
        ax.set_xlim(-0.6, len(order) - 0.4)
        percent_axis(ax)
        ax.set_ylabel("per-class accuracy")
        tick_labels(ax, x, [f"{cls_names[c]} ({int(counts[c])})" for c in order], len(order),
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
    gain = (per_class_of(metrics, method) - per_class_of(metrics, best)) * 100
    splits = metrics.get("splits") or {}
    names = class_labels(len(counts), class_names, metrics)
    colours = split_colours()
    with style():
        fig, ax = pyplot().subplots(figsize=(7, 4.5))
        ax.axhline(0, color="0.3", linewidth=1, zorder=1)
        for k in SHOT_SPLITS:
            idx = np.array([c for c in splits.get(k, []) or []], dtype=int)
            if idx.size == 0:
                continue
            mean_gain = np.nanmean(gain[idx]) if np.any(~np.isnan(gain[idx])) else float("nan")
            ax.scatter(counts[idx], gain[idx], s=42, color=colours[k], edgecolor="white", zorder=3,
                       label=f"{SPLIT_LABELS[k]}: mean {mean_gain:+.1f} pp")
        shot = membership(splits, SHOT_SPLITS)
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
    sns = seaborn()
    cm = np.asarray(confusion, dtype=float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise PlotInputError(f"confusion must be a square (C, C) matrix, got shape {cm.shape}")
    c = cm.shape[0]
    names = class_labels(c, class_names)
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        # A class without test images keeps a zero row rather than NaN.
        cm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    annot = c <= 20
    size = min(max(4.5, 0.45 * c + 2), MAX_WIDTH_IN - 1.5)
    fig, ax = pyplot().subplots(figsize=(size + 1, size))
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
