"""Figures of the long-tailed training set: class histogram, cumulative share, sample grid, counts table."""
from __future__ import annotations

import numpy as np

from ..data.stats import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD, SHOT_SPLITS, THIRDS
from .style import (
    MAX_WIDTH_IN,
    SPLIT_LABELS,
    PlotInputError,
    class_labels,
    membership,
    order_by_count,
    palette,
    percent_axis,
    pyplot,
    save_figure,
    split_colours,
    style,
    thirds_of,
    tick_labels,
)


def class_histogram(class_counts, splits, class_names=None, path=None):
    """Training images per class (sorted descending, log y) coloured by many/medium/few split.

    Dashed lines mark the many-shot (100) and few-shot (20) thresholds; the legend gives
    the number of classes in each split.
    """
    from matplotlib.patches import Patch

    counts = np.asarray(class_counts, dtype=float)
    if counts.size == 0:
        raise PlotInputError("class_counts is empty")
    names = class_labels(len(counts), class_names)
    order = order_by_count(counts)
    colours = split_colours()
    grey = (0.6, 0.6, 0.6)
    shot = membership(splits, SHOT_SPLITS)
    bar_colours = [colours.get(shot.get(int(c)), grey) for c in order]
    with style():
        fig, ax = pyplot().subplots(figsize=(max(6.0, min(0.35 * len(counts) + 3, MAX_WIDTH_IN)), 4.2))
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
        tick_labels(ax, x, [names[c] for c in order], len(order), "class (sorted by training images)")
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
    sorted_counts = counts[order_by_count(counts)]
    x = np.concatenate([[0.0], np.arange(1, c + 1) / c * 100])
    y = np.concatenate([[0.0], np.cumsum(sorted_counts) / sorted_counts.sum() * 100])
    n_head = len(thirds_of(counts)["head"])
    head_share = y[n_head]
    pal = palette(10)
    with style():
        fig, ax = pyplot().subplots(figsize=(5.5, 5))
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
        percent_axis(ax, "x")
        percent_axis(ax, "y")
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
    names = class_labels(len(counts), class_names)
    rows = _sample_rows(splits)
    if not rows:
        raise PlotInputError("every split is empty")
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    per_split = max(1, int(per_split))
    colours = split_colours()
    fig, axes = pyplot().subplots(len(rows), per_split, squeeze=False,
                                figsize=(min(1.5 * per_split + 0.6, MAX_WIDTH_IN), 1.75 * len(rows)))
    for r, split in enumerate(rows):
        # Largest classes of the split first, then cycle so every class gets a turn; with more
        # classes than slots, a random subset of classes (still in count order) shows the variety.
        members = set(int(c) for c in splits[split])
        classes = [int(c) for c in order_by_count(counts) if c in members and c in by_class]
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
    names = class_labels(len(counts), class_names)
    total = counts.sum()
    thirds = {k: v for k, v in splits.items() if k in THIRDS and v} or thirds_of(counts)
    shot, third = membership(splits, SHOT_SPLITS), membership(thirds, THIRDS)
    rows = []
    for c in order_by_count(counts):
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
