"""Thin nodes of the CNN studies: the task's bag table, training, scoring, and the shared reports.

One function per step serves every declared torch model; the pipeline passes each model only the
inputs its ``input`` kind reads (core images, or the embedding cache), by keyword.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from her2_kedro.config import CohortsConfig, TaskConfig, TileConfig, TorchModelConfig
from her2_kedro.hooks import manifest_version
from her2_kedro.pipelines.common import (
    epoch_logger,
    final_metrics,
    image_inputs,
    model_reports,
    replace_model_rows,
    run_id,
    table_version,
)

if TYPE_CHECKING:
    from her2_kedro.evaluation.study import Task
    from her2_kedro.modelling.torch_study import ModelInputs

logger = logging.getLogger(__name__)

Cores = dict[str, Callable[[], bytes]]
#: Resume checkpoint of a model's training, inside its work folder.
RESUME_FILE = "resume.pt"


def _task(task: dict[str, Any]) -> Task:
    from her2_kedro.evaluation.study import TASKS

    return TASKS[TaskConfig.model_validate(task).name]


def build_bag_table(
    core_manifest: pd.DataFrame,
    tile_index: pd.DataFrame,
    task: dict[str, Any],
    cohorts: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cores with a bag, their split and label for this task; cores without a tile reported."""
    from her2_kedro.modelling.torch_study import bag_table

    evaluation_only = CohortsConfig.model_validate(cohorts).evaluation_only
    table, problems = bag_table(core_manifest, tile_index, _task(task), evaluation_only)
    table["manifest_version"] = manifest_version(core_manifest)
    return table, pd.DataFrame(
        [(p.source, p.core_id, p.reason) for p in problems], columns=["source", "core_id", "reason"]
    )


def entries_by_key(tile_embeddings: dict[str, Callable[[], dict]]) -> dict[str, Callable]:
    """The embedding cache's entry loaders by key (partition names without their suffix)."""
    return {
        Path(name).stem if "." in name else name: load for name, load in tile_embeddings.items()
    }


def _inputs(
    spec: TorchModelConfig,
    tiles: dict[str, Any],
    cohorts: dict[str, Any],
    accepted_cores: Cores | None = None,
    reference_stains: dict[str, Any] | None = None,
    tile_embeddings: dict[str, Callable[[], dict]] | None = None,
    embedding_index: pd.DataFrame | None = None,
    encoder_checkpoint: Path | None = None,
    head_checkpoint: Path | None = None,
) -> ModelInputs:
    """What this model's datasets read, from the node's keyword inputs (``sources``: the
    accepted cores and stain reference, or the embedding cache and its index, the trained
    encoder where the model starts from it, and the checkpoint of its ``init_head``)."""
    from her2_kedro.modelling.torch_study import ModelInputs

    if spec.input != "embeddings":
        inputs = image_inputs(accepted_cores, reference_stains, tiles, cohorts)
        inputs.encoder_path = encoder_checkpoint
        inputs.head_path = head_checkpoint
        return inputs
    rule = TileConfig.model_validate(tiles)
    inputs = ModelInputs(rule=rule, encoder_path=encoder_checkpoint)
    by_key = entries_by_key(tile_embeddings)
    missing = sorted(set(embedding_index["key"]) - set(by_key))
    if missing:
        raise KeyError(f"embedding cache entries missing: {missing[:5]} (rerun features)")
    inputs.embeddings = {
        core_id: by_key[key]
        for core_id, key in zip(embedding_index["core_id"], embedding_index["key"], strict=True)
    }
    first = next(iter(inputs.embeddings.values()), None)
    inputs.embedding_dim = int(first()["embeddings"].shape[1]) if first else None
    return inputs


def train_model(
    table: pd.DataFrame,
    model: dict[str, Any],
    task: dict[str, Any],
    tiles: dict[str, Any],
    cohorts: dict[str, Any],
    workdir: Path,
    **sources: Any,
) -> tuple[bytes, pd.DataFrame]:
    """Train a declared model on the train cores (selected on val); its checkpoint and curve.

    Each epoch's loss and validation metrics go to MLflow as metric history; an interrupted run
    resumes from the resume checkpoint in ``workdir``. With ``distributed.nproc_per_node`` or
    ``nnodes`` above 1 the training runs under ``torchrun`` (:mod:`.torchrun_job`).
    """
    spec = TorchModelConfig.model_validate(model)
    t = _task(task)
    if spec.distributed.world_size > 1:
        from her2_kedro.pipelines.models.torchrun_job import train_with_torchrun

        path, history = train_with_torchrun(spec, task, tiles, cohorts, table, sources, workdir)
        return path.read_bytes(), history
    inputs = _inputs(spec, tiles, cohorts, **sources)
    path, history = fit_and_save(
        spec,
        t,
        table,
        inputs,
        workdir,
        tiles=tiles,
        run_id=run_id(),
        on_epoch_end=epoch_logger(f"{spec.name}.{t.name}"),
    )
    return path.read_bytes(), history


def fit_and_save(
    spec: TorchModelConfig,
    t: Task,
    table: pd.DataFrame,
    inputs: ModelInputs,
    workdir: Path,
    *,
    tiles: dict[str, Any],
    run_id: str,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None,
    progress: bool = True,
) -> tuple[Path, pd.DataFrame]:
    """Train (resuming from ``workdir``), then write ``workdir/model.pt``: the selected weights
    with what ``predict`` needs to feed it new cores; its path and the training curve. In a
    torchrun job every process trains and rank 0 alone writes."""
    from her2_kedro.modelling.checkpoints import save_checkpoint
    from her2_kedro.modelling.distributed import is_main
    from her2_kedro.modelling.torch_study import fit, output_names

    fitted, result, params = fit(
        spec,
        table,
        t,
        inputs,
        checkpoint_path=workdir / RESUME_FILE,
        on_epoch_end=on_epoch_end,
        progress=progress,
    )
    path = workdir / "model.pt"
    if is_main():
        save_checkpoint(
            path,
            fitted,
            spec.arch,
            params,
            class_names=output_names(spec, t),
            task=t.name,
            training=spec.training.model_dump(mode="json"),
            epoch=result.selected_epoch,
            # how to feed the model new cores (its input kind, bag / image settings, tile rule),
            # and the MLflow run that trained it (the version `predict` records with each call)
            extras={"spec": spec.model_dump(mode="json"), "tiles": dict(tiles), "run_id": run_id},
        )
        (workdir / RESUME_FILE).unlink(missing_ok=True)  # finished: a rerun trains afresh
        logger.info(
            "%s / %s: epoch %d kept of %d (validation balanced accuracy %.4f)",
            spec.name,
            t.name,
            result.selected_epoch,
            len(result.history),
            result.best_val_balanced_accuracy,
        )
    return path, pd.DataFrame(result.history)


def evaluate_model(
    checkpoint: Path,
    table: pd.DataFrame,
    model: dict[str, Any],
    task: dict[str, Any],
    tiles: dict[str, Any],
    cohorts: dict[str, Any],
    **sources: Any,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict, dict, dict]:
    """Score every core once with the trained model: predictions, metric rows per split, each
    tile's attention, report tables and figures, and the final metrics for MLflow."""
    from her2_kedro.evaluation import study
    from her2_kedro.modelling.checkpoints import load_checkpoint
    from her2_kedro.modelling.registry import register_checkpoint
    from her2_kedro.modelling.torch_study import (
        make_dataset,
        output_names,
        predict,
        task_probabilities,
    )

    spec = TorchModelConfig.model_validate(model)
    t = _task(task)
    inputs = _inputs(spec, tiles, cohorts, **sources)
    n_outputs = len(output_names(spec, t))
    loaded = load_checkpoint(
        checkpoint, expected_arch=spec.arch, expected={"n_classes": n_outputs, "task": t.name}
    )
    dataset = make_dataset(spec, table, "y", inputs, train=False, seed=spec.training.seed)
    scores, attention = predict(
        loaded.model, dataset, device=spec.training.device, bf16=spec.training.bf16
    )
    proba = task_probabilities(scores.set_index("core_id").loc[table["core_id"]], spec, t)
    provenance = {"run_id": run_id(), "manifest_version": table_version(table)}
    predictions, metrics, confusions = study.evaluate_probabilities(
        table, proba, t, spec.name, provenance=provenance
    )
    attention.insert(0, "task", t.name)
    attention.insert(0, "model", spec.name)
    tables, figures = model_reports(predictions, confusions, spec.name, t.name)
    register_checkpoint(spec.name, t.name, provenance["run_id"], _split_metrics(metrics))
    return predictions, metrics, attention, tables, figures, final_metrics(metrics, logger)


def _split_metrics(metrics: pd.DataFrame) -> dict[str, float]:
    """``<split>.balanced_accuracy`` of each split: the registered version's tags."""
    return {
        f"{row.split}.balanced_accuracy": float(row.balanced_accuracy)
        for row in metrics.itertuples(index=False)
        if pd.notna(row.balanced_accuracy)
    }


def collect_reports(
    previous_metrics: pd.DataFrame | None,
    previous_predictions: pd.DataFrame | None,
    previous_attention: pd.DataFrame | None,
    *frames: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """metrics.csv, predictions.parquet and attention.parquet: this run's rows replace the same
    model and task, other models' rows stay."""
    from her2_kedro.evaluation.metrics import append_metrics

    third = len(frames) // 3
    metrics = pd.concat(frames[:third], ignore_index=True)
    predictions = pd.concat(frames[third : 2 * third], ignore_index=True)
    attention = pd.concat(frames[2 * third :], ignore_index=True)
    return (
        append_metrics(previous_metrics, metrics),
        replace_model_rows(previous_predictions, predictions),
        replace_model_rows(previous_attention, attention),
    )
