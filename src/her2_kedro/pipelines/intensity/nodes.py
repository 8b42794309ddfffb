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
from her2_kedro.schema import METRIC_NAMES

if TYPE_CHECKING:
    from her2_kedro.evaluation.study import Task

logger = logging.getLogger(__name__)


def _run_id() -> str:
    """The MLflow run this node runs in (kedro-mlflow opens one per ``kedro run``), else ''."""
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run is not None else ""


def _table_version(table: pd.DataFrame) -> str:
    if "manifest_version" not in table.columns or table.empty:
        return ""
    return str(table["manifest_version"].iloc[0])


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
    from her2_kedro.evaluation.metrics import mlflow_metric_names
    from her2_kedro.modelling.intensity_lr import IntensityModel
    from her2_kedro.reporting.plots import confusion_figure, crosstab_figure

    m = IntensityModelConfig.model_validate(model)
    t = _task(task)
    fitted = IntensityModel.from_json(model_json)
    provenance = {"run_id": _run_id(), "manifest_version": _table_version(table)}
    predictions, metrics, confusions = study.evaluate(
        fitted, table, m.features, t, m.name, provenance=provenance
    )
    tables = {f"confusion_{split}": frame for split, frame in confusions.items()}
    tables["model_selection"] = selection.set_index("C")
    figures = {
        f"confusion_{split}": confusion_figure(frame, f"{m.name} / {t.name} / {split}")
        for split, frame in confusions.items()
        if split in ("test", study.EXTERNAL_SPLIT)
    }
    if t.name == "her2_status":
        for split in ("test", study.EXTERNAL_SPLIT):
            if (predictions["split"] == split).any():
                crosstab = study.crosstab(predictions, split)
                tables[f"status_crosstab_{split}"] = crosstab
                figures[f"status_crosstab_{split}"] = crosstab_figure(
                    crosstab, f"{m.name}: true class x predicted HER2 status ({split})"
                )
    mlflow_metrics = {}
    for row in metrics.to_dict("records"):
        values = {k: row[k] for k in METRIC_NAMES}
        for name, value in mlflow_metric_names(m.name, t.name, row["split"], values).items():
            mlflow_metrics[name] = {"value": value, "step": 0}
    for row in metrics.itertuples(index=False):
        logger.info(
            "%s / %s / %s: balanced accuracy %.4f (n=%d)",
            m.name,
            t.name,
            row.split,
            row.balanced_accuracy,
            row.n,
        )
    return predictions, metrics, tables, figures, mlflow_metrics


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
    all_metrics = append_metrics(previous_metrics, metrics)
    if previous_predictions is not None and len(previous_predictions):
        keys = set(zip(predictions["model"], predictions["task"], strict=True))
        stale = [
            (m, t) in keys
            for m, t in zip(
                previous_predictions["model"], previous_predictions["task"], strict=True
            )
        ]
        previous_predictions = previous_predictions[
            ~pd.Series(stale, index=previous_predictions.index)
        ]
        predictions = pd.concat([previous_predictions, predictions], ignore_index=True)
    return all_metrics, predictions
