"""Small helpers every pipeline's nodes share: MLflow run id, provenance, live epoch curves."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

#: Per-epoch values logged as MLflow metric history (step = epoch).
EPOCH_METRICS = ("train_loss", "val_loss", "val_balanced_accuracy", "lr")


def run_id() -> str:
    """The MLflow run this node runs in (kedro-mlflow opens one per ``kedro run``), else ''."""
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run is not None else ""


def table_version(table: pd.DataFrame) -> str:
    """The manifest version a task table carries ('' when unknown)."""
    if "manifest_version" not in table.columns or table.empty:
        return ""
    return str(table["manifest_version"].iloc[0])


def epoch_logger(
    prefix: str, *, run_id: str | None = None, tracking_uri: str | None = None
) -> Callable[[int, Mapping[str, float]], None]:
    """A training callback that logs each epoch's loss, validation metrics and learning rate as
    ``<prefix>.<metric>`` with ``step=epoch`` (curves in the UI): to the active MLflow run, or,
    given ``run_id``, to that run by id without starting or ending it (a torchrun process logging
    into the run its training node holds open)."""

    def log(epoch: int, metrics: Mapping[str, Any]) -> None:
        import mlflow

        values = {f"{prefix}.{k}": float(metrics[k]) for k in EPOCH_METRICS if k in metrics}
        logger.info(
            "%s epoch %d: %s",
            prefix,
            epoch,
            ", ".join(f"{k.rsplit('.', 1)[-1]} {v:.4f}" for k, v in values.items()),
        )
        if run_id:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            stamp = int(time.time() * 1000)
            MlflowClient(tracking_uri=tracking_uri).log_batch(
                run_id, metrics=[Metric(k, v, stamp, int(epoch)) for k, v in values.items()]
            )
        elif mlflow.active_run() is not None:
            mlflow.log_metrics(values, step=int(epoch))

    return log


def model_reports(
    predictions: pd.DataFrame,
    confusions: Mapping[str, pd.DataFrame],
    model: str,
    task: str,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Report tables (confusion per split; Table 2 cross-tab of a status model) and the figures of
    the test and external splits, the same for every model."""
    from her2_kedro.evaluation import study
    from her2_kedro.reporting.plots import confusion_figure, crosstab_figure

    tables = {f"confusion_{split}": frame for split, frame in confusions.items()}
    figures = {
        f"confusion_{split}": confusion_figure(frame, f"{model} / {task} / {split}")
        for split, frame in confusions.items()
        if split in ("test", study.EXTERNAL_SPLIT)
    }
    if task == "her2_status":
        for split in ("test", study.EXTERNAL_SPLIT):
            if (predictions["split"] == split).any():
                crosstab = study.crosstab(predictions, split)
                tables[f"status_crosstab_{split}"] = crosstab
                figures[f"status_crosstab_{split}"] = crosstab_figure(
                    crosstab, f"{model}: true class x predicted HER2 status ({split})"
                )
    return tables, figures


def final_metrics(metrics: pd.DataFrame, log: logging.Logger | None = None) -> dict[str, Any]:
    """The metric rows as kedro-mlflow metrics ``<model>.<task>.<split>.<metric>`` (step 0),
    each split's balanced accuracy logged as it goes."""
    from her2_kedro.evaluation.metrics import mlflow_metric_names
    from her2_kedro.schema import METRIC_NAMES

    out: dict[str, Any] = {}
    for row in metrics.to_dict("records"):
        values = {k: row[k] for k in METRIC_NAMES}
        for name, value in mlflow_metric_names(
            row["model"], row["task"], row["split"], values
        ).items():
            out[name] = {"value": value, "step": 0}
        (log or logger).info(
            "%s / %s / %s: balanced accuracy %.4f (n=%d)",
            row["model"],
            row["task"],
            row["split"],
            row["balanced_accuracy"],
            row["n"],
        )
    return out


def replace_model_rows(previous: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """``new`` plus the rows of ``previous`` whose (model, task) ``new`` does not hold."""
    if previous is None or previous.empty:
        return new.reset_index(drop=True)
    keys = set(zip(new["model"], new["task"], strict=True))
    stale = pd.Series(
        [(m, t) in keys for m, t in zip(previous["model"], previous["task"], strict=True)],
        index=previous.index,
    )
    return pd.concat([previous[~stale], new], ignore_index=True)


def image_inputs(
    accepted_cores: Any,
    reference_stains: Mapping[str, Any] | None,
    tiles: Mapping[str, Any],
    cohorts: Mapping[str, Any],
) -> Any:
    """``ModelInputs`` of models that read core images: the cores, the tile rule, and the Macenko
    normalisation preprocessing applied to ``cohorts.stain_normalised``."""
    from her2_kedro.config import CohortsConfig, TileConfig
    from her2_kedro.imaging.normalisation import cohort_normaliser
    from her2_kedro.modelling.torch_study import ModelInputs

    rule = TileConfig.model_validate(tiles)
    normalised = CohortsConfig.model_validate(cohorts).stain_normalised
    transform = cohort_normaliser(reference_stains, normalised, rule.background_grey)
    return ModelInputs(cores=accepted_cores, transform=transform, rule=rule)
