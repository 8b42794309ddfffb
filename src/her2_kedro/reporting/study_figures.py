"""Figures that compare the models of a run: ROC curves (with AUROC) and the confusion matrices of
Fig. 1 side by side. Drawn on ``Figure`` objects with the Agg canvas, never through pyplot."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from her2_kedro.evaluation.metrics import confusion_frame
from her2_kedro.reporting.tables import TASK_CLASSES

#: False-positive rates on which one-vs-rest curves of the score task are averaged.
_FPR_GRID = np.linspace(0.0, 1.0, 201)


def roc_points(part: pd.DataFrame, task: str) -> tuple[np.ndarray, np.ndarray] | None:
    """One model's ROC curve on one split: the positive class for status, the macro average of the
    one-vs-rest curves of the classes present for the score. None where undefined (one class)."""
    classes = TASK_CLASSES[task]
    y_true = part["y_true"].to_numpy(dtype=int)
    present = [c for c in classes if np.any(y_true == c)]
    if len(present) < 2:
        return None
    columns = [f"p_{c}" for c in (classes[1:] if task == "her2_status" else present)]
    if not set(columns) <= set(part.columns) or not np.isfinite(part[columns].to_numpy()).all():
        return None
    if task == "her2_status":
        fpr, tpr, _ = roc_curve(y_true == 1, part["p_1"].to_numpy(dtype=float))
        return fpr, tpr
    curves = []
    for c in present:
        fpr, tpr, _ = roc_curve(y_true == c, part[f"p_{c}"].to_numpy(dtype=float))
        curves.append(np.interp(_FPR_GRID, fpr, tpr))
    tpr = np.mean(curves, axis=0)
    tpr[0] = 0.0
    return _FPR_GRID, tpr


def roc_figure(predictions: pd.DataFrame, task: str, split: str) -> Figure | None:
    """Every model's ROC curve for ``task`` on ``split`` in one plot, AUROC in the legend."""
    part = predictions[(predictions["task"] == task) & (predictions["split"] == split)]
    fig = Figure(figsize=(5.2, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for model, rows in part.groupby("model", sort=True):
        points = roc_points(rows, task)
        if points is None:
            continue
        fpr, tpr = points
        ax.plot(fpr, tpr, label=f"{model} (AUROC {auc(fpr, tpr):.3f})", linewidth=1.5)
        drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    kind = "HER2 positive" if task == "her2_status" else "one-vs-rest, macro over classes"
    ax.set_title(f"{task} / {split} ({kind})", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def confusion_grid(
    predictions: pd.DataFrame,
    split: str,
    task: str,
    models: Sequence[str] | None = None,
    columns: int = 4,
) -> Figure | None:
    """Fig. 1 for many models: one confusion matrix per model for ``task`` on ``split``, up to
    ``columns`` a row; counts written, colour the share of the true class."""
    part = predictions[(predictions["split"] == split) & (predictions["task"] == task)]
    present = set(part["model"])
    names = [m for m in (models or sorted(present)) if m in present]
    if not names:
        return None
    n_cols = min(columns, len(names))
    n_rows = -(-len(names) // n_cols)
    size = 0.55 * len(TASK_CLASSES[task]) + 1.0
    fig = Figure(figsize=(size * n_cols, size * n_rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    labels = [str(c) for c in TASK_CLASSES[task]]
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.axis("off")
            continue
        rows = part[part["model"] == names[k]]
        table = confusion_frame(rows["y_true"], rows["y_pred"], TASK_CLASSES[task])
        counts = table.to_numpy(dtype=float)
        totals = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (r, c), value in np.ndenumerate(counts):
            colour = "white" if share[r, c] > 0.6 else "black"
            ax.text(c, r, str(int(value)), ha="center", va="center", color=colour, fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(names[k], fontsize=9)
        if k % n_cols == 0:
            ax.set_ylabel("true", fontsize=8)
        if k >= len(names) - n_cols:
            ax.set_xlabel("predicted", fontsize=8)
    fig.suptitle(f"Confusion matrices: {task}, {split}", fontsize=10)
    return fig
