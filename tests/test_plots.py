"""Tests of cbdlib.plots on a small, realistic fake metrics dict (10 classes, 5000..50 images)."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")  # before pyplot is imported anywhere

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from cbdlib import plots  # noqa: E402

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SPLIT_KEYS = ("all", "many", "medium", "few", "head", "mid", "tail")


def make_counts(num_classes=10, n_max=5000, n_min=50):
    # Exponential profile of CIFAR-LT: n_i = n_max * (n_min / n_max) ** (i / (C - 1)).
    i = np.arange(num_classes)
    return [int(n_max * (n_min / n_max) ** (k / (num_classes - 1))) for k in i]


def make_splits(counts):
    counts = np.asarray(counts)
    labels = np.arange(len(counts))
    order = sorted(labels.tolist(), key=lambda c: (-counts[c], c))
    head, mid, tail = (sorted(p.tolist()) for p in np.array_split(np.array(order), 3))
    return {
        "many": labels[counts > 100].tolist(),
        "medium": labels[(counts >= 20) & (counts <= 100)].tolist(),
        "few": labels[counts < 20].tolist(),
        "head": head, "mid": mid, "tail": tail,
    }


def split_means(per_class, splits):
    out = {"all": float(np.mean(per_class)), "per_class": [float(v) for v in per_class]}
    for k in SPLIT_KEYS[1:]:
        out[k] = float(np.mean([per_class[c] for c in splits[k]])) if splits[k] else None
    return out


@pytest.fixture
def metrics():
    counts = make_counts()
    splits = make_splits(counts)
    rng = np.random.default_rng(0)
    base = np.linspace(0.95, 0.35, len(counts))  # accuracy falls with class size
    per_method = {
        "ce": base,
        "crt": np.clip(base + np.linspace(-0.05, 0.15, len(counts)), 0, 1),
        "lws": np.clip(base + np.linspace(-0.03, 0.10, len(counts)), 0, 1),
        "cbd_ens": np.clip(base + np.linspace(0.0, 0.25, len(counts)) + rng.normal(0, 0.01, len(counts)), 0, 1),
    }
    methods = {m: split_means(v, splits) for m, v in per_method.items()}
    std = {m: {k: (0.004 if methods[m][k] is not None else None) for k in SPLIT_KEYS} for m in methods}
    del std["lws"]  # a method without std: tables show only the mean
    return {"class_counts": counts, "splits": splits, "seeds": [0, 1, 2], "methods": methods, "std": std}


@pytest.fixture(autouse=True)
def close_all():
    yield
    plt.close("all")


def test_fixture_is_realistic(metrics):
    s = metrics["splits"]
    assert metrics["class_counts"][0] == 5000 and metrics["class_counts"][-1] == 50
    assert s["few"] == [] and metrics["methods"]["ce"]["few"] is None  # the None split under test
    assert s["many"] and s["medium"]


def _bars(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_height() > 0]


def test_class_histogram(metrics, tmp_path):
    counts, splits = metrics["class_counts"], metrics["splits"]
    path = tmp_path / "sub" / "hist.png"
    fig = plots.class_histogram(counts, splits, class_names=NAMES, path=path)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    bars = _bars(ax)
    assert len(bars) == len(counts)
    heights = [b.get_height() for b in bars]
    assert heights == sorted(heights, reverse=True)
    assert ax.get_yscale() == "log"
    colours = {tuple(b.get_facecolor()) for b in bars}
    assert len(colours) == 2  # many and medium differ (few is empty here)
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "airplane"
    hlines = sorted(line.get_ydata()[0] for line in ax.get_lines())
    assert hlines == [20, 100]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(f"{len(splits['many'])} classes" in t for t in legend)
    assert any("0 classes" in t for t in legend)  # the empty few split is still named
    assert path.exists() and path.stat().st_size > 0


def test_cumulative_share(metrics, tmp_path):
    counts = metrics["class_counts"]
    fig = plots.cumulative_share(counts, path=tmp_path / "cum.png")
    ax = fig.axes[0]
    curve = [line for line in ax.get_lines() if line.get_label() == "this dataset"][0]
    y = curve.get_ydata()
    assert y[0] == 0 and y[-1] == pytest.approx(100)
    assert np.all(np.diff(y) >= 0)
    head_share = sum(sorted(counts, reverse=True)[:4]) / sum(counts) * 100
    texts = " ".join(t.get_text() for t in ax.texts)
    assert f"{head_share:.1f}%" in texts
    assert (tmp_path / "cum.png").stat().st_size > 0


def test_sample_grid(metrics, tmp_path):
    counts, splits = metrics["class_counts"], metrics["splits"]
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 5)
    images = rng.integers(0, 256, size=(len(labels), 8, 8, 3), dtype=np.uint8)
    fig = plots.sample_grid(images, labels, counts, splits, class_names=NAMES, per_split=4,
                            path=tmp_path / "grid.png")
    # Rows: many, medium (few is empty), head, mid, tail.
    assert len(fig.axes) == 5 * 4
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles and all(any(n in t for n in NAMES) for t in titles)
    first_row_titles = [fig.axes[j].get_title().split("\n")[0] for j in range(4)]
    assert set(first_row_titles) <= {NAMES[c] for c in splits["many"]}
    assert (tmp_path / "grid.png").stat().st_size > 0
    # Grey images work too.
    fig2 = plots.sample_grid(images[..., 0], labels, counts, splits, per_split=2)
    assert len(fig2.axes) == 5 * 2


def test_counts_table(metrics):
    counts, splits = metrics["class_counts"], metrics["splits"]
    df = plots.counts_table(counts, splits, class_names=NAMES)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["label", "name", "count", "share (%)", "shot split", "third"]
    assert len(df) == 10
    assert df["count"].is_monotonic_decreasing
    assert df["share (%)"].sum() == pytest.approx(100, abs=0.05)
    assert df.iloc[0]["name"] == "airplane" and df.iloc[0]["shot split"] == "many"
    assert df.iloc[-1]["third"] == "tail" and df.iloc[-1]["shot split"] == "medium"


def test_split_accuracy_table_and_frame(metrics):
    table = plots.split_accuracy_table(metrics)
    assert list(table.index) == ["ce", "crt", "lws", "cbd_ens"]
    assert list(table.columns) == list(SPLIT_KEYS)
    assert (table["few"] == "n/a").all()
    ce_all = metrics["methods"]["ce"]["all"] * 100
    assert table.loc["ce", "all"] == f"{ce_all:.1f} ± 0.4"
    assert "±" not in table.loc["lws", "all"]  # no std recorded
    ordered = plots.split_accuracy_table(metrics, methods=["cbd_ens", "ce"])
    assert list(ordered.index) == ["cbd_ens", "ce"]
    frame = plots.split_accuracy_frame(metrics)
    assert frame["few"].isna().all()
    assert frame.loc["crt", "many"] == pytest.approx(metrics["methods"]["crt"]["many"])
    with pytest.raises(ValueError, match="nope"):
        plots.split_accuracy_table(metrics, methods=["nope"])


def test_split_accuracy_bars(metrics, tmp_path):
    fig = plots.split_accuracy_bars(metrics, path=tmp_path / "bars.png")
    ax = fig.axes[0]
    # Four methods, seven splits, of which "few" has no classes: 4 * 6 bars, one "n/a" mark for "few".
    assert len(_bars(ax)) == 4 * 6
    assert sum(t.get_text() == "n/a" for t in ax.texts) == 1
    assert len([t for t in ax.get_legend().get_texts()]) == 4
    assert ax.get_ylim()[1] <= 105
    assert "%" in ax.yaxis.get_major_formatter()(50, 0)
    assert (tmp_path / "bars.png").stat().st_size > 0
    fig2 = plots.split_accuracy_bars(metrics, methods=["ce"], splits=("all", "tail"))
    assert len(_bars(fig2.axes[0])) == 2


def test_per_class_accuracy(metrics, tmp_path):
    fig = plots.per_class_accuracy(metrics, class_names=NAMES, path=tmp_path / "pc.png")
    ax, ax2 = fig.axes[0], fig.axes[1]
    lines = [line for line in ax.get_lines() if line.get_label() in ("CE", "cRT", "LWS", "CBD-ENS")]
    assert len(lines) == 4
    cbd = [line for line in lines if line.get_label() == "CBD-ENS"][0]
    assert cbd.get_ydata()[0] == pytest.approx(metrics["methods"]["cbd_ens"]["per_class"][0] * 100)
    assert ax2.get_yscale() == "log" and len(_bars(ax2)) == 10
    assert ax.get_xticklabels()[0].get_text() == "airplane (5000)"
    assert (tmp_path / "pc.png").stat().st_size > 0


def test_per_class_accuracy_many_classes_drops_ticks():
    counts = make_counts(40, 500, 5)
    splits = make_splits(counts)
    per_class = np.linspace(0.9, 0.1, 40)
    m = {"class_counts": counts, "splits": splits, "methods": {"ce": split_means(per_class, splits)}}
    fig = plots.per_class_accuracy(m)
    ax = fig.axes[0]
    assert len(ax.get_xticks()) == 0
    assert ax.get_xlabel() == "classes sorted by training images"


def test_gain_vs_class_size(metrics, tmp_path):
    best = max(["ce", "crt", "lws"], key=lambda b: metrics["methods"][b]["all"])
    assert best == "crt"
    fig = plots.gain_vs_class_size(metrics, path=tmp_path / "gain.png")
    ax = fig.axes[0]
    assert plots.method_label(best) in ax.get_title() and f"[{best}]" in ax.get_title()
    assert ax.get_xscale() == "log"
    assert any(np.allclose(line.get_ydata(), 0) for line in ax.get_lines())
    offsets = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(offsets) == 10
    expected = (np.array(metrics["methods"]["cbd_ens"]["per_class"])
                - np.array(metrics["methods"]["crt"]["per_class"])) * 100
    got = {x: y for x, y in offsets}
    for c, n in enumerate(metrics["class_counts"]):
        assert got[n] == pytest.approx(expected[c])
    # An explicit baseline list restricts the choice.
    fig2 = plots.gain_vs_class_size(metrics, baselines=["ce", "lws"])
    assert "LWS" in fig2.axes[0].get_title()
    assert (tmp_path / "gain.png").stat().st_size > 0


def test_gain_vs_class_size_missing_method(metrics):
    with pytest.raises(ValueError, match="cbd'? is not in metrics|'cbd' is not"):
        plots.gain_vs_class_size(metrics, method="cbd")


def test_confusion_matrix_plot(tmp_path):
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 20, size=(5, 5)) + np.diag([100] * 5)
    cm[4] = 0  # a class without test images stays a zero row
    fig = plots.confusion_matrix_plot(cm, class_names=NAMES[:5], path=tmp_path / "cm.png")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    values = [float(t.get_text()) for t in ax.texts]
    assert len(values) == 25
    assert sum(values[:5]) == pytest.approx(1.0, abs=0.03) and sum(values[20:]) == 0
    assert (tmp_path / "cm.png").stat().st_size > 0
    big = plots.confusion_matrix_plot(rng.integers(0, 5, size=(25, 25)), normalize=False, title="big")
    assert len(big.axes[0].texts) == 0 and big.axes[0].get_title() == "big"


def test_tsne_embed_small_inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8))
    emb = plots.tsne_embed(x, seed=0)
    assert emb.shape == (40, 2) and np.isfinite(emb).all()
    assert plots.tsne_embed(x[:7]).shape == (7, 2)  # perplexity clipped below n/3
    assert plots.tsne_embed(x, max_points=15).shape == (15, 2)
    assert len(plots.subsample_indices(40, 15, 0)) == 15


def test_tsne_plot_and_pair(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 8)
    emb = rng.normal(size=(40, 2))
    fig = plots.tsne_plot(emb, labels, tail_classes=[3, 4], class_names=NAMES[:5], title="t",
                          path=tmp_path / "tsne.png")
    ax = fig.axes[0]
    markers = {c.get_label(): c for c in ax.collections}
    assert markers["deer (tail)"].get_sizes()[0] > markers["airplane"].get_sizes()[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "x = tail class" in texts
    assert (tmp_path / "tsne.png").stat().st_size > 0
    # Draw into a given axes: the same figure comes back.
    f, axes = plt.subplots(1, 2)
    assert plots.tsne_plot(emb, labels, [4], ax=axes[1]) is f
    # Many classes: a colour bar instead of a class legend.
    many = plots.tsne_plot(rng.normal(size=(60, 2)), np.arange(60) % 30, tail_classes=range(20, 30))
    assert len(many.axes) == 2
    feats = rng.normal(size=(40, 6)) + labels[:, None]
    pair = plots.tsne_pair(feats, feats * 2, labels, [4], path=tmp_path / "pair.png")
    assert [a.get_title() for a in pair.axes] == ["teacher", "CBD-ENS student"]
    assert (tmp_path / "pair.png").stat().st_size > 0


def _history():
    hist = []
    for seed in (1, 2):
        for ep in range(4):
            hist.append({"model": "cbd_ens", "seed": seed, "epoch": ep, "loss": 2 - ep * 0.3, "ce": 1 - ep * 0.1,
                         "distill": 1 - ep * 0.2, "val_acc": 0.3 + ep * 0.1, "train_acc": 0.4, "lr": 0.1 / (ep + 1)})
    for ep in range(4):  # a baseline without distillation loss
        hist.append({"model": "ce", "seed": 1, "epoch": ep, "loss": 2 - ep * 0.2, "ce": 2 - ep * 0.2,
                     "distill": None, "val_acc": 0.3 + ep * 0.05, "lr": 0.1})
    return hist


def test_training_curves(tmp_path):
    fig = plots.training_curves(_history(), path=tmp_path / "curves.png")
    assert len(fig.axes) == 5  # loss, ce, distill, val_acc, lr
    distill_ax = [a for a in fig.axes if a.get_title() == "distillation loss"][0]
    assert len(distill_ax.get_lines()) == 2  # only the two cbd_ens seeds have it
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    assert labels == {"cbd_ens (seed 1)", "cbd_ens (seed 2)", "ce"}
    acc_ax = [a for a in fig.axes if a.get_title() == "validation accuracy"][0]
    assert max(acc_ax.get_lines()[0].get_ydata()) == pytest.approx(60)
    assert (tmp_path / "curves.png").stat().st_size > 0
    only = plots.training_curves([{"model": "ce", "seed": 0, "epoch": 0, "loss": 1.0}])
    assert len(only.axes) == 1
    empty = plots.training_curves([])
    assert len(empty.axes) == 1


def test_method_explorer(metrics):
    import ipywidgets

    box = plots.method_explorer(metrics, class_names=NAMES)
    assert isinstance(box, ipywidgets.VBox)
    selector = box.children[0].children[0]
    slider = box.children[0].children[1].children[0]
    out = box.children[1]
    assert isinstance(out, ipywidgets.Output)
    selector.value = ("ce", "crt")  # observe -> refresh
    assert list(box.last_table.index) == ["ce", "crt"]
    slider.value = (0, 4)
    box.refresh()
    assert len(box.last_table) == 2
    pc_ax = box.last_figure.axes[0]
    assert len(pc_ax.get_xticks()) == 5
    mimes = [set(o["data"]) for o in out.outputs]
    assert {"image/png"} <= mimes[0] and {"text/html"} <= mimes[1]
    assert "n/a" in out.outputs[1]["data"]["text/html"]


def _shown_width_px(fig) -> int:
    # What JupyterLab shows: the inline backend's PNG, 100 dpi, tight bounding box (legends included).
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return Image.open(buffer).size[0]


def test_figures_fit_a_notebook_with_many_classes_and_methods():
    # CIFAR-100-LT sized: 100 classes, every method of a full run; nothing may grow past MAX_WIDTH_IN.
    counts = make_counts(100, 500, 5)
    splits = make_splits(counts)
    rng = np.random.default_rng(1)
    names = ["ce", "ce_cb", "balanced_softmax", "crt", "lws", "tau_norm", "ncm", "teacher_vanilla_1",
             "teacher_vanilla_2", "teacher_aug_1", "teacher_aug_2", "teacher_ensemble", "cbd", "cbd_ens"]
    methods = {m: split_means(rng.random(100), splits) for m in names}
    metrics = {"class_counts": counts, "splits": splits, "seeds": [1, 2, 3], "methods": methods,
               "std": {m: {k: 0.01 for k in SPLIT_KEYS} for m in names}}
    labels = np.repeat(np.arange(100), 3)
    history = [{"model": m, "seed": s, "epoch": e, "loss": 1.0 / e, "train_acc": 0.5, "val_acc": 0.4, "lr": 0.1}
               for m in names[7:11] for s in (1, 2, 3) for e in (1, 2, 3)]
    figures = {
        "class_histogram": plots.class_histogram(counts, splits),
        "sample_grid": plots.sample_grid(rng.integers(0, 255, (300, 8, 8, 3), dtype=np.uint8), labels, counts,
                                         splits),
        "split_accuracy_bars": plots.split_accuracy_bars(metrics),
        "per_class_accuracy": plots.per_class_accuracy(metrics, ["ce", "ncm", "cbd", "cbd_ens"]),
        "confusion_matrix_plot": plots.confusion_matrix_plot(rng.random((100, 100))),
        "tsne_pair": plots.tsne_pair(rng.normal(size=(60, 4)), rng.normal(size=(60, 4)), labels[:60] % 12,
                                     [10, 11]),
        "training_curves": plots.training_curves(history, keys=("loss", "train_acc", "val_acc", "lr")),
    }
    limit = plots.MAX_WIDTH_IN * 100
    widths = {name: _shown_width_px(fig) for name, fig in figures.items()}
    too_wide = {name: px for name, px in widths.items() if px > limit}
    assert not too_wide, f"wider than {limit:.0f} px: {too_wide}"
