"""Report figures: confusion matrices, the paper's Table 2 cross-tabulation, stain-normalisation tiles.

Figures are built on ``matplotlib.figure.Figure`` directly (Agg canvas), never through pyplot, so
no global figure state leaks between nodes or tests and nothing needs a display.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _annotated_heatmap(
    table: pd.DataFrame, colour: np.ndarray, title: str, xlabel: str, ylabel: str, cbar_label: str
) -> Figure:
    """Heatmap coloured by ``colour`` with the table's counts written in each cell."""
    n_rows, n_cols = table.shape
    fig = Figure(figsize=(1.2 + 0.9 * n_cols, 1.2 + 0.8 * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(colour, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    counts = table.to_numpy()
    for i in range(n_rows):
        for j in range(n_cols):
            dark = colour[i, j] > 0.6
            ax.text(
                j,
                i,
                f"{int(counts[i, j])}",
                ha="center",
                va="center",
                color="white" if dark else "black",
                fontsize=10,
            )
    ax.set_xticks(range(n_cols), [str(c) for c in table.columns])
    ax.set_yticks(range(n_rows), [str(r) for r in table.index])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=cbar_label, shrink=0.8)
    return fig


def _row_normalised(table: pd.DataFrame) -> np.ndarray:
    counts = table.to_numpy(dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _column_normalised(table: pd.DataFrame) -> np.ndarray:
    counts = table.to_numpy(dtype=np.float64)
    totals = counts.sum(axis=0, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def confusion_figure(confusion: pd.DataFrame, title: str) -> Figure:
    """Confusion matrix (rows true, columns predicted): counts written, colour = row share."""
    return _annotated_heatmap(
        confusion,
        _row_normalised(confusion),
        title,
        xlabel="predicted",
        ylabel="true",
        cbar_label="fraction of true class",
    )


def crosstab_figure(crosstab: pd.DataFrame, title: str) -> Figure:
    """Table 2 figure (rows predicted status, columns true class): colour = share of the column."""
    return _annotated_heatmap(
        crosstab,
        _column_normalised(crosstab),
        title,
        xlabel="true class",
        ylabel="predicted HER2 status",
        cbar_label="fraction of true class",
    )


def preview_figure(
    before: list[np.ndarray], after: list[np.ndarray], title: str = "", max_tiles: int = 8
) -> Figure:
    """A two-row grid (before / after normalisation) of a few tiles, drawn with Agg, for review."""
    if len(before) != len(after):
        raise ValueError(f"before and after differ in length: {len(before)} vs {len(after)}")
    n = min(len(before), max_tiles)
    if n == 0:
        raise ValueError("no tiles to preview")
    fig = Figure(figsize=(2.2 * n, 4.8), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    for j in range(n):
        for i, (row, img) in enumerate((("before", before[j]), ("after", after[j]))):
            ax = axes[i, j]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(row)
    if title:
        fig.suptitle(title)
    return fig
