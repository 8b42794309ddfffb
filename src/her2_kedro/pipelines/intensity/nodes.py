"""Thin nodes of the intensity study (one modular pipeline, namespaced per model and task).

The library (scikit-learn, matplotlib) is imported inside the nodes: every ``kedro run`` imports
this module to build the pipeline registry, and a run of ingestion or preprocessing alone should
not pay ~2 s of start-up for libraries it never calls.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pandas as pd

from her2_kedro.config import CohortsConfig, IntensityModelConfig, TaskConfig
from her2_kedro.hooks import manifest_version
from her2_kedro.pipelines.common import (
    final_metrics,
    model_reports,
    replace_model_rows,
    run_id,
    table_version,
)

if TYPE_CHECKING:
    from her2_kedro.evaluation.study import Task

logger = logging.getLogger(__name__)


def _task(task: dict[str, Any]) -> Task:
    from her2_kedro.evaluation.study import TASKS

    return TASKS[TaskConfig.model_validate(task).name]


def build_task_table(
    core_manifest: pd.DataFrame,
    features: pd.DataFrame,
    task: dict[str, Any],
    model: dict[str, Any],
    cohorts: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cores with labels, split and this model's features; cores without features reported."""
    from her2_kedro.evaluation import study

    m = IntensityModelConfig.model_validate(model)
    evaluation_only = CohortsConfig.model_validate(cohorts).evaluation_only
    table, problems = study.task_frame(
        core_manifest, features, _task(task), m.features, evaluation_only
    )
    table["manifest_version"] = manifest_version(core_manifest)
    return table, pd.DataFrame(
        [(p.source, p.core_id, p.reason) for p in problems], columns=["source", "core_id", "reason"]
    )


def fit_model(
    table: pd.DataFrame, task: dict[str, Any], model: dict[str, Any], seed: int
) -> tuple[str, pd.DataFrame]:
    """Balanced logistic regression fitted on train, C chosen on validation; the model as JSON."""
    from her2_kedro.evaluation import study

    m = IntensityModelConfig.model_validate(model)
    fitted, selection = study.select_and_fit(
        table, m.features, _task(task), m.c_grid, m.standardize, seed
    )
    chosen = selection.loc[selection["chosen"], "C"].iloc[0]
    logger.info("%s / %s: C=%s chosen on validation", m.name, _task(task).name, chosen)
    return fitted.to_json(), selection


def evaluate_model(
    model_json: str,
    table: pd.DataFrame,
    selection: pd.DataFrame,
    task: dict[str, Any],
    model: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame], dict[str, Any], dict]:
    """Predictions, metric rows per split, report tables and figures, and the MLflow metrics."""
    from her2_kedro.evaluation import study
    from her2_kedro.modelling.intensity_lr import IntensityModel

    m = IntensityModelConfig.model_validate(model)
    t = _task(task)
    fitted = IntensityModel.from_json(model_json)
    provenance = {"run_id": run_id(), "manifest_version": table_version(table)}
    predictions, metrics, confusions = study.evaluate(
        fitted, table, m.features, t, m.name, provenance=provenance
    )
    tables, figures = model_reports(predictions, confusions, m.name, t.name)
    tables["model_selection"] = selection.set_index("C")
    return predictions, metrics, tables, figures, final_metrics(metrics, logger)


def collect_reports(
    previous_metrics: pd.DataFrame | None,
    previous_predictions: pd.DataFrame | None,
    *frames: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """metrics.csv and predictions.parquet: this run's rows replace the same model/task, others stay."""
    from her2_kedro.evaluation.metrics import append_metrics

    half = len(frames) // 2
    metrics = pd.concat(frames[:half], ignore_index=True)
    predictions = pd.concat(frames[half:], ignore_index=True)
    return append_metrics(previous_metrics, metrics), replace_model_rows(
        previous_predictions, predictions
    )
