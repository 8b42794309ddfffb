"""Fig. 2 of the paper: a t-SNE map of test tile embeddings coloured by the core's IHC score.

A cohort can hold millions of tiles, so a seeded random subset of at most ``max_tiles`` is mapped
(every tile has the same chance, so large cores are not under-represented).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: One colour per IHC score (0 light to 3 dark, as staining goes).
SCORE_COLOURS = {"0": "#9ecae1", "1": "#fdae6b", "2": "#e6550d", "3": "#7f2704"}


def sample_tiles(
    embeddings: Mapping[str, np.ndarray], max_tiles: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_tiles`` rows drawn uniformly from all cores' tiles, and each row's core id."""
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be at least 1, got {max_tiles}")
    ids = [core for core, e in embeddings.items() for _ in range(len(e))]
    if not ids:
        return np.empty((0, 0)), np.array([], dtype=str)
    stacked = np.concatenate([np.asarray(e, dtype=np.float32) for e in embeddings.values()])
    rng = np.random.default_rng(seed)
    if len(ids) > max_tiles:
        rows = np.sort(rng.choice(len(ids), size=max_tiles, replace=False))
    else:
        rows = np.arange(len(ids))
    return stacked[rows], np.asarray(ids)[rows]


def tsne_coordinates(x: np.ndarray, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (scikit-learn, PCA initialisation) of the rows of ``x``; perplexity is lowered
    to fit a small sample (it must stay below the number of rows)."""
    from sklearn.manifold import TSNE

    n = len(x)
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 tiles, got {n}")
    perplexity = float(min(perplexity, (n - 1) / 3))
    model = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return model.fit_transform(np.asarray(x, dtype=np.float32))


def tsne_figure(coordinates: np.ndarray, labels: Sequence[str], title: str) -> Figure:
    """The t-SNE points coloured by label (the core's IHC score), one legend entry per score."""
    labels = np.asarray([str(v) for v in labels])
    fig = Figure(figsize=(5.6, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label in sorted(set(labels)):
        mask = labels == label
        ax.scatter(
            coordinates[mask, 0],
            coordinates[mask, 1],
            s=6,
            alpha=0.7,
            color=SCORE_COLOURS.get(label),
            label=f"score {label} ({mask.sum()} tiles)",
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, markerscale=2)
    return fig
