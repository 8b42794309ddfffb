"""Trained models applied to new, unlabelled cores, one core at a time (``predict``).

A checkpoint carries everything needed to feed it a new core: the model spec (input kind, bag or
image settings), the tile rule, the task and its class names. Models on cached embeddings embed
the core with the trained encoder first, exactly as the features pipeline did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from her2_kedro.config import TileConfig, TorchModelConfig
from her2_kedro.evaluation.study import TASKS, Task
from her2_kedro.modelling.checkpoints import (
    Checkpoint,
    CheckpointError,
    checkpoint_sha256,
    load_checkpoint,
)
from her2_kedro.modelling.torch_study import (
    ModelInputs,
    make_dataset,
    output_names,
    predict,
    task_probabilities,
)


@dataclass
class TrainedModel:
    """A loaded model with what scoring needs: its spec, task, tile rule and version."""

    name: str
    task: Task
    spec: TorchModelConfig
    checkpoint: Checkpoint
    rule: TileConfig
    version: str
    path: Path


def _version(path: Path, checkpoint: Checkpoint, version: str | None) -> str:
    """The caller's version (a registry version), else the training run's MLflow id, else the
    checkpoint's content hash: a rerun skips cores scored by the same version."""
    if version:
        return version
    run = checkpoint.extras.get("run_id")
    return f"run:{run}" if run else f"sha256:{checkpoint_sha256(path)[:12]}"


def load_trained(path: Path, task: str, version: str | None = None) -> TrainedModel:
    """A trained torch model from its checkpoint; names the file when it cannot feed new cores."""
    path = Path(path)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    checkpoint = load_checkpoint(path, expected={"task": task})
    if "spec" not in checkpoint.extras:
        raise CheckpointError(
            f"{path}: the checkpoint does not record its model spec, so new cores cannot be fed "
            "to it; retrain it with this version of her2_kedro"
        )
    spec = TorchModelConfig.model_validate(checkpoint.extras["spec"])
    rule = TileConfig.model_validate(checkpoint.extras.get("tiles") or {})
    t = TASKS[task]
    n_outputs = len(output_names(spec, t))
    if checkpoint.meta.get("n_classes") != n_outputs:
        raise CheckpointError(
            f"{path}: {checkpoint.meta.get('n_classes')} outputs, but model {spec.name} on "
            f"{task} needs {n_outputs}"
        )
    return TrainedModel(
        spec.name, t, spec, checkpoint, rule, _version(path, checkpoint, version), path
    )


@dataclass
class Encoder:
    """The frozen trunk behind cached embeddings and the input size it was trained at."""

    trunk: Any
    input_size: int | None
    batch_size: int = 128


def load_encoder(path: Path) -> Encoder:
    """The trained encoder of the features pipeline (its input size from its checkpoint)."""
    checkpoint = load_checkpoint(path, expected_arch="encoder")
    settings = checkpoint.extras.get("encoder") or {}
    bag = settings.get("bag") or {}
    return Encoder(
        checkpoint.model,
        bag.get("input_size"),
        int(settings.get("embedding_batch_size", 128)),
    )


def score_core(
    trained: TrainedModel,
    core_id: str,
    image: bytes,
    transform: Callable[[dict, np.ndarray], np.ndarray] | None = None,
    encoder: Encoder | None = None,
    device: str = "cpu",
    embedded: dict[str, dict] | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """The task's class probabilities for one core and its tiles' attention (``x, y, attention``;
    empty for the whole-core classifier). ``transform`` is the stain normalisation, applied to
    the decoded core before tiling, as in training. ``embedded`` keeps the core's embeddings
    for the next model on embeddings (key: the core id), so a core is embedded once."""
    spec = trained.spec
    row = pd.DataFrame({"core_id": [core_id], "image": [f"{core_id}.img"]})
    cores = {f"{core_id}.img": lambda: image}
    inputs = ModelInputs(cores=cores, transform=transform, rule=trained.rule)
    if spec.input == "embeddings":
        if encoder is None:
            raise ValueError(f"{spec.name} reads cached embeddings: the trained encoder is needed")
        entry = (embedded or {}).get(core_id)
        if entry is None:
            entry = _embed(image, core_id, transform, encoder, trained.rule, device)
            if embedded is not None:
                embedded[core_id] = entry
        inputs = ModelInputs(
            embeddings={core_id: lambda: entry},
            embedding_dim=int(entry["embeddings"].shape[1]),
            rule=trained.rule,
        )
    dataset = make_dataset(spec, row, None, inputs, train=False, seed=0)
    scores, attention = predict(
        trained.checkpoint.model, dataset, device=device, bf16=False, progress=False
    )
    proba = task_probabilities(scores.drop(columns="core_id").to_numpy(), spec, trained.task)
    return proba[0], attention.drop(columns="core_id", errors="ignore")


def _embed(
    image: bytes,
    core_id: str,
    transform: Callable[[dict, np.ndarray], np.ndarray] | None,
    encoder: Encoder,
    rule: TileConfig,
    device: str,
) -> dict[str, np.ndarray]:
    """The core's evaluation bag embedded by the trained encoder, as the features pipeline does."""
    from her2_kedro.features.preprocess import decode_rgb
    from her2_kedro.modelling.embeddings import embed_core

    rgb = decode_rgb(image)
    if transform is not None:
        rgb = transform({"core_id": core_id}, rgb)
    return embed_core(
        encoder.trunk,
        rgb,
        core_id,
        rule,
        encoder.input_size,
        batch_size=encoder.batch_size,
        device=device,
    )
