"""One training loop for every torch MIL-style model (attention MIL, CLAM, ResNet on whole cores).

A model maps one item (a bag of tiles or embeddings, or a batch of cores or tiles with one label
each) to ``.logits``. The loop trains with Adam and cross-entropy (class balance comes only from the
sampler, as the authors did), with optional gradient accumulation; after each epoch it scores the
validation items, reduces the learning rate on a plateau of validation balanced accuracy, stops
early when it stalls, and keeps the best and the last weights.

Honesty by construction: :func:`train` takes a training and a validation dataset only; gradients
flow only from training items, validation items only select. Test cores are scored elsewhere, once.

Reproducible: a fresh run seeds torch / numpy / ``random`` from ``config.seed``; the training order
is the sampler's (``set_epoch`` each epoch) or a seeded permutation per epoch. After every epoch a
resume checkpoint (weights, optimiser, scheduler, counters, best weights, history and RNG states)
is written atomically, and ``train(..., resume_from=path)`` continues so that an interrupted and
resumed run ends with the same weights and history as an uninterrupted one (on CPU).

Data-parallel: started by ``torchrun`` inside a process group (:mod:`.distributed`), the same
function trains a DDP copy of the model on each rank's shard of the training order, averages the
epoch's loss over the ranks, scores the validation items shared out over the ranks and gathered,
so that every rank takes the same decisions; only rank 0 writes the resume checkpoint and calls
``on_epoch_end``. In-model randomness (dropout) is seeded per rank and epoch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from her2_kedro.config.mil import TrainingConfig
from her2_kedro.evaluation.metrics import classification_metrics
from her2_kedro.modelling.batch_norm import recompute_batch_norm
from her2_kedro.modelling.checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from her2_kedro.modelling.devices import autocast, resolve_device
from her2_kedro.modelling.distributed import (
    all_mean,
    gather_in_order,
    is_main,
    seed_for_rank,
    shard,
    world,
)
from her2_kedro.modelling.reproducibility import rng_states, seed_everything, set_rng_states

__all__ = [
    "EpochCallback",
    "TrainingResult",
    "TrainState",
    "evaluate",
    "train",
]

#: ``on_epoch_end(epoch, metrics)``: called after each epoch (and after its resume checkpoint).
EpochCallback = Callable[[int, dict[str, float]], None]
#: Training settings that must match for a resume to continue the same run (others may change).
_RESUME_MAY_DIFFER = ("max_epochs", "device", "num_workers")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model itself, without its DDP wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass
class TrainingResult:
    """What :func:`train` returns; the model itself is left holding ``state_dict``.

    ``state_dict``: the selected weights (CPU); ``selected_epoch``: their epoch (0-based);
    ``best_epoch`` / ``best_val_balanced_accuracy``: the best validation epoch; ``last_state_dict``:
    the final epoch's weights; ``history``: one dict per epoch (``epoch``, ``train_loss``, ``lr``,
    ``val_loss``, ``val_balanced_accuracy`` and the other validation metrics prefixed ``val_``).
    """

    state_dict: dict[str, torch.Tensor]
    selected_epoch: int
    best_epoch: int
    best_val_balanced_accuracy: float
    last_state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    stopped_early: bool
    device: str


@dataclass
class TrainState:
    """The loop's own progress: what a resume checkpoint must restore besides model and optimiser."""

    next_epoch: int = 0
    best_score: float = float("-inf")
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's weights (kept as best / last state)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _set_epoch(epoch: int, *things: Any) -> None:
    """Call ``set_epoch(epoch)`` on every sampler / dataset that has it (fresh draws each epoch)."""
    for thing in things:
        if thing is not None and hasattr(thing, "set_epoch"):
            thing.set_epoch(epoch)


def _global_order(
    dataset: Dataset, sampler: Iterable[int] | None, seed: int, epoch: int
) -> list[int]:
    """The epoch's item order over all ranks: the sampler's, or a permutation seeded by
    (seed, epoch)."""
    if sampler is not None:
        if hasattr(sampler, "global_indices"):
            return list(sampler.global_indices())
        return list(sampler)
    return np.random.default_rng([seed, epoch]).permutation(len(dataset)).tolist()


def _training_order(
    dataset: Dataset, sampler: Iterable[int] | None, seed: int, epoch: int
) -> Iterable[int]:
    """This rank's item order: the sampler's (a distributed sampler shards itself), or its shard
    of the global order."""
    rank, world_size = world()
    if sampler is not None and (world_size == 1 or hasattr(sampler, "global_indices")):
        return sampler
    return shard(_global_order(dataset, sampler, seed, epoch), rank, world_size)


def _loader(dataset: Dataset, order: Iterable[int] | None, config: TrainingConfig, device):
    """One bag per step (``batch_size=None``), in ``order``; workers only if configured."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=order,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )


def _targets(bag: Any, device: torch.device) -> torch.Tensor:
    """The item's label(s) as a 1-d long tensor: one per bag, or one per core of a core batch."""
    return torch.as_tensor(bag.label, dtype=torch.long, device=device).reshape(-1)


def _bag_loss(model: nn.Module, bag: Any, device: torch.device, bf16: bool) -> torch.Tensor:
    """The training loss of one item (a bag, or a batch of whole cores), in float32.

    Cross-entropy of the logits against the label(s), unless the model defines
    ``training_loss(output, target)`` (CLAM adds its instance-clustering loss that way).
    """
    tiles = bag.tiles.to(device, non_blocking=True)
    target = _targets(bag, device)
    with autocast(device, bf16):
        output = model(tiles)
    own = _unwrap(model)
    if hasattr(own, "training_loss"):
        return own.training_loss(output, target).float()
    return F.cross_entropy(output.logits.float().reshape(len(target), -1), target)


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    config: TrainingConfig,
    device: torch.device,
    bar: tqdm,
) -> float:
    """One pass over the training bags; the mean per-bag loss (over all ranks). Gradients of
    ``grad_accumulation`` bags are averaged into one step (a last, shorter group over its own
    size); under DDP they are synchronised over the ranks only at the step."""
    model.train()
    n, accum = len(loader), config.grad_accumulation
    total = 0.0
    optimizer.zero_grad(set_to_none=True)
    for i, bag in enumerate(loader):
        group_start = (i // accum) * accum
        group_size = min(accum, n - group_start)
        steps = i == group_start + group_size - 1
        sync = contextlib.nullcontext()
        if isinstance(model, DistributedDataParallel) and not steps:
            sync = model.no_sync()
        with sync:
            loss = _bag_loss(model, bag, device, config.bf16)
            (loss / group_size).backward()
        total += float(loss.detach())
        if steps:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{total / (i + 1):.4f}", refresh=False)
    return all_mean(total / max(n, 1), device)


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    *,
    bf16: bool = True,
    num_workers: int = 0,
    class_map: np.ndarray | None = None,
) -> dict[str, float]:
    """Validation metrics of ``model`` on labelled bags: mean ``loss`` and
    :func:`~her2_kedro.evaluation.metrics.classification_metrics` (balanced accuracy, ...).

    With ``class_map`` (outputs x classes, 0/1) the loss stays that of the model's own outputs,
    while the metrics score its probabilities summed into the mapped classes against the mapped
    labels (a five-class model judged on IHC score or HER2 status). In a process group each rank
    scores every ``world_size``-th item and all ranks get the metrics of all items.
    """
    model.eval()
    rank, world_size = world()
    indices = list(range(len(dataset)))[rank::world_size]
    loader = DataLoader(dataset, batch_size=None, sampler=indices, num_workers=num_workers)
    scored = []
    with torch.inference_mode():
        for bag in loader:
            tiles = bag.tiles.to(device, non_blocking=True)
            target = _targets(bag, device)
            with autocast(device, bf16):
                logits = model(tiles).logits.float().reshape(len(target), -1)
            loss = float(F.cross_entropy(logits, target, reduction="sum"))
            scored.append((target.tolist(), torch.softmax(logits, dim=1).cpu().numpy(), loss))
    scored = gather_in_order(indices, scored)
    y_true = [y for item in scored for y in item[0]]
    losses = [item[2] for item in scored]
    score = np.concatenate([item[1] for item in scored])
    if class_map is not None:
        y_true = class_map[np.asarray(y_true)].argmax(1).tolist()
        score = score @ class_map
    metrics = classification_metrics(
        y_true, score.argmax(1), score, labels=list(range(score.shape[1]))
    )
    return {"loss": float(np.sum(losses) / len(y_true)), **metrics}


def _record_epoch(
    state: TrainState, epoch: int, score: float, model: nn.Module, patience: int | None
) -> None:
    """Keep the best weights (strictly better only: ties keep the earlier epoch) and count stalls."""
    if score > state.best_score:
        state.best_score, state.best_epoch = score, epoch
        state.best_state = _cpu_state(model)
        state.epochs_without_improvement = 0
    else:
        state.epochs_without_improvement += 1
    state.stopped_early = patience is not None and state.epochs_without_improvement >= patience
    state.next_epoch = epoch + 1


def _save_resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    state: TrainState,
    config: TrainingConfig,
    arch: str,
    params: Mapping[str, Any],
) -> None:
    """Write everything a resume needs (see the module docstring) via ``save_checkpoint``."""
    extras = {
        "kind": "resume",
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "next_epoch": state.next_epoch,
        "best_score": float(state.best_score),
        "best_epoch": state.best_epoch,
        "best_state": state.best_state or {},
        "epochs_without_improvement": state.epochs_without_improvement,
        "stopped_early": state.stopped_early,
        "history": [dict(h) for h in state.history],
        "rng": rng_states(),
        "world_size": world()[1],
    }
    save_checkpoint(
        path,
        model,
        arch,
        params,
        training=config.model_dump(mode="json"),
        epoch=state.next_epoch - 1,
        extras=extras,
    )


def _load_resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    config: TrainingConfig,
) -> TrainState:
    """Restore model, optimiser, scheduler, RNGs and the loop's state from a resume checkpoint.

    Raises :class:`CheckpointError` naming the file if it is not a resume checkpoint or was made
    with different training settings (only ``max_epochs``, ``device``, ``num_workers`` may change).
    """
    payload = read_checkpoint(path)
    extras = payload.get("extras") or {}
    if extras.get("kind") != "resume":
        raise CheckpointError(f"{path}: not a resume checkpoint of the training loop")
    saved = payload["meta"].get("training", {})
    now = config.model_dump(mode="json")
    diff = [
        f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
        for k, v in now.items()
        if k not in _RESUME_MAY_DIFFER and saved.get(k) != v
    ]
    saved_world = int(extras.get("world_size", 1))
    if saved_world != world()[1]:
        diff.append(f"processes: checkpoint {saved_world}, now {world()[1]}")
    if diff:
        raise CheckpointError(f"{path}: training settings differ: " + "; ".join(diff))
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model: {exc}") from exc
    optimizer.load_state_dict(extras["optimizer"])
    scheduler.load_state_dict(extras["scheduler"])
    set_rng_states(extras["rng"])
    return TrainState(
        next_epoch=int(extras["next_epoch"]),
        best_score=float(extras["best_score"]),
        best_epoch=int(extras["best_epoch"]),
        best_state=dict(extras["best_state"]) or None,
        epochs_without_improvement=int(extras["epochs_without_improvement"]),
        stopped_early=bool(extras["stopped_early"]),
        history=[dict(h) for h in extras["history"]],
    )


def _run_epoch(
    epoch: int,
    model: nn.Module,
    trainer: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    sampler: Iterable[int] | None,
    optimizer: torch.optim.Optimizer,
    config: TrainingConfig,
    device: torch.device,
    progress: bool,
    class_map: np.ndarray | None = None,
) -> dict[str, float]:
    """Train one epoch on the training bags (``trainer``: the model or its DDP wrapper), then
    score the validation bags; the epoch's metrics."""
    _set_epoch(epoch, sampler, train_data, val_data)
    rank, world_size = world()
    if world_size > 1:
        seed_for_rank(config.seed, epoch, rank)
    order = _training_order(train_data, sampler, config.seed, epoch)
    loader = _loader(train_data, order, config, device)
    lr = float(optimizer.param_groups[0]["lr"])
    with tqdm(total=len(loader), desc=f"epoch {epoch}", disable=not progress, leave=False) as bar:
        train_loss = _train_epoch(trainer, loader, optimizer, config, device, bar)
    if config.precise_bn_batches:
        # from the global order, so every rank computes the same statistics
        first = _global_order(train_data, sampler, config.seed, epoch)[: config.precise_bn_batches]
        items = (train_data[i] for i in first)
        recompute_batch_norm(model, items, lambda m, item: _bag_loss(m, item, device, config.bf16))
    val = evaluate(
        model,
        val_data,
        device,
        bf16=config.bf16,
        num_workers=config.num_workers,
        class_map=class_map,
    )
    return {
        "epoch": float(epoch),
        "train_loss": train_loss,
        "lr": lr,
        **{f"val_{k}": float(v) for k, v in val.items()},
    }


def train(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    config: TrainingConfig | None = None,
    *,
    sampler: Iterable[int] | None = None,
    on_epoch_end: EpochCallback | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    arch: str | None = None,
    params: Mapping[str, Any] | None = None,
    progress: bool = True,
    class_map: np.ndarray | None = None,
) -> TrainingResult:
    """Train ``model`` on ``train_data``, select on ``val_data``; see the module docstring.

    Items are :class:`~her2_kedro.modelling.bags.Bag`-like (``tiles``, ``label``). ``sampler``
    orders training items (e.g. :class:`~her2_kedro.modelling.sampling.FiveClassSampler`).
    ``checkpoint_path`` receives a resume checkpoint after each epoch (``arch`` / ``params`` make it
    loadable by :func:`~her2_kedro.modelling.checkpoints.load_checkpoint` as the last weights);
    ``resume_from`` continues such a run. ``class_map`` judges validation on mapped classes
    (see :func:`evaluate`). The model is left holding the selected weights.
    """
    config = config or TrainingConfig()
    if len(val_data) == 0:
        raise ValueError("the validation set is empty: nothing to select a checkpoint on")
    if checkpoint_path is not None and (arch is None or params is None):
        raise ValueError("checkpoint_path needs arch and params (to rebuild the model from it)")
    device = resolve_device(config.device)
    model.to(device)
    trainer = model
    if world()[1] > 1:
        ids = [device.index] if device.type == "cuda" else None
        # find_unused_parameters: CLAM's instance classifiers of absent classes get no gradient
        trainer = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=config.plateau_factor, patience=config.plateau_patience
    )
    if resume_from is not None:
        state = _load_resume(Path(resume_from), model, optimizer, scheduler, config)
    else:
        seed_everything(config.seed)
        state = TrainState()
    while state.next_epoch < config.max_epochs and not state.stopped_early:
        epoch = state.next_epoch
        metrics = _run_epoch(
            epoch,
            model,
            trainer,
            train_data,
            val_data,
            sampler,
            optimizer,
            config,
            device,
            progress,
            class_map,
        )
        scheduler.step(metrics["val_balanced_accuracy"])
        _record_epoch(
            state, epoch, metrics["val_balanced_accuracy"], model, config.early_stopping_patience
        )
        state.history.append(metrics)
        if checkpoint_path is not None and is_main():
            _save_resume(
                Path(checkpoint_path), model, optimizer, scheduler, state, config, arch, params
            )
        if on_epoch_end is not None and is_main():
            on_epoch_end(epoch, dict(metrics))
    return _finish(model, state, config, device)


def _finish(
    model: nn.Module, state: TrainState, config: TrainingConfig, device: torch.device
) -> TrainingResult:
    """Load the selected weights into the model and package the result."""
    if not state.history:
        raise ValueError("no epoch was trained (max_epochs already reached by the resumed run?)")
    last = _cpu_state(model)
    last_epoch = len(state.history) - 1
    if config.selection == "best_val" and state.best_state is not None:
        selected, selected_epoch = state.best_state, state.best_epoch
    else:
        selected, selected_epoch = last, last_epoch
    model.load_state_dict(selected)
    return TrainingResult(
        state_dict=selected,
        selected_epoch=selected_epoch,
        best_epoch=state.best_epoch,
        best_val_balanced_accuracy=float(state.best_score),
        last_state_dict=last,
        history=state.history,
        stopped_early=state.stopped_early,
        device=str(device),
    )
