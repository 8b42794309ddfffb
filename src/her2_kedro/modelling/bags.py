"""MIL tile bags cut on demand from accepted core images (no tile files), with the paper's augmentation.

One item per core: the core's bytes are loaded through a mapping ``image name -> callable returning
bytes`` (what Kedro's ``PartitionedDataset`` gives), decoded with
:func:`~her2_kedro.features.preprocess.decode_rgb`, tiled by the project's tile rule
(:mod:`her2_kedro.imaging.tiling`: same grid, same grey/foreground test, same > ``min_tissue``
filter) and discarded, so one decoded core is held at a time.

Evaluation bags are the tile index of the core (offset (0, 0), no flips, every kept tile unless
``eval_max_tiles`` is set). Training bags follow the authors' code: a random tile-grid offset in
[0, tile_size) on x and y per core and epoch, the tiles kept by the same tissue rule under that
offset, and random horizontal / vertical flips per tile; optionally (``stain_jitter``, off by default,
beyond the paper) each training tile's haematoxylin, eosin and DAB are scaled and shifted at random
in optical density (Tellez et al. 2018), so a model leans less on one lab's stain. Tiles are scaled to [0, 1] with no mean/std
normalisation (the authors used ``ToTensor`` only) and resized to ``input_size`` with torch's
bilinear ``F.interpolate(antialias=True)``.

Randomness is drawn from a generator seeded by ``(seed, epoch, item index)``: every epoch differs
(call :meth:`BagDataset.set_epoch` before iterating), a rerun with the same seed repeats exactly,
and the result does not depend on DataLoader workers or the order items are read in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from her2_kedro.config.mil import BagConfig
from her2_kedro.config.shared import TileConfig
from her2_kedro.features.preprocess import decode_rgb
from her2_kedro.imaging.stain import separation_matrix, stain_matrix
from her2_kedro.imaging.tiling import PAPER_RULE, as_rule, read_tile, tile_index

__all__ = [
    "Bag",
    "BagDataset",
    "EmptyBagError",
    "bag_tiles",
    "cap_tiles",
    "random_flips",
    "random_stain_jitter",
    "tiles_to_tensor",
]

Loader = Callable[[], bytes]
#: ``transform(row, rgb) -> rgb`` applied to each decoded core (e.g. stain normalisation of a cohort).
Transform = Callable[[Mapping[str, Any], np.ndarray], np.ndarray]
#: Tiles converted and resized at once (bounds the float32 temporaries at full tile size).
_CHUNK = 64


class EmptyBagError(ValueError):
    """A core has no tile with enough tissue, so it has no bag."""


class Bag(NamedTuple):
    """One core as a bag: ``tiles`` float [N, 3, s, s] in [0, 1], ``coords`` int64 [N, 2] (x, y of
    each tile's top-left corner at level 0), the integer ``label`` (-1 when unlabelled), ``core_id``."""

    tiles: torch.Tensor
    coords: torch.Tensor
    label: int
    core_id: str


def bag_tiles(
    rgb: np.ndarray, core_id: str, rule: TileConfig, offset: tuple[int, int] = (0, 0)
) -> pd.DataFrame:
    """Kept tiles (``tile_index`` rows) of a core under a grid ``offset``, falling back to (0, 0).

    An offset grid can miss a small core's tissue; the (0, 0) grid is then used. Raises
    :class:`EmptyBagError` naming the core when even that has no tile above ``min_tissue``.
    """
    index = tile_index(rgb, core_id, as_rule(rule, offset))
    if index.empty and tuple(offset) != (0, 0):
        index = tile_index(rgb, core_id, as_rule(rule, (0, 0)))
    if index.empty:
        raise EmptyBagError(
            f"core {core_id!r} has no tile with tissue fraction > {rule.min_tissue} "
            f"({rule.tile_size} px tiles, background grey > {rule.background_grey}): no bag"
        )
    return index


def cap_tiles(
    index: pd.DataFrame, max_tiles: int | None, rng: np.random.Generator | None
) -> pd.DataFrame:
    """At most ``max_tiles`` rows of a tile index, kept in their (raster) order.

    With ``rng`` a uniform random subset (training); without, the most tissue-rich tiles, ties
    broken by raster order (a deterministic evaluation cap).
    """
    if max_tiles is None or len(index) <= max_tiles:
        return index
    if rng is not None:
        keep = np.sort(rng.choice(len(index), size=max_tiles, replace=False))
    else:
        order = np.argsort(-index["tissue_fraction"].to_numpy(), kind="stable")
        keep = np.sort(order[:max_tiles])
    return index.iloc[keep]


def tiles_to_tensor(
    rgb: np.ndarray, coords: np.ndarray, tile_size: int, input_size: int | None
) -> torch.Tensor:
    """The tiles at ``coords`` (x, y) as float [N, 3, s, s] in [0, 1], resized to ``input_size``.

    Resizing is torch bilinear with antialiasing (``align_corners=False``); done in chunks so the
    float copy of a whole 5468 px core at full tile size is never made when downscaling.
    """
    side = tile_size if input_size is None else int(input_size)
    out = torch.empty((len(coords), 3, side, side), dtype=torch.float32)
    for start in range(0, len(coords), _CHUNK):
        chunk = coords[start : start + _CHUNK]
        stack = np.stack([read_tile(rgb, x, y, tile_size) for x, y in chunk])
        batch = torch.from_numpy(stack).permute(0, 3, 1, 2).float().div_(255.0)
        if side != tile_size:
            batch = F.interpolate(
                batch, size=(side, side), mode="bilinear", antialias=True, align_corners=False
            ).clamp_(0.0, 1.0)
        out[start : start + len(chunk)] = batch
    return out


#: The project's default H, E, DAB colour deconvolution (scikit-image's matrices): row-vector
#: concentrations ``od @ _HED_FROM_RGB`` and back ``hed @ _RGB_FROM_HED``.
_HED_FROM_RGB = torch.from_numpy(separation_matrix().astype(np.float32))
_RGB_FROM_HED = torch.from_numpy(stain_matrix().T.astype(np.float32))
_LOG_FLOOR = float(np.log(1e-6))  # scikit-image's rgb2hed unit: ln(I) / ln(1e-6)


def random_stain_jitter(
    tiles: torch.Tensor, rng: np.random.Generator, sigma: float
) -> torch.Tensor:
    """Each tile's H, E and DAB concentrations (scikit-image ``rgb2hed`` units) scaled by
    ``1 + U(-sigma, sigma)`` and shifted by ``U(-sigma, sigma)``, per tile and stain, then
    recomposed to RGB in [0, 1]. ``sigma = 0`` returns the tiles unchanged."""
    if sigma <= 0 or len(tiles) == 0:
        return tiles
    n = len(tiles)
    scale = torch.from_numpy(1.0 + rng.uniform(-sigma, sigma, (n, 1, 1, 3)).astype(np.float32))
    shift = torch.from_numpy(rng.uniform(-sigma, sigma, (n, 1, 1, 3)).astype(np.float32))
    rgb = tiles.permute(0, 2, 3, 1).clamp(min=1e-6)
    hed = (torch.log(rgb) / _LOG_FLOOR) @ _HED_FROM_RGB
    hed = hed * scale + shift  # unclamped, so that scale 1 and shift 0 give the tile back exactly
    out = torch.exp((hed * _LOG_FLOOR) @ _RGB_FROM_HED).clamp(0.0, 1.0)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flips(tiles: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each tile flipped horizontally and, independently, vertically with probability 1/2."""
    horizontal = torch.from_numpy(rng.random(len(tiles)) < 0.5)
    vertical = torch.from_numpy(rng.random(len(tiles)) < 0.5)
    tiles = tiles.clone()
    if horizontal.any():
        tiles[horizontal] = tiles[horizontal].flip(-1)
    if vertical.any():
        tiles[vertical] = tiles[vertical].flip(-2)
    return tiles


class BagDataset(Dataset):
    """Bags of tiles, one per core of ``rows`` (core manifest rows: ``core_id``, ``image``, target).

    ``cores`` maps image names to loaders of their bytes. ``target`` names the label column
    (``ihc_score`` or ``her2_status``; ``None`` for unlabelled cores, label -1). ``train`` switches
    the augmentation on (random offset, random cap subset, flips, as ``config`` allows); evaluation
    bags are the core's tile index at offset (0, 0). Used with ``DataLoader(batch_size=None)`` (one
    bag per step). With worker processes, call :meth:`set_epoch` before each epoch's iterator is
    made and do not use ``persistent_workers`` (their copies would keep the old epoch).
    ``transform(row, rgb)`` (optional) is applied to each decoded core before tiling, with the
    core's manifest row (stain normalisation of evaluation-only cohorts).
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        cores: Mapping[str, Loader],
        *,
        target: str | None,
        rule: TileConfig = PAPER_RULE,
        config: BagConfig | None = None,
        train: bool = False,
        seed: int = 0,
        transform: Transform | None = None,
    ) -> None:
        needed = ["core_id", "image"] + ([target] if target else [])
        missing = [c for c in needed if c not in rows.columns]
        if missing:
            raise KeyError(f"bag rows lack column(s) {missing}")
        absent = sorted(set(rows["image"]) - set(cores))
        if absent:
            raise KeyError(f"core image(s) not among the loaded cores: {', '.join(absent[:10])}")
        self.rows = rows.to_dict("records")
        self.transform = transform
        self.core_ids = rows["core_id"].astype(str).tolist()
        self.images = rows["image"].astype(str).tolist()
        self.labels = rows[target].astype(int).tolist() if target else [-1] * len(rows)
        self.cores, self.rule = cores, as_rule(rule, (0, 0))
        self.config = config or BagConfig()
        self.train, self.seed, self.epoch = bool(train), int(seed), 0

    def __len__(self) -> int:
        return len(self.core_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws (offsets, subsets, flips) the next items use."""
        self.epoch = int(epoch)

    def item_rng(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch (seeded by seed, epoch, index)."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def _draw_offset(self, rng: np.random.Generator) -> tuple[int, int]:
        if not (self.train and self.config.random_offset):
            return (0, 0)
        x, y = rng.integers(0, self.rule.tile_size, size=2)
        return int(x), int(y)

    def item_offset(self, index: int) -> tuple[int, int]:
        """The grid offset drawn for item ``index`` this epoch (before the empty-bag fallback)."""
        return self._draw_offset(self.item_rng(index))

    def __getitem__(self, index: int) -> Bag:
        core_id = self.core_ids[index]
        rng = self.item_rng(index)
        offset = self._draw_offset(rng)
        rgb = decode_rgb(self.cores[self.images[index]]())
        if self.transform is not None:
            rgb = self.transform(self.rows[index], rgb)
        kept = bag_tiles(rgb, core_id, self.rule, offset)
        if self.train:
            kept = cap_tiles(kept, self.config.max_tiles, rng)
        else:
            kept = cap_tiles(kept, self.config.eval_max_tiles, None)
        coords = kept[["x", "y"]].to_numpy(dtype=np.int64, copy=True)
        tiles = tiles_to_tensor(rgb, coords, self.rule.tile_size, self.config.input_size)
        del rgb  # one decoded core at a time
        if self.train and self.config.flips:
            tiles = random_flips(tiles, rng)
        if self.train and self.config.stain_jitter > 0:
            tiles = random_stain_jitter(tiles, rng, self.config.stain_jitter)
        return Bag(tiles, torch.from_numpy(coords), self.labels[index], core_id)
