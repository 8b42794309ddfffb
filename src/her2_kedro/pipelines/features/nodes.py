"""Thin nodes of the features pipeline: train the tile encoder, then cache every core's embeddings.

torch is imported inside the nodes, so building the pipeline registry stays cheap.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from her2_kedro.config import CohortsConfig, EncoderConfig, TileConfig, TorchModelConfig
from her2_kedro.pipelines.common import epoch_logger, image_inputs

logger = logging.getLogger(__name__)

Cores = dict[str, Callable[[], bytes]]
#: Resume checkpoint of the encoder's training, inside its work folder.
RESUME_FILE = "resume.pt"


def _encoder_spec(encoder: EncoderConfig) -> TorchModelConfig:
    """The encoder's training run, declared like any model: a tile classifier over mixed batches
    of cores' tiles, or end-to-end gated-attention MIL."""
    if encoder.method == "tile_classifier":
        kind, arch, params = "tile_batches", "core_classifier", {"channels_last": False}
    else:
        kind, arch = "tiles", "attention_mil"
        params = {
            "hidden_dim": encoder.hidden_dim,
            "dropout": encoder.dropout,
            "micro_batch": encoder.micro_batch,
            "grad_checkpoint": encoder.grad_checkpoint,
        }
    return TorchModelConfig(
        name="encoder",
        input=kind,
        arch=arch,
        params=params,
        encoder=encoder.name,
        encoder_weights=encoder.weights,
        bag=encoder.bag,
        training=encoder.training,
        distributed=encoder.distributed,
    )


def train_encoder(
    core_manifest: pd.DataFrame,
    tile_index: pd.DataFrame,
    accepted_cores: Cores,
    reference_stains: dict[str, Any],
    encoder: dict[str, Any],
    tiles: dict[str, Any],
    cohorts: dict[str, Any],
    workdir: Path,
) -> tuple[bytes, pd.DataFrame]:
    """The frozen encoder's checkpoint (bytes) and its training curve.

    With ``encoder.train`` the trunk is trained on the training cores (``encoder.method``: a tile
    classifier, or end-to-end attention MIL; selected on validation cores), then kept alone;
    otherwise the initial weights are kept as they are. An interrupted run resumes from
    ``workdir``; a finished encoder of the same settings and training cores is reused.
    """
    from her2_kedro.evaluation.study import TASKS
    from her2_kedro.modelling.checkpoints import save_checkpoint
    from her2_kedro.modelling.encoders import build_encoder
    from her2_kedro.modelling.torch_study import FIVE_CLASS_TASK, bag_table, fit

    config = EncoderConfig.model_validate(encoder)
    evaluation_only = CohortsConfig.model_validate(cohorts).evaluation_only
    target_task = TASKS.get(config.target, FIVE_CLASS_TASK)
    table, problems = bag_table(core_manifest, tile_index, target_task, evaluation_only)
    fingerprint = _fingerprint(config, table, tiles, cohorts, reference_stains)
    reused = _finished_encoder(workdir, fingerprint)
    if reused is not None:
        logger.info("Encoder: reusing %s (same settings and training cores)", reused[0])
        return reused[0].read_bytes(), reused[1]
    history = pd.DataFrame()
    if config.train:
        for p in problems:
            logger.warning("Encoder training: %s %s", p.core_id, p.reason)
        spec = _encoder_spec(config)
        if config.distributed.world_size > 1:
            trunk, history = _train_with_torchrun(
                spec, target_task, table, accepted_cores, reference_stains, tiles, cohorts, workdir
            )
        else:
            inputs = image_inputs(accepted_cores, reference_stains, tiles, cohorts)
            model, result, _ = fit(
                spec,
                table,
                target_task,
                inputs,
                checkpoint_path=workdir / RESUME_FILE,
                on_epoch_end=epoch_logger(f"encoder.{config.target}"),
            )
            trunk = model.encoder
            history = pd.DataFrame(result.history)
            logger.info(
                "Encoder %s trained on %s: epoch %d kept (validation balanced accuracy %.4f)",
                config.name,
                config.target,
                result.selected_epoch,
                result.best_val_balanced_accuracy,
            )
    else:
        from her2_kedro.modelling.reproducibility import seed_everything

        seed_everything(config.training.seed)  # a random trunk is the same on every rerun
        trunk, _ = build_encoder(config.name, config.weights)
    path = save_checkpoint(
        workdir / "encoder.pt",
        trunk,
        "encoder",
        {"name": config.name, "weights": None},
        task=config.target if config.train else None,
        training=config.training.model_dump(mode="json") if config.train else None,
        extras={
            "fingerprint": fingerprint,
            "history": history.to_dict("list"),
            # the encoder's settings (its input size, for new cores)
            "encoder": config.model_dump(mode="json", exclude=set(config.INFERENCE_ONLY)),
            "tiles": dict(tiles),
        },
    )
    data = path.read_bytes()
    (workdir / RESUME_FILE).unlink(missing_ok=True)  # finished: a rerun trains afresh
    return data, history


def _train_with_torchrun(
    spec: TorchModelConfig,
    task: Any,
    table: pd.DataFrame,
    accepted_cores: Cores,
    reference_stains: dict[str, Any],
    tiles: dict[str, Any],
    cohorts: dict[str, Any],
    workdir: Path,
) -> tuple[Any, pd.DataFrame]:
    """The encoder's training under torchrun (as a model's, :mod:`..models.torchrun_job`): the
    trained trunk and the curve."""
    from her2_kedro.modelling.checkpoints import load_checkpoint
    from her2_kedro.pipelines.models.torchrun_job import train_with_torchrun

    path, history = train_with_torchrun(
        spec,
        {"name": task.name, "target": task.target},
        tiles,
        cohorts,
        table,
        {"accepted_cores": accepted_cores, "reference_stains": reference_stains},
        workdir,
    )
    return load_checkpoint(path, expected_arch=spec.arch).model.encoder, history


def _fingerprint(
    config: EncoderConfig,
    table: pd.DataFrame,
    tiles: dict[str, Any],
    cohorts: dict[str, Any],
    reference: Mapping[str, Any] | None,
) -> str:
    """What the trained encoder depends on: its settings, the tile rule, and the train / val cores
    (content, split, label); the stain reference only where a normalised cohort trains."""
    from her2_kedro.modelling.embeddings import settings_hash

    used = table[table["split"].isin(["train", "val"])]
    cores = sorted(
        zip(
            used["core_id"],
            used["content_hash"],
            used["split"],
            used["y"].astype(int).tolist(),
            strict=True,
        )
    )
    normalised = set(CohortsConfig.model_validate(cohorts).stain_normalised)
    return settings_hash(
        {
            "encoder": config.model_dump(mode="json", exclude=set(config.INFERENCE_ONLY)),
            "tiles": tiles,
            "cores": cores,
            "reference": reference if set(used["cohort"]) & normalised else None,
        }
    )


def _finished_encoder(workdir: Path, fingerprint: str) -> tuple[Path, pd.DataFrame] | None:
    """The encoder a previous run finished with the same fingerprint, and its curve, if any."""
    from her2_kedro.modelling.checkpoints import CheckpointError, read_checkpoint

    path = workdir / "encoder.pt"
    if not path.is_file():
        return None
    try:
        extras = read_checkpoint(path).get("extras") or {}
    except CheckpointError as err:
        logger.warning("Encoder: ignoring %s (%s)", path, err)
        return None
    if extras.get("fingerprint") != fingerprint:
        return None
    return path, pd.DataFrame(extras.get("history") or {})


def _embedding_settings(
    config: EncoderConfig,
    rule: TileConfig,
    cohort: str,
    reference: Mapping[str, Any] | None,
    normalised,
    compute: str | None = None,
) -> dict[str, Any]:
    """What changes the pixels the encoder sees, beside the core and the encoder themselves
    (and ``compute``: the arithmetic where it moves the embeddings, e.g. bf16 on the GPU)."""
    settings = {"tiles": rule.model_dump(), "input_size": config.bag.input_size}
    if compute:
        settings["compute"] = compute
    if cohort in set(normalised) and reference:
        source = (reference.get("sources") or {}).get(cohort, {})
        settings["stain_reference"] = {
            "vectors": reference.get("vectors"),
            "source": source.get("vectors"),
        }
        if "dab_scale" in source:  # only then: entries made without a cohort factor stay valid
            settings["stain_reference"]["dab_scale"] = source["dab_scale"]
    return settings


#: Cores embedded per round on a Dask cluster (bounds the entries held before they are saved).
CLUSTER_CHUNK = 256


def _cluster_in_use() -> bool:
    """Whether per-core work fans out to a Dask cluster (a node run by the DaskRunner)."""
    from her2_kedro.parallel import active_client, on_dask_worker

    return on_dask_worker() or active_client() is not None


@functools.lru_cache(maxsize=2)
def _frozen_trunk(checkpoint: str, checkpoint_sha: str, channels_last: bool, device: str):
    """The frozen trunk, loaded once per process (the node's, or a Dask worker's) and encoder
    version."""
    import torch

    from her2_kedro.modelling.checkpoints import load_checkpoint

    model = load_checkpoint(checkpoint, expected_arch="encoder").model
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)


def _embed_one(
    item: tuple[dict[str, Any], Callable[[], bytes]],
    *,
    checkpoint: str,
    checkpoint_sha: str,
    encoder: dict[str, Any],
    tiles: dict[str, Any],
    reference: dict[str, Any] | None,
    normalised: list[str],
) -> dict:
    """One core's cache entry (numpy path), computed where this runs, the node's process or a
    Dask worker: the core is read from (shared) storage there, and the trunk comes from the
    checkpoint's path, not with the item."""
    from her2_kedro.features.preprocess import decode_rgb
    from her2_kedro.imaging.normalisation import cohort_normaliser
    from her2_kedro.modelling.devices import resolve_device
    from her2_kedro.modelling.embeddings import embed_core

    row, load = item
    config, rule = EncoderConfig.model_validate(encoder), TileConfig.model_validate(tiles)
    device = resolve_device(config.training.device)
    rgb = decode_rgb(load())
    transform = cohort_normaliser(reference, normalised, rule.background_grey)
    if transform is not None:
        rgb = transform(row, rgb)
    trunk = _frozen_trunk(checkpoint, checkpoint_sha, config.channels_last, str(device))
    return embed_core(
        trunk,
        rgb,
        row["core_id"],
        rule,
        config.bag.input_size,
        batch_size=config.embedding_batch_size,
        device=device,
        channels_last=config.channels_last,
    )


class _InOrder:
    """Cache entries from one generator of ``(core_id, entry)``, handed out by core id: the
    cache saves lazily, one entry at a time, in the order the entries were declared, so one
    overlapped stream serves them all (entries asked for out of order are buffered)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make, self.stream, self.ready = make, None, {}

    def get(self, core_id: str) -> dict:
        if self.stream is None:
            self.stream = self.make()
        while core_id not in self.ready:
            found, entry = next(self.stream)
            self.ready[found] = entry
        return self.ready.pop(core_id)


def _report_stale(cache: Mapping[str, Path], current: set[str], *, prune: bool) -> None:
    """Delete (``prune``) or just count the cache entries no current core's key names."""
    stale = [Path(path) for name, path in cache.items() if Path(name).stem not in current]
    if not stale:
        return
    size_mb = sum(p.stat().st_size for p in stale if p.is_file()) / 1e6
    if prune:
        for path in stale:
            path.unlink(missing_ok=True)
        logger.info("Embedding cache: deleted %d stale entries (%.1f MB).", len(stale), size_mb)
    else:
        logger.info(
            "Embedding cache: %d stale entries (%.1f MB) kept (encoder.prune_stale_embeddings "
            "is false).",
            len(stale),
            size_mb,
        )


def embed_cores(
    core_manifest: pd.DataFrame,
    tile_index: pd.DataFrame,
    accepted_cores: Cores,
    reference_stains: dict[str, Any],
    encoder_checkpoint: Path,
    embedding_cache: dict[str, Path],
    encoder: dict[str, Any],
    tiles: dict[str, Any],
    cohorts: dict[str, Any],
) -> tuple[dict[str, Callable[[], dict]], pd.DataFrame]:
    """New cache entries (computed lazily, one core at a time, as the cache saves them) and the
    index ``core_id, key, n_tiles`` of every core's entry.

    Entries whose key is already in the cache are skipped, so an unchanged rerun computes
    nothing and an interrupted run resumes where it stopped.
    """
    import torch

    from her2_kedro.modelling.checkpoints import checkpoint_sha256
    from her2_kedro.modelling.devices import resolve_device
    from her2_kedro.modelling.embeddings import embedding_key

    config = EncoderConfig.model_validate(encoder)
    inputs = image_inputs(accepted_cores, reference_stains, tiles, cohorts)
    normalised = CohortsConfig.model_validate(cohorts).stain_normalised
    encoder_sha = checkpoint_sha256(encoder_checkpoint)
    has_tiles = set(tile_index["core_id"])
    existing = {Path(name).stem for name in embedding_cache}
    rows = [r for r in core_manifest.to_dict("records") if r["core_id"] in has_tiles]
    device = resolve_device(config.training.device)
    on_device = config.device_preprocessing == "always" or (
        config.device_preprocessing == "auto" and device.type == "cuda"
    )
    compute = "cuda-bf16" if on_device and device.type == "cuda" and config.training.bf16 else None
    keys = {
        r["core_id"]: embedding_key(
            r["content_hash"],
            encoder_sha,
            _embedding_settings(
                config, inputs.rule, r["cohort"], reference_stains, normalised, compute
            ),
        )
        for r in rows
    }
    todo = [r for r in rows if keys[r["core_id"]] not in existing]
    _report_stale(embedding_cache, set(keys.values()), prune=config.prune_stale_embeddings)
    logger.info(
        "Embedding cache: %d of %d cores cached already, %d to compute (encoder %s).",
        len(rows) - len(todo),
        len(rows),
        len(todo),
        encoder_sha[:12],
    )
    state: dict[str, Any] = {}
    checkpoint = str(Path(encoder_checkpoint).resolve())
    work = functools.partial(
        _embed_one,
        checkpoint=checkpoint,
        checkpoint_sha=encoder_sha,
        encoder=config.model_dump(mode="json"),
        tiles=inputs.rule.model_dump(),
        reference=reference_stains,
        normalised=list(normalised),
    )

    def device_stream():  # every core to compute, decoded and embedded on the GPU, in order
        from her2_kedro.features.device_embedding import (
            cohort_device_normaliser,
            embed_cores_on_device,
        )

        transform = cohort_device_normaliser(
            reference_stains, normalised, inputs.rule.background_grey
        )
        normalisers = {}
        if transform is not None:
            normalisers = {r["core_id"]: functools.partial(transform, r) for r in todo}
        trunk = _frozen_trunk(checkpoint, encoder_sha, config.channels_last, str(device))
        if config.compile_trunk:
            trunk = torch.compile(trunk, dynamic=True)
        return embed_cores_on_device(
            trunk,
            [(r["core_id"], inputs.cores[r["image"]]) for r in todo],
            inputs.rule,
            config.bag.input_size,
            normalisers=normalisers,
            batch_size=config.embedding_batch_size,
            device=device,
            bf16=config.training.bf16,
            channels_last=config.channels_last,
        )

    def cluster_stream():  # every core to compute, sharded over the Dask cluster's workers
        from her2_kedro.parallel import map_cores

        for start in range(0, len(todo), CLUSTER_CHUNK):
            part = todo[start : start + CLUSTER_CHUNK]
            items = [(row, inputs.cores[row["image"]]) for row in part]
            entries = map_cores(work, items, desc="embedding cores")
            yield from zip([row["core_id"] for row in part], entries, strict=True)

    on_cluster = not on_device and len(todo) > 1 and _cluster_in_use()
    streamed = _InOrder(device_stream if on_device else cluster_stream)

    def compute(row: dict) -> Callable[[], dict]:
        def entry() -> dict:
            if "bar" not in state:  # the cache computes entries as it saves them
                state["bar"] = tqdm(total=len(todo), desc="embedding cores", unit="core")
            state["bar"].update(1)
            if on_device or on_cluster:
                return streamed.get(row["core_id"])
            return work((row, inputs.cores[row["image"]]))

        return entry

    new = {keys[r["core_id"]]: compute(r) for r in todo}
    counts = tile_index.groupby("core_id").size()
    index = pd.DataFrame(
        {
            "core_id": list(keys),
            "key": list(keys.values()),
            "n_tiles": [int(counts.get(c, 0)) for c in keys],
        }
    )
    return new, index
