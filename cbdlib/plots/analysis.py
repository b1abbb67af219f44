"""Figures and tables of the analyses (``cbdlib.analysis``): probes of each model's features,
calibration (ECE table, reliability diagrams) and teacher agreement."""
from __future__ import annotations

import numpy as np

from ..methods import method_label, method_order
from .accuracy import split_accuracy_table
from .style import (
    MAX_WIDTH_IN,
    SPLIT_KEYS,
    as_float,
    order_by_count,
    palette,
    percent_axis,
    pyplot,
    save_figure,
    split_colours,
    style,
)

SHOWN_SPLITS = ("all", "head", "mid", "tail")


def _as_methods(metrics, top: str, kind: str | None = None) -> dict:
    """A metrics-shaped view of an analysis (``probes`` per kind, or ``ece``) for the split tables."""
    mean, std = metrics.get(top) or {}, metrics.get(f"{top}_std") or {}
    pick = (lambda r: (r or {}).get(kind) or {}) if kind else (lambda r: r or {})
    names = method_order(mean)
    return {"methods": {m: pick(mean[m]) for m in names}, "std": {m: pick(std.get(m)) for m in names},
            "splits": metrics.get("splits", {}), "class_counts": metrics.get("class_counts", []),
            "seeds": metrics.get("seeds", [])}


def probe_table(metrics):
    """Linear-probe and NCM accuracy (%) of each model's features, mean ± std over seeds."""
    import pandas as pd

    parts = {kind: split_accuracy_table(_as_methods(metrics, "probes", kind)) for kind in ("linear", "ncm")}
    table = pd.concat(parts, axis=1, names=["probe", "split"])
    table.index = [method_label(m) for m in table.index]
    return table


def ece_table(metrics):
    """Expected calibration error (%) of each method, overall and per split, mean ± std over seeds."""
    table = split_accuracy_table(_as_methods(metrics, "ece"))
    table.index = [method_label(m) for m in table.index]
    return table


def probe_bars(metrics, splits=SHOWN_SPLITS, path=None):
    """Two panels (linear probe, NCM): per split, one bar per model, error bars = std over seeds."""
    names = method_order(metrics.get("probes") or {})
    pal = palette(len(names))
    width = 0.8 / max(len(names), 1)
    settings = metrics.get("probe_settings") or {}
    with style():
        fig, axes = pyplot().subplots(1, 2, figsize=(min(MAX_WIDTH_IN, 4 + 1.2 * len(names)), 4.2), sharey=True)
        for ax, kind in zip(axes, ("linear", "ncm")):
            view = _as_methods(metrics, "probes", kind)
            x = np.arange(len(splits))
            for i, m in enumerate(names):
                h = np.array([as_float(view["methods"][m].get(k)) for k in splits]) * 100
                e = np.array([as_float(view["std"][m].get(k)) for k in splits]) * 100
                ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(h), width * 0.95, color=pal[i],
                       yerr=np.nan_to_num(e), error_kw=dict(ecolor="0.25", elinewidth=1, capsize=2),
                       label=method_label(m))
            ax.set_xticks(x)
            ax.set_xticklabels(splits)
            ax.set_ylim(0, 105)
            percent_axis(ax)
            ax.set_title("class-balanced linear probe" if kind == "linear" else "NCM (cl2n)")
        axes[0].set_ylabel("test top-1 on frozen features")
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        if settings:
            fig.suptitle(f"Probes: {settings.get('epochs')} epochs, lr {settings.get('lr')}, class-balanced sampling; "
                         f"mean ± std over seeds {metrics.get('seeds')}", fontsize=9)
        fig.tight_layout()
        save_figure(fig, path)
    return fig


def reliability_diagrams(records: dict, path=None):
    """One panel per method: accuracy per confidence bin against the diagonal of perfect calibration.

    ``records`` maps a title to ``{"reliability": bins, "ece": {"all": ...}}`` (an evaluation record)."""
    n = max(len(records), 1)
    with style():
        fig, axes = pyplot().subplots(1, n, figsize=(min(MAX_WIDTH_IN, 3.8 * n), 3.8), squeeze=False)
        for ax, (title, record) in zip(axes[0], records.items()):
            bins = record["reliability"]
            k = len(bins["count"])
            centres = (np.arange(k) + 0.5) / k
            accuracy = np.array([as_float(v) for v in bins["accuracy"]])
            confidence = np.array([as_float(v) for v in bins["confidence"]])
            ok = ~np.isnan(accuracy)
            ax.bar(centres[ok], accuracy[ok], width=1 / k, edgecolor="0.2", color=split_colours()["head"],
                   label="accuracy")
            ax.plot(centres[ok], confidence[ok], "o", color="tab:red", markersize=4, label="mean confidence")
            ax.plot([0, 1], [0, 1], "k--", linewidth=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("confidence (max softmax)")
            ece = record.get("ece", {}).get("all")
            ax.set_title(f"{title}\nECE {100 * ece:.1f} %" if ece is not None else title, fontsize=10)
        axes[0][0].set_ylabel("accuracy in the bin")
        axes[0][0].legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        save_figure(fig, path)
    return fig


def agreement_table(metrics):
    """The students' cosine to their teachers' target, the teachers' pairwise agreement (%) and
    the ensemble's gain over its best member (points), per split."""
    import pandas as pd

    agreement = metrics.get("teacher_agreement") or {}
    rows, index = [], []

    def row(record, scale, fmt):
        std = record.get("std") or {}
        return [("n/a" if record.get(k) is None else
                 f"{scale * record[k]:{fmt}} ± {scale * (std.get(k) or 0.0):{fmt[:-1] + 'f'}}") for k in SPLIT_KEYS]

    for student, record in agreement.get("student_cosine", {}).items():
        index.append(f"{method_label(student)}: cosine to its teachers' target")
        rows.append(row(record, 1, ".3f"))
    if agreement.get("pairwise_agreement"):
        index.append("teachers: pairwise prediction agreement (%)")
        rows.append(row(agreement["pairwise_agreement"], 100, ".1f"))
    if agreement.get("ensemble_gain"):
        index.append("teacher ensemble minus its best member (points)")
        rows.append(row(agreement["ensemble_gain"], 100, "+.2f"))
    return pd.DataFrame(rows, index=index, columns=list(SPLIT_KEYS))


def teacher_agreement_plot(metrics, class_names=None, path=None):
    """Per class (sorted by training count): each student's cosine to its teachers' target, and
    the teachers' pairwise prediction agreement."""
    agreement = metrics.get("teacher_agreement") or {}
    counts = metrics["class_counts"]
    order = order_by_count(counts)
    x = np.arange(len(order))
    colours = split_colours()
    with style():
        fig, (left, right) = pyplot().subplots(1, 2, figsize=(min(MAX_WIDTH_IN, 11), 3.8))
        for i, (student, record) in enumerate(agreement.get("student_cosine", {}).items()):
            values = np.array([as_float(record["per_class"][c]) for c in order])
            left.plot(x, values, marker="o", markersize=3, color=palette(2)[i], label=method_label(student))
        left.set_ylabel("cosine (student feature, teachers' target)")
        left.set_title("How closely the students follow their teachers")
        pairwise = agreement.get("pairwise_agreement") or {}
        if pairwise.get("per_class"):
            values = np.array([as_float(pairwise["per_class"][c]) for c in order]) * 100
            right.bar(x, values, color=[colours["tail"] if c in metrics["splits"]["tail"] else colours["head"]
                                         for c in order])
            right.set_ylim(0, 100)
            percent_axis(right)
        right.set_ylabel("teachers predicting the same class")
        right.set_title("How diverse the teachers are (tail third in red)")
        for ax in (left, right):
            ax.set_xticks(x)
            labels = [class_names[c] if class_names else str(c) for c in order] if len(x) <= 20 else []
            ax.set_xticklabels(labels, rotation=90, fontsize=7)
            ax.set_xlabel("classes by training images (most left)")
        if agreement.get("student_cosine"):
            left.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, path)
    return fig
