"""Whole TMA cores, downscaled to one square image each, in batches for the ResNet core classifier.

The paper's second CNN sees each whole core scaled down from 5468 x 5468 to 1024 x 1024 px; here
the side is a parameter (``input_size``; small on CPU). Decoding a 5468 px JPEG in full only to
throw away 99% of its pixels is slow, so :func:`decode_downscaled` asks libjpeg to decode at 1/2,
1/4 or 1/8 scale (Pillow's draft mode, which only picks a scale whose result is still at least the
requested size on both sides) and then resizes to exactly ``(size, size)`` with Pillow's
antialiased bilinear filter. Other formats (PNG, TIFF, 16-bit, RGBA, greyscale) are decoded in full
by :func:`~her2_kedro.features.preprocess.decode_rgb` and resized the same way. A non-square core
is stretched to the square (its aspect ratio is not kept), as the paper resized to 1024 x 1024.

:class:`CoreImageDataset` hands the shared training loop (:mod:`her2_kedro.modelling.training`)
one *batch* of cores per item (:class:`CoreBatch`), so the loop's ``DataLoader(batch_size=None)``
takes one optimiser step per batch. Training batches follow a fresh
:class:`~her2_kedro.modelling.sampling.FiveClassSampler` draw each epoch (:meth:`set_epoch`), cut
into ``batch_size`` chunks, with random horizontal and vertical flips per drawn core; evaluation
batches are the cores in row order, without flips. Pixels are scaled to [0, 1] with no mean/std
normalisation (the authors used ``ToTensor`` only).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from her2_kedro.features.preprocess import decode_rgb
from her2_kedro.modelling.bags import Loader, Transform
from her2_kedro.modelling.sampling import FiveClassSampler

__all__ = [
    "CoreBatch",
    "CoreImageDataset",
    "CoreImageError",
    "Transform",
    "decode_downscaled",
]

#: Pillow's antialiased bilinear filter (the filter torch's ``antialias=True`` bilinear copies).
RESAMPLE = Image.Resampling.BILINEAR


class CoreImageError(ValueError):
    """A core image's bytes cannot be decoded (corrupt, truncated or not an image)."""


class CoreBatch(NamedTuple):
    """A batch of whole cores: ``tiles`` float [B, 3, s, s] in [0, 1], ``label`` long [B] (-1 when
    unlabelled) and the ``core_ids`` in the same order. (``tiles`` is the name the training loop
    feeds to the model; here each "tile" is a whole downscaled core.)"""

    tiles: torch.Tensor
    label: torch.Tensor
    core_ids: list[str]


def _resize(image: Image.Image, size: int) -> np.ndarray:
    """``image`` as uint8 RGB of exactly (size, size, 3): converted, stretched to the square."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE)
    return np.array(image)  # a writable copy (np.asarray of a Pillow image is read-only)


def decode_downscaled(data: bytes, size: int) -> np.ndarray:
    """A core image's bytes as uint8 RGB ``(size, size, 3)``, decoded at reduced scale when JPEG.

    JPEG: ``Image.draft("RGB", (size, size))`` makes libjpeg decode at the smallest of 1/1, 1/2,
    1/4, 1/8 scale that is still >= ``size`` on both sides (a 5468 px core to 128 px decodes at
    684 px), then Pillow's antialiased bilinear ``resize`` gives exactly ``(size, size)``. Any other
    format goes through :func:`~her2_kedro.features.preprocess.decode_rgb` (full decode; 16-bit
    images are converted as that function does) and the same resize. The aspect ratio is not kept:
    a non-square core is stretched to the square, as the paper's 1024 x 1024 inputs were.

    Pillow's decompression-bomb limit is left as it is (a 5468 px core is far below it). Raises
    :class:`CoreImageError` (a ``ValueError``) when the bytes cannot be decoded.
    """
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                image.draft("RGB", (size, size))
                return _resize(image, size)
        return _resize(Image.fromarray(decode_rgb(data)), size)
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise CoreImageError(
            f"cannot decode core image ({len(data)} bytes): {type(exc).__name__}: {exc}"
        ) from exc


class CoreImageDataset(Dataset):
    """Batches of whole downscaled cores from core-manifest ``rows``, one :class:`CoreBatch` each.

    ``rows`` need ``core_id``, ``image``, the ``target`` column (``ihc_score`` or ``her2_status``;
    ``None`` for unlabelled cores, labels -1) and, for training, ``five_class``. Labels come from
    the target column only. ``cores`` maps image names to loaders of their bytes (Kedro's
    ``PartitionedDataset``).

    ``train=True``: each epoch (:meth:`set_epoch`) draws ``len(rows)`` cores with a
    :class:`~her2_kedro.modelling.sampling.FiveClassSampler` seeded by ``seed`` and cuts the draw
    into batches of ``batch_size``; a last batch of a single core is merged into the one before
    (BatchNorm cannot train on one sample). With ``flips`` each drawn core is flipped horizontally
    and, independently, vertically with probability 1/2, from a generator seeded by
    ``(seed, epoch, position in the draw)``: epochs differ, reruns repeat, workers do not matter.
    ``train=False``: every core once, in row order, in batches of ``batch_size``, no flips.
    ``len(dataset)`` is the number of batches per epoch.

    ``transform(row, rgb)`` (optional) maps each core's *downscaled* uint8 RGB to a new uint8 RGB of
    the same shape; ``row`` is the core's row as a dict. It runs after downscaling because that is
    far cheaper: for stain normalisation, give it stain vectors estimated at full scale (its
    per-pixel map then applies unchanged). The result is close to, not identical with, normalising
    at full scale and downscaling after: resizing averages pixels and the map is non-linear
    (optical density), and a normaliser that estimates its own statistics from the image would see
    the downscaled pixels.

    ``cache=True`` keeps each core's downscaled (and transformed) uint8 image in memory, so a core
    is decoded once per run (3 * s * s bytes a core: about 150 MB for 1000 cores at 224 px). With
    DataLoader worker processes each worker fills its own copy, lost when the epoch's workers end;
    the cache pays off with ``num_workers=0`` (or persistent workers, which the epoch seeding here
    does not need but the loop does not use).
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        cores: Mapping[str, Loader],
        *,
        target: str | None,
        input_size: int,
        train: bool,
        seed: int,
        batch_size: int,
        flips: bool = True,
        transform: Transform | None = None,
        cache: bool = True,
    ) -> None:
        needed = ["core_id", "image"] + ([target] if target else []) + (["five_class"] * train)
        missing = [c for c in needed if c not in rows.columns]
        if missing:
            raise KeyError(f"core rows lack column(s) {missing}")
        absent = sorted(set(rows["image"].astype(str)) - set(cores))
        if absent:
            raise KeyError(f"core image(s) not among the loaded cores: {', '.join(absent[:10])}")
        if int(input_size) < 8:
            raise ValueError(f"input_size must be >= 8, got {input_size}")
        if int(batch_size) < (2 if train else 1):
            raise ValueError(
                f"batch_size must be >= {2 if train else 1} (training batches of one core break "
                f"BatchNorm), got {batch_size}"
            )
        if train and len(rows) < 2:
            raise ValueError(f"{len(rows)} training core(s): training needs at least 2")
        if target and rows[target].isna().any():
            unlabelled = rows.loc[rows[target].isna(), "core_id"].astype(str).tolist()
            raise ValueError(f"core(s) without {target!r}: {', '.join(unlabelled[:10])}")
        self.core_ids = rows["core_id"].astype(str).tolist()
        self.images = rows["image"].astype(str).tolist()
        self.labels = (
            rows[target].astype(int).to_numpy(np.int64) if target else np.full(len(rows), -1)
        )
        self.records = rows.to_dict("records") if transform is not None else None
        self.cores, self.transform = cores, transform
        self.input_size, self.batch_size = int(input_size), int(batch_size)
        self.train, self.flips, self.seed = bool(train), bool(flips), int(seed)
        self.sampler = (
            FiveClassSampler(rows["five_class"].astype(str).tolist(), seed=self.seed)
            if self.train
            else None
        )
        self.cache: dict[int, np.ndarray] | None = {} if cache else None
        self.epoch = 0
        self._plan: list[list[tuple[int, int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw (training order, flips) the next batches use."""
        self.epoch = int(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        self._plan = None

    def plan(self) -> list[list[tuple[int, int]]]:
        """This epoch's batches as lists of ``(position in the draw, row index)``."""
        if self._plan is None:
            order = list(self.sampler) if self.sampler is not None else range(len(self.core_ids))
            pairs = list(enumerate(int(i) for i in order))
            batches = [
                pairs[i : i + self.batch_size] for i in range(0, len(pairs), self.batch_size)
            ]
            if self.train and len(batches) > 1 and len(batches[-1]) == 1:
                batches[-2].extend(batches.pop())
            self._plan = batches
        return self._plan

    def __len__(self) -> int:
        return len(self.plan())

    def image(self, row: int) -> np.ndarray:
        """Row ``row``'s core as downscaled (and transformed) uint8 RGB ``(s, s, 3)``, cached."""
        if self.cache is not None and row in self.cache:
            return self.cache[row]
        try:
            rgb = decode_downscaled(self.cores[self.images[row]](), self.input_size)
        except CoreImageError as exc:
            raise CoreImageError(
                f"core {self.core_ids[row]!r} ({self.images[row]}): {exc}"
            ) from exc
        if self.transform is not None:
            rgb = self._transformed(row, rgb)
        if self.cache is not None:
            rgb.setflags(write=False)
            self.cache[row] = rgb
        return rgb

    def _transformed(self, row: int, rgb: np.ndarray) -> np.ndarray:
        out = np.asarray(self.transform(dict(self.records[row]), rgb))
        if out.shape != rgb.shape or out.dtype != np.uint8:
            raise ValueError(
                f"core {self.core_ids[row]!r}: transform returned {out.dtype} {out.shape}, "
                f"expected uint8 {rgb.shape}"
            )
        return out

    def flips_of(self, position: int) -> tuple[bool, bool]:
        """(horizontal, vertical) flips of the core at ``position`` of this epoch's draw."""
        if not (self.train and self.flips):
            return (False, False)
        h, v = np.random.default_rng([self.seed, self.epoch, int(position)]).random(2) < 0.5
        return bool(h), bool(v)

    def __getitem__(self, index: int) -> CoreBatch:
        plan = self.plan()
        if not 0 <= index < len(plan):
            raise IndexError(f"batch {index} of {len(plan)}")
        tiles = torch.empty((len(plan[index]), 3, self.input_size, self.input_size))
        for k, (position, row) in enumerate(plan[index]):
            core = torch.from_numpy(self.image(row).copy()).permute(2, 0, 1)
            horizontal, vertical = self.flips_of(position)
            if horizontal:
                core = core.flip(-1)
            if vertical:
                core = core.flip(-2)
            tiles[k] = core.float().div_(255.0)
        rows = [row for _, row in plan[index]]
        label = torch.from_numpy(self.labels[rows].astype(np.int64))
        return CoreBatch(tiles, label, [self.core_ids[r] for r in rows])
