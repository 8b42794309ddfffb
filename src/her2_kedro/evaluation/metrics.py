"""Evaluation shared by every model: balanced / weighted metrics, AUROC, confusion and Table 2.

The paper reports balanced accuracy and sample-weighted precision, recall and F1 because the
classes are heavily imbalanced (score 0 is ~85 % of cores); every model in the project goes
through ``classification_metrics`` so their rows in ``metrics.csv`` are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from her2_kedro.schema import (
    FIVE_CLASSES,
    METRIC_COLUMNS,
    METRIC_KEY_COLUMNS,
    METRIC_NAMES,
    PROVENANCE_COLUMNS,
)

#: Table 2's names of the HER2 status.
STATUS_NAMES = {0: "Negative", 1: "Positive"}


def _auroc(y_true: np.ndarray, y_score: np.ndarray | None, labels: Sequence) -> float:
    """ROC AUC: positive-class score if binary, else one-vs-rest macro over present classes."""
    if y_score is None or len(y_true) == 0:
        return float("nan")
    score = np.asarray(y_score, dtype=np.float64)
    labels = list(labels)
    present = [c for c in labels if np.any(y_true == c)]
    if len(present) < 2:
        return float("nan")
    if len(labels) == 2:
        positive = score[:, 1] if score.ndim == 2 else score
        return float(roc_auc_score(y_true == labels[1], positive))
    if score.ndim != 2 or score.shape[1] != len(labels):
        raise ValueError(
            f"y_score must have one column per label ({len(labels)}), got {score.shape}"
        )
    aucs = [roc_auc_score(y_true == c, score[:, labels.index(c)]) for c in present]
    return float(np.mean(aucs))


def classification_metrics(
    y_true: Sequence | np.ndarray,
    y_pred: Sequence | np.ndarray,
    y_score: np.ndarray | None,
    labels: Sequence,
) -> dict[str, float]:
    """Balanced accuracy, weighted precision / recall / F1 and AUROC; NaN where undefined.

    ``y_score`` is (n, len(labels)) class probabilities ordered like ``labels`` (for a binary task
    a 1-D positive-class score is accepted too). Multiclass AUROC is the one-vs-rest macro average
    over the classes present in ``y_true`` (a test set may lack a class, e.g. score 1 in the
    paper's). Never raises on a degenerate split: one class only gives NaN AUROC.
    """
    yt = np.asarray(y_true)
    yp = np.asarray(y_pred)
    if yt.shape != yp.shape:
        raise ValueError(f"y_true {yt.shape} and y_pred {yp.shape} differ in shape")
    n = len(yt)
    if n == 0:
        return {"n": 0.0, **{k: float("nan") for k in METRIC_NAMES[1:]}}
    labels = list(labels)
    present = [c for c in labels if np.any(yt == c)]
    # Balanced accuracy = mean recall over the classes present in y_true (sklearn's definition).
    if present:
        recalls = [np.mean(yp[yt == c] == c) for c in present]
        bal_acc = float(np.mean(recalls))
    else:
        bal_acc = float(balanced_accuracy_score(yt, yp))
    precision, recall, f1, _ = precision_recall_fscore_support(
        yt, yp, labels=labels, average="weighted", zero_division=0
    )
    return {
        "n": float(n),
        "balanced_accuracy": bal_acc,
        "precision_weighted": float(precision),
        "recall_weighted": float(recall),
        "f1_weighted": float(f1),
        "auroc": _auroc(yt, y_score, labels),
    }


def confusion_frame(
    y_true: Sequence | np.ndarray, y_pred: Sequence | np.ndarray, labels: Sequence
) -> pd.DataFrame:
    """Confusion counts: rows the true label, columns the predicted label, every label present."""
    labels = list(labels)
    counts = confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=labels)
    frame = pd.DataFrame(
        counts, index=pd.Index(labels, name="true"), columns=pd.Index(labels, name="predicted")
    )
    return frame


def status_crosstab(
    five_class_true: Sequence[str], predicted_status: Sequence[int]
) -> pd.DataFrame:
    """The paper's Table 2: predicted HER2 status (rows) by true class 0, 1, 2-, 2+, 3 (columns)."""
    true = [str(c) for c in five_class_true]
    pred = [int(p) for p in predicted_status]
    if len(true) != len(pred):
        raise ValueError(f"{len(true)} true classes but {len(pred)} predictions")
    unknown = sorted(set(true) - set(FIVE_CLASSES))
    if unknown:
        raise ValueError(f"unknown classes {unknown}; expected {FIVE_CLASSES}")
    bad = sorted(set(pred) - set(STATUS_NAMES))
    if bad:
        raise ValueError(f"predicted status must be 0 or 1, got {bad}")
    table = pd.DataFrame(
        0,
        index=pd.Index(list(STATUS_NAMES.values()), name="predicted_status"),
        columns=pd.Index(FIVE_CLASSES, name="true_class"),
        dtype=np.int64,
    )
    for t, p in zip(true, pred, strict=True):
        table.loc[STATUS_NAMES[p], t] += 1
    return table


def metrics_row(
    model: str,
    task: str,
    split: str,
    metrics: Mapping[str, float],
    provenance: Mapping[str, str] | None = None,
) -> dict:
    """One ``metrics.csv`` row: key columns, every metric (missing ones NaN), run id and manifest version."""
    row: dict = {"model": model, "task": task, "split": split}
    for name in METRIC_NAMES:
        value = metrics.get(name, float("nan"))
        row[name] = int(value) if name == "n" and not _is_nan(value) else float(value)
    for name in PROVENANCE_COLUMNS:
        row[name] = str((provenance or {}).get(name) or "")
    return row


def _is_nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def append_metrics(existing: pd.DataFrame | None, rows: pd.DataFrame) -> pd.DataFrame:
    """Merge new metric rows into ``metrics.csv``: same (model, task, split) replaced, others kept."""
    rows = rows.reindex(columns=METRIC_COLUMNS)
    if existing is None or existing.empty:
        out = rows
    else:
        existing = existing.reindex(columns=METRIC_COLUMNS)
        new_keys = set(map(tuple, rows[METRIC_KEY_COLUMNS].astype(str).to_numpy()))
        keep = [
            tuple(k) not in new_keys for k in existing[METRIC_KEY_COLUMNS].astype(str).to_numpy()
        ]
        out = pd.concat([existing[keep], rows], ignore_index=True)
    out = out.drop_duplicates(subset=METRIC_KEY_COLUMNS, keep="last")
    return out.sort_values(METRIC_KEY_COLUMNS, kind="stable").reset_index(drop=True)


def mlflow_metric_names(
    model: str, task: str, split: str, metrics: Mapping[str, float]
) -> dict[str, float]:
    """MLflow metric dict named ``<model>.<task>.<split>.<metric>``; NaN values are left out.

    MLflow 3 itself accepts NaN (its SQL store keeps value 0 with an ``is_nan`` flag), but a
    missing metric reads unambiguously as "undefined" in the UI and in run comparisons.
    """
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if value is None:
            continue
        value = float(value)
        if math.isnan(value):
            continue
        out[f"{model}.{task}.{split}.{name}"] = value
    return out
