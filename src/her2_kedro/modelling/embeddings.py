"""Tile embeddings of a frozen encoder, cached per core, and bags read back from the cache.

A core's cache entry holds the embeddings ``(N, D)`` of its evaluation bag (tile grid at offset
(0, 0), every tile above the tissue threshold, no flips) and the tiles' ``coords``. Its key joins
the core's pixel content hash, the encoder checkpoint's hash and a hash of the settings that change
the pixels the encoder sees (tile rule, input size, stain reference of a normalised cohort), so an
unchanged rerun finds every entry and a changed encoder or rule never reads a stale one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from her2_kedro.config.shared import TileConfig
from her2_kedro.modelling.bags import Bag, bag_tiles, cap_tiles, tiles_to_tensor

__all__ = ["EmbeddingBagDataset", "embed_core", "embed_tiles", "embedding_key", "settings_hash"]

#: ``loader() -> {"embeddings": (N, D), "coords": (N, 2)}`` of one core's cache entry.
EntryLoader = Callable[[], Mapping[str, np.ndarray]]


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short, order-independent hash of plain settings (JSON with sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def embedding_key(content_hash: str, encoder_sha256: str, settings: Mapping[str, Any]) -> str:
    """The cache key of one core: ``<content>-<encoder>-<settings>`` (short hex digests)."""
    if not content_hash or not encoder_sha256:
        raise ValueError("an embedding key needs the core's content hash and the encoder's hash")
    return f"{content_hash[:16]}-{encoder_sha256[:12]}-{settings_hash(settings)}"


def embed_tiles(
    trunk: nn.Module,
    tiles: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    channels_last: bool = True,
) -> torch.Tensor:
    """Features ``(N, D)`` float32 on CPU of tiles ``(N, 3, s, s)``: eval mode, no autograd."""
    trunk.eval()
    with torch.inference_mode():
        x = tiles.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return trunk(x).flatten(1).float().cpu()


def embed_core(
    trunk: nn.Module,
    rgb: np.ndarray,
    core_id: str,
    rule: TileConfig,
    input_size: int | None,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    channels_last: bool = True,
) -> dict[str, np.ndarray]:
    """A core's cache entry: its evaluation bag's embeddings and tile coordinates.

    Tiles are cut, resized and embedded ``batch_size`` at a time, so a full-resolution 5468 px
    core never holds all its float tiles at once. Raises
    :class:`~her2_kedro.modelling.bags.EmptyBagError` for a core without a tissue tile.
    """
    coords = bag_tiles(rgb, core_id, rule)[["x", "y"]].to_numpy(dtype=np.int64)
    parts = []
    for start in range(0, len(coords), batch_size):
        chunk = coords[start : start + batch_size]
        tiles = tiles_to_tensor(rgb, chunk, rule.tile_size, input_size)
        parts.append(embed_tiles(trunk, tiles, device=device, channels_last=channels_last))
    return {"embeddings": torch.cat(parts).numpy(), "coords": coords}


class EmbeddingBagDataset(Dataset):
    """Bags of cached embeddings, one per core of ``rows`` (``core_id`` and the ``target`` column).

    ``entries`` maps each core id to the loader of its cache entry; entries are read once and
    kept (``keep_in_memory``; 512 floats per tile). In training, bags larger than ``max_tiles``
    are cut to a random subset drawn from ``(seed, epoch, index)``, fresh every epoch.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        entries: Mapping[str, EntryLoader],
        *,
        target: str | None,
        train: bool = False,
        max_tiles: int | None = None,
        seed: int = 0,
        keep_in_memory: bool = True,
    ) -> None:
        absent = sorted(set(rows["core_id"].astype(str)) - set(entries))
        if absent:
            raise KeyError(f"no cached embeddings for core(s): {', '.join(absent[:10])}")
        self.core_ids = rows["core_id"].astype(str).tolist()
        self.labels = rows[target].astype(int).tolist() if target else [-1] * len(rows)
        self.entries, self.keep = entries, keep_in_memory
        self.train, self.max_tiles, self.seed, self.epoch = train, max_tiles, int(seed), 0
        self._memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.core_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random subsets the next items use."""
        self.epoch = int(epoch)

    def _entry(self, core_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        if core_id in self._memory:
            return self._memory[core_id]
        entry = self.entries[core_id]()
        pair = (
            torch.from_numpy(np.array(entry["embeddings"], dtype=np.float32)),
            torch.from_numpy(np.array(entry["coords"], dtype=np.int64)),
        )
        if self.keep:
            self._memory[core_id] = pair
        return pair

    def __getitem__(self, index: int) -> Bag:
        core_id = self.core_ids[index]
        embeddings, coords = self._entry(core_id)
        if self.train and self.max_tiles is not None and len(embeddings) > self.max_tiles:
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
            frame = pd.DataFrame({"tissue_fraction": np.zeros(len(embeddings))})
            keep = torch.from_numpy(cap_tiles(frame, self.max_tiles, rng).index.to_numpy(copy=True))
            embeddings, coords = embeddings[keep], coords[keep]
        return Bag(embeddings, coords, self.labels[index], core_id)
