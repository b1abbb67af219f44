"""Figures and tables of the workbook, one family per module: ``dataset`` (the long tail),
``accuracy`` (split tables and bars, per class, gain against class size, confusion), ``tsne``,
``training`` (curves, tau), ``analysis`` (probes, calibration, teacher agreement), ``widgets``
(the interactive explorers); ``style`` is what they share.

Every plotting function takes plain data (lists, numpy arrays, the ``metrics.json`` dict),
builds its own figure with matplotlib's object API and returns the
:class:`matplotlib.figure.Figure`; with ``path`` it also writes a PNG there first
(parent folders created, dpi 120, tight bounding box). The package never calls
``matplotlib.use()``: the notebook or the test chooses the backend.

``metrics`` schema (see ``cbdlib/metrics.py``)::

    {"class_counts": [...], "splits": {"many": [...], ..., "tail": [...]}, "seeds": [...],
     "methods": {NAME: {"all", "many", "medium", "few", "head", "mid", "tail": float|None,
                        "per_class": [acc by label]}},
     "std": {NAME: {same keys, std over seeds}}}

A split accuracy of ``None`` (no class in that split) is drawn as missing and written "n/a".
"""
from ..methods import method_label
from .accuracy import (
                       confusion_matrix_plot,
                       gain_vs_class_size,
                       per_class_accuracy,
                       split_accuracy_bars,
                       split_accuracy_frame,
                       split_accuracy_table,
)
from .analysis import (
                       agreement_table,
                       ece_table,
                       probe_bars,
                       probe_table,
                       reliability_diagrams,
                       teacher_agreement_plot,
)
from .dataset import class_histogram, counts_table, cumulative_share, sample_grid
from .style import MAX_WIDTH_IN, SPLIT_KEYS, SPLIT_LABELS, PlotInputError, save_figure
from .training import tau_curve, training_curves
from .tsne import subsample_indices, tsne_embed, tsne_pair, tsne_plot
from .widgets import imbalance_explorer, method_explorer

__all__ = [
    "agreement_table", "ece_table", "probe_bars", "probe_table", "reliability_diagrams", "teacher_agreement_plot",
    "MAX_WIDTH_IN", "SPLIT_KEYS", "SPLIT_LABELS", "PlotInputError", "class_histogram", "confusion_matrix_plot",
    "counts_table", "cumulative_share", "gain_vs_class_size", "imbalance_explorer", "method_explorer", "method_label",
    "per_class_accuracy", "sample_grid", "save_figure", "split_accuracy_bars", "split_accuracy_frame",
    "split_accuracy_table", "subsample_indices", "tau_curve", "training_curves", "tsne_embed", "tsne_pair", "tsne_plot",
]
