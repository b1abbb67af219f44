"""The interactive explorers (ipywidgets): they fill their ``Output`` with PNG display data
directly, so they also build and redraw without a running frontend (tests, papermill)."""
from __future__ import annotations

import base64
import io

import numpy as np

from ..errors import CBDError
from ..methods import method_label
from .accuracy import per_class_accuracy, split_accuracy_table
from .dataset import class_histogram
from .style import PlotInputError, class_labels, methods_in, order_by_count, pyplot


def png_output(fig) -> dict:
    """``fig`` as the PNG display data of a notebook output (what an ``Output`` widget shows)."""
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

    names = methods_in(metrics)
    if not names:
        raise PlotInputError("metrics has no methods to explore")
    counts = np.asarray(metrics["class_counts"])
    cls_names = class_labels(len(counts), class_names, metrics)
    order = order_by_count(counts)
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
        plt = pyplot()
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
            png_output(fig),
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


def imbalance_explorer(n_max: int, class_names: list, imbalance_ratio: float = 10.0, profile: str = "exp"):
    """An imbalance-ratio slider and a profile menu redrawing the class histogram of ``long_tail_counts``.

    Returns an ``ipywidgets.VBox`` (``box.refresh()`` redraws, ``box.last_counts`` holds the
    counts drawn). It fills its ``Output`` directly, so it also builds without a frontend.
    """
    import ipywidgets as w

    from ..data import class_splits, long_tail_counts

    start = float(imbalance_ratio) if imbalance_ratio else 10.0  # None (natural counts): any start will do
    ratio = w.FloatLogSlider(value=start, base=10, min=0, max=3, step=0.05,
                             description="imbalance", continuous_update=False, readout_format=".0f")
    shape = w.Dropdown(options=["exp", "step"], value=profile, description="profile")
    note = w.HTML()
    out = w.Output()
    box = w.VBox([w.HBox([ratio, shape]), note, out])
    box.last_counts = None

    def refresh(*_):
        try:
            counts = long_tail_counts(int(n_max), len(class_names), float(ratio.value), shape.value)
            if min(counts) < 1:
                raise CBDError(f"imbalance ratio {ratio.value:.0f} leaves a class with no image (n_max {n_max})")
        except CBDError as error:
            note.value = f"<b>{error}</b>"
            return
        fig = class_histogram(counts, class_splits(counts), class_names)
        pyplot().close(fig)  # shown through the Output widget only
        note.value = f"<small>n_max {n_max}: {sum(counts)} training images</small>"
        out.outputs = (png_output(fig),)
        box.last_counts = counts

    ratio.observe(refresh, names="value")
    shape.observe(refresh, names="value")
    box.refresh = refresh
    refresh()
    return box
