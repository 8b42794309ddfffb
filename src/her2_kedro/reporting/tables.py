"""The paper's tables for every model of a run: Table 1 with patient-bootstrap intervals and the
published figures beside ours, Table 2 for every status model, and a per-class error summary.

All of them are computed from ``predictions.parquet`` (one row per model, task and core), so a
table can never disagree with the predictions it summarises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from her2_kedro.evaluation.bootstrap import patient_bootstrap, truncate
from her2_kedro.evaluation.metrics import classification_metrics, status_crosstab
from her2_kedro.schema import FIVE_CLASSES

#: The classes of each task, in the order of the ``p_<class>`` columns of the predictions.
TASK_CLASSES = {"ihc_score": (0, 1, 2, 3), "her2_status": (0, 1)}

TABLE1_COLUMNS = [
    "model",
    "task",
    "split",
    "n",
    "n_patients",
    "balanced_accuracy",
    "ci_low",
    "ci_high",
    "balanced_accuracy_truncated",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "auroc",
    "paper_model",
    "paper_balanced_accuracy",
]


def with_patients(predictions: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """The predictions with each core's ``patient_id`` (a core missing from the manifest is its
    own patient, so it still counts once)."""
    patients = manifest.drop_duplicates("core_id").set_index("core_id")["patient_id"]
    out = predictions.copy()
    out["patient_id"] = out["core_id"].map(patients)
    missing = out["patient_id"].isna()
    out.loc[missing, "patient_id"] = out.loc[missing, "core_id"]
    out["patient_id"] = out["patient_id"].astype(str)
    return out


def _probabilities(part: pd.DataFrame, classes: Sequence[int]) -> np.ndarray | None:
    columns = [f"p_{c}" for c in classes]
    if not set(columns) <= set(part.columns):
        return None
    values = part[columns].to_numpy(dtype=float)
    return values if np.isfinite(values).all() else None


def paper_figure(
    paper: Mapping[str, Mapping[str, Mapping[str, float]]],
    paper_models: Mapping[str, str],
    model: str,
    task: str,
    split: str,
) -> tuple[str, float]:
    """The paper's name for ``model`` and its published balanced accuracy (NaN when unpublished)."""
    name = paper_models.get(model, "")
    value = paper.get(name, {}).get(task, {}).get(split, float("nan")) if name else float("nan")
    return name, float(value)


def table1(
    predictions: pd.DataFrame,
    splits: Sequence[str] = ("test", "external"),
    paper: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    paper_models: Mapping[str, str] | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Every model x task x split: our metrics, a patient-bootstrap interval of balanced
    accuracy, the value truncated to 4 decimals as the paper printed, and the paper's figure.

    ``predictions`` needs ``patient_id`` (see :func:`with_patients`). Balanced accuracy is over
    the classes present in the split, as in the paper (its test set had no score-1 core).
    """
    if "patient_id" not in predictions.columns:
        raise KeyError("predictions need a patient_id column: join them with with_patients()")
    rows = []
    for (model, task, split), part in predictions.groupby(["model", "task", "split"], sort=True):
        if split not in splits or task not in TASK_CLASSES:
            continue
        classes = TASK_CLASSES[task]
        y_true = part["y_true"].to_numpy(dtype=int)
        y_pred = part["y_pred"].to_numpy(dtype=int)
        metrics = classification_metrics(y_true, y_pred, _probabilities(part, classes), classes)
        interval = patient_bootstrap(
            y_true, y_pred, part["patient_id"], n_resamples=n_resamples, level=level, seed=seed
        )
        paper_name, paper_value = paper_figure(
            paper or {}, paper_models or {}, str(model), str(task), str(split)
        )
        rows.append(
            {
                "model": model,
                "task": task,
                "split": split,
                "n": len(part),
                "n_patients": interval.n_groups,
                "balanced_accuracy": metrics["balanced_accuracy"],
                "ci_low": interval.low,
                "ci_high": interval.high,
                "balanced_accuracy_truncated": truncate(metrics["balanced_accuracy"]),
                "precision_weighted": metrics["precision_weighted"],
                "recall_weighted": metrics["recall_weighted"],
                "f1_weighted": metrics["f1_weighted"],
                "auroc": metrics["auroc"],
                "paper_model": paper_name,
                "paper_balanced_accuracy": paper_value,
            }
        )
    table = pd.DataFrame(rows, columns=TABLE1_COLUMNS)
    order = {s: i for i, s in enumerate(splits)}
    return (
        table.assign(_split=table["split"].map(order))
        .sort_values(["task", "_split", "model"], kind="stable")
        .drop(columns="_split")
        .reset_index(drop=True)
    )


def status_crosstabs(
    predictions: pd.DataFrame, splits: Sequence[str] = ("test", "external")
) -> pd.DataFrame:
    """Table 2 of every HER2-status model on each split, stacked: ``model, split,
    predicted_status`` by true class 0, 1, 2-, 2+, 3 (counts)."""
    status = predictions[predictions["task"] == "her2_status"]
    frames = []
    for (model, split), part in status.groupby(["model", "split"], sort=True):
        if split not in splits:
            continue
        table = status_crosstab(part["five_class"].astype(str).tolist(), part["y_pred"].tolist())
        frames.append(table.reset_index().assign(model=model, split=split))
    columns = ["model", "split", "predicted_status", *FIVE_CLASSES]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def class_errors(predictions: pd.DataFrame, splits: Sequence[str] = ("test",)) -> pd.DataFrame:
    """Per model, task, split and true class (2- and 2+ apart): how many cores, how many right,
    and the most frequent wrong call, so a reader sees where each model fails."""
    rows = []
    part = predictions[predictions["split"].isin(list(splits))]
    for (model, task, split, true_class), group in part.groupby(
        ["model", "task", "split", "five_class"], sort=True
    ):
        correct = group["y_true"] == group["y_pred"]
        wrong = group.loc[~correct, "y_pred"].value_counts()
        rows.append(
            {
                "model": model,
                "task": task,
                "split": split,
                "true_class": str(true_class),
                "n": len(group),
                "correct": int(correct.sum()),
                "accuracy": float(correct.mean()),
                "most_common_error": str(wrong.index[0]) if len(wrong) else "",
                "n_most_common_error": int(wrong.iloc[0]) if len(wrong) else 0,
            }
        )
    columns = [
        "model",
        "task",
        "split",
        "true_class",
        "n",
        "correct",
        "accuracy",
        "most_common_error",
        "n_most_common_error",
    ]
    out = pd.DataFrame(rows, columns=columns)
    rank = {c: i for i, c in enumerate(FIVE_CLASSES)}
    return (
        out.assign(_rank=out["true_class"].map(rank))
        .sort_values(["model", "task", "split", "_rank"], kind="stable")
        .drop(columns="_rank")
        .reset_index(drop=True)
    )
