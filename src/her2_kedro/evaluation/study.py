"""A study of one model on one task: the data it sees, selection on validation, evaluation.

Shared by every model. Labels come from the core manifest (from the label tables); splits are the
manifest's patient-level splits; cores of evaluation-only cohorts (the external centre) never train
or select anything and are reported as their own split. Hyper-parameters are chosen on the
validation split; test metrics are computed once, after the choice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from her2_kedro.evaluation.metrics import (
    classification_metrics,
    confusion_frame,
    metrics_row,
    status_crosstab,
)
from her2_kedro.modelling.intensity_lr import IntensityModel, fit_intensity_lr
from her2_kedro.schema import PROVENANCE_COLUMNS, QCProblem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """A prediction target: the manifest column and its classes (IHC score 0-3, or HER2 status 0/1)."""

    name: str
    target: str
    classes: tuple[int, ...]


TASKS = {
    "ihc_score": Task("ihc_score", "ihc_score", (0, 1, 2, 3)),
    "her2_status": Task("her2_status", "her2_status", (0, 1)),
}

EXTERNAL_SPLIT = "external"


def task_frame(
    manifest: pd.DataFrame,
    features: pd.DataFrame,
    task: Task,
    feature_names: Sequence[str],
    evaluation_only_cohorts: Iterable[str] = (),
) -> tuple[pd.DataFrame, list[QCProblem]]:
    """Rows ``core_id, split, five_class, y`` plus the features; cores without features are reported."""
    missing = [f for f in feature_names if f not in features.columns]
    if missing:
        raise KeyError(
            f"features {missing} not in the feature table (columns: {list(features.columns)})"
        )
    table = manifest[["core_id", "split", "cohort", "five_class", task.target]].merge(
        features[["core_id", *feature_names]], on="core_id", how="left"
    )
    table = table.rename(columns={task.target: "y"})
    external = table["cohort"].isin(set(evaluation_only_cohorts))
    table.loc[external, "split"] = EXTERNAL_SPLIT
    undefined = ~np.isfinite(table[list(feature_names)].to_numpy(dtype=float)).all(axis=1)
    problems = [
        QCProblem("features", core_id, "no feature value (no tissue tile): left out of the study")
        for core_id in table.loc[undefined, "core_id"]
    ]
    return table[~undefined].reset_index(drop=True), problems


def _xy(table: pd.DataFrame, split: str, feature_names: Sequence[str]):
    part = table[table["split"] == split]
    return part[["core_id", *feature_names]].set_index("core_id"), part["y"].to_numpy(dtype=int)


def select_and_fit(
    table: pd.DataFrame,
    feature_names: Sequence[str],
    task: Task,
    c_grid: Sequence[float],
    standardize: bool,
    seed: int,
) -> tuple[IntensityModel, pd.DataFrame]:
    """Fit on train for each C, keep the best validation balanced accuracy (ties → smaller C).

    Without validation cores there is nothing to select on: the grid value nearest C=1 is used.
    """
    X_train, y_train = _xy(table, "train", feature_names)
    if len(np.unique(y_train)) < 2:
        raise ValueError(
            f"{task.name}: the train split has {len(y_train)} cores and classes "
            f"{sorted(set(y_train))}; at least two classes are needed to fit a model"
        )
    X_val, y_val = _xy(table, "val", feature_names)

    def fit(c: float) -> IntensityModel:
        return fit_intensity_lr(X_train, y_train, seed=seed, standardize=standardize, C=c)

    if not len(y_val):
        # nothing to select on: the grid value closest to sklearn's default C=1
        c = min(c_grid, key=lambda v: abs(np.log10(v)))
        logger.warning("%s: no validation cores; C=%s used without selection", task.name, c)
        selection = pd.DataFrame({"C": sorted(c_grid), "val_balanced_accuracy": np.nan}).assign(
            chosen=lambda d: d["C"] == c
        )
        return fit(c), selection
    rows = []
    best: tuple[float, float, IntensityModel] | None = None
    for c in sorted(c_grid):
        model = fit(c)
        proba, predicted = class_probabilities(model, X_val, task)
        score = classification_metrics(y_val, predicted, proba, task.classes)["balanced_accuracy"]
        rows.append({"C": c, "val_balanced_accuracy": score})
        if best is None or (np.isfinite(score) and (not np.isfinite(best[0]) or score > best[0])):
            best = (score, c, model)
    selection = pd.DataFrame(rows).assign(chosen=lambda d: d["C"] == best[1])
    return best[2], selection


def class_probabilities(
    model: IntensityModel, X: pd.DataFrame, task: Task
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities over the task's full class list, and the predicted class of each row.

    The one place where a model's columns (the classes it saw in train) are padded to
    ``task.classes``: a class never seen in train gets probability 0, so selection and evaluation
    both score (n, len(task.classes)) arrays even when train lacks a class.
    """
    proba = model.predict_proba(X)
    seen = [int(c) for c in model.classes]
    unknown = sorted(set(seen) - set(task.classes))
    if unknown:
        raise ValueError(
            f"{task.name}: the model predicts classes {unknown} outside {task.classes}"
        )
    full = np.zeros((len(X), len(task.classes)))
    for j, c in enumerate(task.classes):
        if c in seen:
            full[:, j] = proba[:, seen.index(c)]
    return full, np.asarray(task.classes)[full.argmax(axis=1)]


def evaluate(
    model: IntensityModel,
    table: pd.DataFrame,
    feature_names: Sequence[str],
    task: Task,
    model_name: str,
    splits: Sequence[str] = ("train", "val", "test", EXTERNAL_SPLIT),
    provenance: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame]]:
    """Predictions for every core, metric rows per split, and confusion tables per split."""
    proba, _ = class_probabilities(
        model, table[["core_id", *feature_names]].set_index("core_id"), task
    )
    return evaluate_probabilities(table, proba, task, model_name, splits, provenance)


def evaluate_probabilities(
    table: pd.DataFrame,
    proba: np.ndarray,
    task: Task,
    model_name: str,
    splits: Sequence[str] = ("train", "val", "test", EXTERNAL_SPLIT),
    provenance: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame]]:
    """Predictions, metric rows per split and confusion tables from any model's probabilities.

    ``proba`` is ``(len(table), len(task.classes))`` in the table's row order; the predicted class
    is its argmax. ``provenance`` (``run_id``, ``manifest_version``) is written into every
    predictions and metrics row, so rows of different runs can be told apart once merged.
    """
    proba = np.asarray(proba, dtype=float)
    if proba.shape != (len(table), len(task.classes)):
        raise ValueError(
            f"{model_name} / {task.name}: probabilities of shape {proba.shape}, expected "
            f"{(len(table), len(task.classes))}"
        )
    predicted = np.asarray(task.classes)[proba.argmax(axis=1)] if len(table) else np.array([])
    predictions = pd.DataFrame(
        {
            "model": model_name,
            "task": task.name,
            "core_id": table["core_id"].to_numpy(),
            "split": table["split"].to_numpy(),
            "five_class": table["five_class"].to_numpy(),
            "y_true": table["y"].astype(int).to_numpy(),
            "y_pred": predicted.astype(int),
        }
    )
    for j, c in enumerate(task.classes):
        predictions[f"p_{c}"] = proba[:, j]
    for name in PROVENANCE_COLUMNS:
        predictions[name] = str((provenance or {}).get(name) or "")
    rows, confusions = [], {}
    for split in splits:
        mask = (table["split"] == split).to_numpy()
        if not mask.any():
            continue
        y_true = table.loc[mask, "y"].to_numpy(dtype=int)
        metrics = classification_metrics(y_true, predicted[mask], proba[mask], task.classes)
        rows.append(metrics_row(model_name, task.name, split, metrics, provenance))
        confusions[split] = confusion_frame(y_true, predicted[mask], task.classes)
    return predictions, pd.DataFrame(rows), confusions


def crosstab(predictions: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """The paper's Table 2 for a HER2-status model: true class (2- and 2+ apart) x predicted status."""
    part = predictions[predictions["split"] == split]
    return status_crosstab(part["five_class"].tolist(), part["y_pred"].tolist())
