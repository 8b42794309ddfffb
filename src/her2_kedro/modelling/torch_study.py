"""One declared torch model on one task: its rows, its datasets, training, and scoring every core.

Shared by every CNN (attention MIL end to end or on cached embeddings, CLAM, the torchmil
aggregators, the ResNet whole-core classifier, and the encoder the features pipeline trains).
Labels come from the core manifest; only ``train`` cores train, only ``val`` cores select; test
and evaluation-only (``external``) cores are scored once, after training, by :func:`predict`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from her2_kedro.config.models import TRAINED_ENCODER, TorchModelConfig
from her2_kedro.config.shared import TileConfig
from her2_kedro.evaluation.study import EXTERNAL_SPLIT, Task
from her2_kedro.imaging.tiling import PAPER_RULE
from her2_kedro.modelling.bags import BagDataset, Transform
from her2_kedro.modelling.checkpoints import ARCHITECTURES
from her2_kedro.modelling.devices import autocast, resolve_device
from her2_kedro.modelling.distributed import DistributedFiveClassSampler, world
from her2_kedro.modelling.embeddings import EmbeddingBagDataset, EntryLoader
from her2_kedro.modelling.reproducibility import seed_everything
from her2_kedro.modelling.sampling import FiveClassSampler
from her2_kedro.modelling.tile_batches import TileBatchDataset
from her2_kedro.modelling.training import EpochCallback, TrainingResult, train
from her2_kedro.schema import FIVE_CLASSES, SCORE_OF_CLASS, STATUS_OF_CLASS, QCProblem

logger = logging.getLogger(__name__)

__all__ = [
    "FIVE_CLASS_TASK",
    "ModelInputs",
    "bag_table",
    "build_model",
    "class_map",
    "fit",
    "make_dataset",
    "output_names",
    "predict",
    "task_probabilities",
]

#: The encoder's default target: the five classes 0, 1, 2-, 2+, 3 (column ``five_class_index``).
FIVE_CLASS_TASK = Task("five_class", "five_class_index", tuple(range(len(FIVE_CLASSES))))
#: The task class of each of the five classes, per task target.
_CLASS_OF_FIVE = {"ihc_score": SCORE_OF_CLASS, "her2_status": STATUS_OF_CLASS}


def class_map(spec: TorchModelConfig, task: Task) -> np.ndarray | None:
    """The (5, n task classes) 0/1 matrix that sums a five-class model's probabilities into the
    task's classes (``labels: five_class``); None for a model trained on the task's own classes."""
    if spec.labels == "task" or task.target == FIVE_CLASS_TASK.target:
        return None
    task_class = _CLASS_OF_FIVE[task.target]
    mapping = np.zeros((len(FIVE_CLASSES), len(task.classes)))
    for i, name in enumerate(FIVE_CLASSES):
        mapping[i, task.classes.index(task_class[name])] = 1.0
    return mapping


def output_names(spec: TorchModelConfig, task: Task) -> list[str]:
    """Names of the model's outputs: the five classes, or the task's classes."""
    if class_map(spec, task) is not None:
        return list(FIVE_CLASSES)
    return [str(c) for c in task.classes]


def task_probabilities(proba: np.ndarray, spec: TorchModelConfig, task: Task) -> np.ndarray:
    """A model's output probabilities as probabilities of the task's classes."""
    mapping = class_map(spec, task)
    return np.asarray(proba) if mapping is None else np.asarray(proba) @ mapping


@dataclass
class ModelInputs:
    """What a model's datasets read: core images (with a per-core ``transform``), or cached
    embeddings by core id; the tile rule; the trained encoder's checkpoint, where one is used,
    and the checkpoint whose head a model starts from (``init_head``)."""

    cores: Mapping[str, Callable[[], bytes]] | None = None
    transform: Transform | None = None
    embeddings: Mapping[str, EntryLoader] | None = None
    embedding_dim: int | None = None
    rule: TileConfig = PAPER_RULE
    encoder_path: Path | None = None
    head_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def bag_table(
    manifest: pd.DataFrame,
    tile_index: pd.DataFrame,
    task: Task,
    evaluation_only_cohorts: list[str] | tuple[str, ...] = (),
) -> tuple[pd.DataFrame, list[QCProblem]]:
    """Cores that have a bag: ``core_id, image, split, cohort, five_class, y, n_tiles`` (and
    ``patient_id``, ``content_hash`` where the manifest has them).

    ``y`` is the task's label from the manifest (the five-class index for the encoder's task);
    evaluation-only cohorts get split ``external``. Cores without a tissue tile are left out and
    reported.
    """
    table = manifest.copy()
    table["five_class_index"] = table["five_class"].map({c: i for i, c in enumerate(FIVE_CLASSES)})
    table["y"] = table[task.target]
    counts = tile_index.groupby("core_id").size() if len(tile_index) else pd.Series(dtype=int)
    table["n_tiles"] = table["core_id"].map(counts).fillna(0).astype(int)
    external = table["cohort"].isin(set(evaluation_only_cohorts))
    table.loc[external, "split"] = EXTERNAL_SPLIT
    empty = table["n_tiles"] == 0
    problems = [
        QCProblem("models", core_id, "no tissue tile: no bag, left out of the study")
        for core_id in table.loc[empty, "core_id"]
    ]
    keep = ["core_id", "image", "split", "cohort", "five_class", "five_class_index", "y", "n_tiles"]
    keep.append(task.target)
    keep += [c for c in ("patient_id", "content_hash") if c in table.columns]
    table = table.loc[~empty, list(dict.fromkeys(keep))].reset_index(drop=True)
    table[["y", "five_class_index"]] = table[["y", "five_class_index"]].astype(int)
    return table, problems


def _encoder_weights(spec: TorchModelConfig, inputs: ModelInputs) -> str | None:
    if spec.encoder_weights != TRAINED_ENCODER:
        return spec.encoder_weights
    if inputs.encoder_path is None:
        raise ValueError(
            f"{spec.name}: encoder_weights is 'trained' but no trained encoder was given "
            "(run the features pipeline first)"
        )
    return str(inputs.encoder_path)


def _trunk_name(spec: TorchModelConfig, weights: str | None) -> str:
    """The trunk a spec without ``encoder`` gets: the trained backbone's, else the default."""
    from her2_kedro.modelling.checkpoints import read_checkpoint
    from her2_kedro.modelling.encoders import DEFAULT_ENCODER

    if spec.encoder_weights != TRAINED_ENCODER:
        return DEFAULT_ENCODER
    return str(read_checkpoint(weights)["meta"]["params"]["name"])


def build_model(
    spec: TorchModelConfig, n_classes: int, inputs: ModelInputs
) -> tuple[nn.Module, dict[str, Any]]:
    """The model a spec declares, and the plain parameters that rebuild it from a checkpoint."""
    import her2_kedro.modelling.architectures  # noqa: F401  (registers every architecture)

    if spec.arch not in ARCHITECTURES:
        raise ValueError(f"{spec.name}: unknown arch {spec.arch!r}; known: {sorted(ARCHITECTURES)}")
    params: dict[str, Any] = {**spec.params, "n_classes": n_classes}
    if spec.input == "embeddings":
        if inputs.embedding_dim is None:
            raise ValueError(f"{spec.name}: the embedding width is unknown")
        params["in_dim"] = int(inputs.embedding_dim)
    else:
        params["encoder_weights"] = _encoder_weights(spec, inputs)
        params["encoder"] = spec.encoder or _trunk_name(spec, params["encoder_weights"])
    model = ARCHITECTURES[spec.arch](**params)
    if spec.init_head is not None:
        from her2_kedro.modelling.checkpoints import load_head

        if inputs.head_path is None:
            raise ValueError(
                f"{spec.name}: init_head is {spec.init_head!r} but no checkpoint of it was given "
                "(train that model first)"
            )
        load_head(model, inputs.head_path)
        logger.info("%s: attention and classifier start from %s", spec.name, inputs.head_path)
    return model, params


def make_dataset(
    spec: TorchModelConfig,
    rows: pd.DataFrame,
    target: str,
    inputs: ModelInputs,
    *,
    train: bool,
    seed: int,
) -> Dataset:
    """The dataset of ``rows`` for a spec's input (training augmentation only with ``train``)."""
    if spec.input in ("tiles", "tile_batches"):
        bags = BagDataset(
            rows,
            inputs.cores,
            target=target,
            rule=inputs.rule,
            config=spec.bag,
            train=train,
            seed=seed,
            transform=inputs.transform,
        )
        if spec.input == "tiles":
            return bags
        return TileBatchDataset(
            bags, rows["five_class"].tolist(), cores_per_batch=spec.bag.cores_per_batch, seed=seed
        )
    if spec.input == "embeddings":
        return EmbeddingBagDataset(
            rows,
            inputs.embeddings,
            target=target,
            train=train,
            max_tiles=spec.bag.max_tiles,
            seed=seed,
        )
    from her2_kedro.modelling.core_images import CoreImageDataset

    image = spec.image
    return CoreImageDataset(
        rows,
        inputs.cores,
        target=target,
        input_size=image.input_size,
        train=train,
        seed=seed,
        batch_size=image.batch_size,
        flips=image.flips,
        cache=image.cache,
        transform=inputs.transform,
    )


def _without_validation(spec: TorchModelConfig) -> TorchModelConfig:
    """Training settings for a study without validation cores: the last epoch, nothing selected."""
    training = spec.training.model_copy(
        update={
            "selection": "last",
            "early_stopping_patience": None,
            "plateau_patience": spec.training.max_epochs,
        }
    )
    return spec.model_copy(update={"training": training})


def fit(
    spec: TorchModelConfig,
    table: pd.DataFrame,
    task: Task,
    inputs: ModelInputs,
    *,
    checkpoint_path: Path | None = None,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
) -> tuple[nn.Module, TrainingResult, dict[str, Any]]:
    """Train a declared model on the table's train cores, selecting on its val cores.

    Resumes from ``checkpoint_path`` when it holds a resume checkpoint of the same settings (an
    interrupted run continues), and starts afresh with a warning when its settings differ. Without
    validation cores the model trains ``max_epochs`` and keeps the last epoch (logged as such).
    """
    from her2_kedro.modelling.checkpoints import CheckpointError

    train_rows = table[table["split"] == "train"]
    val_rows = table[table["split"] == "val"]
    present = sorted(set(train_rows["y"]))
    if len(present) < 2:
        raise ValueError(
            f"{spec.name} / {task.name}: the train split has {len(train_rows)} cores with labels "
            f"{present}; at least two classes are needed to train"
        )
    if val_rows.empty:
        logger.warning(
            "%s / %s: no validation cores; trained for max_epochs, the last epoch kept "
            "(the curve of the training cores is logged in place of validation)",
            spec.name,
            task.name,
        )
        spec, val_rows = _without_validation(spec), train_rows
    seed = spec.training.seed
    mapping = class_map(spec, task)  # five-class training: selection on the task's classes
    label = "y" if mapping is None else "five_class_index"
    n_outputs = len(output_names(spec, task))
    seed_everything(seed)  # the new layers' initial weights must not depend on earlier work
    model, params = build_model(spec, n_outputs, inputs)
    train_data = make_dataset(spec, train_rows, label, inputs, train=True, seed=seed)
    val_data = make_dataset(spec, val_rows, label, inputs, train=False, seed=seed)
    sampler = None
    # under torchrun each process draws the same five-class sequence and keeps its shard
    sampler_class = DistributedFiveClassSampler if world()[1] > 1 else FiveClassSampler
    if spec.input in ("tiles", "embeddings"):  # the batch datasets draw their own balanced groups
        sampler = sampler_class(train_rows["five_class"].tolist(), seed=seed)
    resume = checkpoint_path if checkpoint_path is not None and checkpoint_path.is_file() else None
    kwargs = dict(
        sampler=sampler,
        on_epoch_end=on_epoch_end,
        checkpoint_path=checkpoint_path,
        arch=spec.arch,
        params=params,
        progress=progress,
        class_map=mapping,
    )
    try:
        result = train(model, train_data, val_data, spec.training, resume_from=resume, **kwargs)
    except CheckpointError as err:
        if resume is None:
            raise
        logger.warning("%s / %s: not resuming (%s); training afresh", spec.name, task.name, err)
        seed_everything(seed)
        model, params = build_model(spec, n_outputs, inputs)
        kwargs["params"] = params
        result = train(model, train_data, val_data, spec.training, **kwargs)
    return model, result, params


def _item_ids(item: Any) -> list[str]:
    ids = getattr(item, "core_ids", None)
    return list(ids) if ids is not None else [item.core_id]


def predict(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: str = "auto",
    bf16: bool = True,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Class probabilities of every core (``core_id, p_0..``) and each tile's attention.

    The attention frame has ``core_id, x, y, attention`` for models that attend over tiles
    (empty for the whole-core classifier).
    """
    torch_device = resolve_device(device)
    model.to(torch_device).eval()
    loader = DataLoader(dataset, batch_size=None)
    ids, probs, attention = [], [], []
    with torch.inference_mode():
        for item in tqdm(loader, desc="scoring cores", unit="item", disable=not progress):
            with autocast(torch_device, bf16):
                output = model(item.tiles.to(torch_device))
            names = _item_ids(item)
            logits = output.logits.float().reshape(len(names), -1)
            ids.extend(names)
            probs.append(torch.softmax(logits, dim=1).cpu().numpy())
            weights = getattr(output, "attention", None)
            if weights is not None and getattr(item, "coords", None) is not None:
                coords = item.coords.numpy()
                attention.append(
                    pd.DataFrame(
                        {
                            "core_id": names[0],
                            "x": coords[:, 0],
                            "y": coords[:, 1],
                            "attention": weights.float().reshape(-1).cpu().numpy(),
                        }
                    )
                )
    proba = np.concatenate(probs) if probs else np.zeros((0, 0))
    frame = pd.DataFrame(proba, columns=[f"p_{j}" for j in range(proba.shape[1])])
    frame.insert(0, "core_id", ids)
    columns = ["core_id", "x", "y", "attention"]
    tiles = pd.concat(attention, ignore_index=True) if attention else pd.DataFrame(columns=columns)
    return frame, tiles
