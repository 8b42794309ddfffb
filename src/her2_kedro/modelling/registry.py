"""Trained models in the MLflow model registry (the SQLite tracking store holds it).

Every trained torch model's checkpoint is logged as a run artifact (``models/<model>.<task>.pt``)
and registered as a version of ``her2_kedro.<model>.<task>``, tagged with its validation and test
metrics. ``predict`` takes the version a user gave an alias (``champion``) when there is one, and
the local checkpoint otherwise, and records which.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

#: Registry names: one registered model per model and task.
PREFIX = "her2_kedro"


def registered_name(model: str, task: str) -> str:
    return f"{PREFIX}.{model}.{task}"


def register_checkpoint(
    model: str, task: str, run_id: str, metrics: Mapping[str, float] | None = None
) -> str | None:
    """Register the run's logged checkpoint as a new version; its version number, or None when
    there is no run (plain function calls, tests without MLflow) or the registry refuses."""
    if not run_id:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = registered_name(model, task)
    source = f"runs:/{run_id}/models/{model}.{task}.pt"
    tags = {k: f"{v:.4f}" for k, v in (metrics or {}).items()}
    try:
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(
                name, description=f"her2_kedro {model} on {task} (checkpoint: {model}.{task}.pt)"
            )
        version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    except MlflowException as err:
        logger.warning("%s not registered in MLflow: %s", name, err)
        return None
    logger.info("Registered %s version %s (run %s)", name, version.version, run_id)
    return str(version.version)


def resolve_checkpoint(
    model: str, task: str, local: Path | None, alias: str | None
) -> tuple[Path, str | None]:
    """The checkpoint to score with, and its version label: the registry's version under
    ``alias`` when one exists (downloaded from its run), else ``local`` (version None: the
    checkpoint names its own training run)."""
    if alias:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        name = registered_name(model, task)
        try:
            version = MlflowClient().get_model_version_by_alias(name, alias)
        except MlflowException:
            version = None
        if version is not None:
            import mlflow

            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source))
            label = f"registry:{name}/{version.version}@{alias} (run {version.run_id})"
            logger.info(
                "%s / %s: registered version %s (alias %s)", model, task, version.version, alias
            )
            return path, label
    if local is None:
        raise FileNotFoundError(f"no checkpoint of {model} / {task}, local or registered")
    logger.info("%s / %s: local checkpoint %s (no registry alias %r)", model, task, local, alias)
    return local, None
