"""Batches of tiles from several cores, each tile labelled with its core's label (weak labels).

The features pipeline's default way to train the tile encoder on a CPU: a tile classifier
(trunk + linear head) over mixed batches of ``cores_per_batch`` cores' tiles. Unlike a MIL bag of
one core, a mixed batch gives BatchNorm statistics close to those seen at evaluation, and many
tiles per optimiser step. Tiles come from :class:`~her2_kedro.modelling.bags.BagDataset` (the same
random grid offset, tile subset and flips in training; the full evaluation bag otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from her2_kedro.modelling.bags import BagDataset
from her2_kedro.modelling.sampling import FiveClassSampler

__all__ = ["TileBatch", "TileBatchDataset"]


class TileBatch(NamedTuple):
    """Tiles ``[T, 3, s, s]`` of several cores, one ``label`` per tile, and the cores' ids."""

    tiles: torch.Tensor
    label: torch.Tensor
    core_ids: list[str]


class TileBatchDataset(Dataset):
    """Items are batches of tiles of ``cores_per_batch`` cores (the last group may be smaller).

    In training the cores of each epoch are a class-balanced draw over the five classes
    (:class:`~her2_kedro.modelling.sampling.FiveClassSampler`, fresh every epoch); at evaluation
    every core once, in order. A trailing group of one core in training joins the previous group.
    """

    def __init__(
        self,
        bags: BagDataset,
        five_class: Sequence[str],
        *,
        cores_per_batch: int,
        seed: int = 0,
    ) -> None:
        if cores_per_batch < 1:
            raise ValueError(f"cores_per_batch must be >= 1, got {cores_per_batch}")
        if len(five_class) != len(bags):
            raise ValueError("one five-class label per core is needed")
        self.bags, self.cores_per_batch = bags, int(cores_per_batch)
        self.sampler = FiveClassSampler(list(five_class), seed=seed) if bags.train else None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's groups of cores (and the bags' random offsets, subsets, flips)."""
        self.bags.set_epoch(epoch)
        if self.sampler is None:
            order = list(range(len(self.bags)))
        else:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
        groups = [
            order[i : i + self.cores_per_batch] for i in range(0, len(order), self.cores_per_batch)
        ]
        if self.sampler is not None and len(groups) > 1 and len(groups[-1]) == 1:
            groups[-2].extend(groups.pop())
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> TileBatch:
        bags = [self.bags[i] for i in self.groups[index]]
        labels = np.concatenate([np.full(len(b.tiles), b.label) for b in bags])
        return TileBatch(
            torch.cat([b.tiles for b in bags]),
            torch.from_numpy(labels.astype(np.int64)),
            [b.core_id for b in bags],
        )
