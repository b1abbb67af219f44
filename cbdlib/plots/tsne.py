"""t-SNE maps of test features (a teacher's and the CBD-ENS student's, side by side)."""
from __future__ import annotations

import matplotlib
import numpy as np

from .style import MAX_WIDTH_IN, PlotInputError, class_labels, pyplot, save_figure, style


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
    names = class_labels(num, class_names)
    plt = pyplot()
    with style():
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
    with style():
        fig, axes = pyplot().subplots(1, 2, figsize=(MAX_WIDTH_IN - 1.2, 4.4))
    for i, (feats, ttl) in enumerate(zip((features_a, features_b), titles)):
        emb = tsne_embed(np.asarray(feats)[keep], seed=seed)
        # One legend (right panel) is enough: both panels share colours.
        tsne_plot(emb, labels[keep], tail_classes, class_names=class_names, title=ttl, ax=axes[i],
                  legend=i == 1)
    fig.tight_layout()
    save_figure(fig, path)
    return fig
