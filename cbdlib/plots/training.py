"""Training curves from ``history.jsonl`` and tau-norm's validation curve."""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .style import MAX_WIDTH_IN, PlotInputError, palette, percent_axis, pyplot, save_figure, style

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
    pal = palette(len(models))
    styles = ["-", "--", ":", "-."]
    plt = pyplot()
    with style():
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
                percent_axis(ax)
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


# The post-hoc choices drawn by ``tau_curve``: title and x-axis of each.
TAU_PANELS = {
    "tau_norm": ("τ-norm", "τ (classifier weights divided by their norm to the power τ)"),
    "logit_adjust": ("logit adjustment", "τ (logits minus τ · log class prior)"),
}


def tau_curve(curves_by_method, path=None):
    """Balanced validation accuracy (%) against tau, one panel per method (``tau_norm``,
    ``logit_adjust``), one line per seed, the chosen tau marked.

    ``curves_by_method`` is ``{method: {seed: {"tau": [...], "val_acc": [...], "chosen": tau}}}``
    (as ``cbdlib.workbook.post_hoc_curves`` reads them from a run folder); accuracies are fractions.
    """
    plt = pyplot()
    methods = list(curves_by_method) or ["tau_norm"]
    with style():
        fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 3.6), squeeze=False)
        for ax, method in zip(axes[0], methods):
            _tau_panel(ax, method, curves_by_method.get(method) or {})
        fig.tight_layout()
    save_figure(fig, path)
    return fig


def _tau_panel(ax, method: str, curves: dict) -> None:
    name, xlabel = TAU_PANELS.get(method, (method, "τ"))
    title = f"{name}: balanced validation accuracy against τ"
    ax.set_title(title)
    if not curves:
        ax.text(0.5, 0.5, f"no {name} validation curve", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    for colour, (seed, curve) in zip(palette(len(curves)), curves.items()):
        tau = np.asarray(curve["tau"], dtype=float)
        acc = 100 * np.asarray(curve["val_acc"], dtype=float)
        if tau.shape != acc.shape or tau.ndim != 1 or len(tau) == 0:
            raise PlotInputError(f"{method} seed {seed}: tau and val_acc must be lists of the same length, "
                                 f"got {tau.shape} and {acc.shape}")
        ax.plot(tau, acc, color=colour, marker="o", markersize=3, linewidth=1.5, label=f"seed {seed}")
        chosen = curve.get("chosen")
        if chosen is not None:
            at = int(np.argmin(np.abs(tau - float(chosen))))
            ax.plot([tau[at]], [acc[at]], marker="*", markersize=12, color=colour, linestyle="none",
                    markeredgecolor="black", label=f"chosen τ = {tau[at]:g} (seed {seed})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("balanced validation accuracy (%)")
    ax.legend(fontsize=8, loc="best")
