"""The paper's tile rule: a regular grid of full 224 px tiles, kept where tissue covers > 5 %.

Follows the authors' code (bozeklab/HER2-overexpression): tiles of 224x224 with stride 224 from
the top-left corner, partial edge tiles dropped, a pixel is background where its grey level
(0.2989 R + 0.587 G + 0.114 B on 0..255) is above 220, and a tile is kept where its foreground
fraction is strictly greater than 5 %.

The foreground test and the per-tile counts are those of ``imaging.pixels`` (exact integer grey
test on uint8 input; a pixel whose grey is exactly 220 is tissue).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
from pydantic import field_validator

from her2_kedro.config.shared import TileConfig
from her2_kedro.imaging.pixels import (
    check_rgb,
    foreground_mask_fast,
    tile_row_counts,
)

__all__ = [
    "PAPER_RULE",
    "TileRule",
    "all_tiles",
    "foreground_mask_fast",  # re-exported: the pixel rule lives in imaging.pixels
    "iter_tiles",
    "read_tile",
    "tile_fractions",
    "tile_index",
    "tile_index_from_fractions",
    "tile_origins",
]


class TileRule(TileConfig):
    """The tile rule of ``parameters_tiles.yml`` (:class:`TileConfig`, whose defaults are the paper's)
    plus the grid offset, which is a per-call choice (MIL training draws one at random), not a setting.
    """

    offset: tuple[int, int] = (0, 0)  # (x, y) of the first tile's top-left corner

    @field_validator("offset")
    @classmethod
    def _non_negative(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] < 0:
            raise ValueError(f"offset must be non-negative, got {value}")
        return value


def as_rule(rule: TileConfig, offset: tuple[int, int] | None = None) -> TileRule:
    """The :class:`TileRule` of a validated tile config (offset (0, 0) unless given)."""
    if isinstance(rule, TileRule) and offset is None:
        return rule
    values = rule.model_dump()
    if offset is not None:
        values["offset"] = offset
    return TileRule(**values)


#: The paper's rule (224 px tiles, stride 224 from (0, 0), background grey > 220, > 5 % tissue).
PAPER_RULE = TileRule()


def _axis_origins(length: int, size: int, stride: int, start: int) -> np.ndarray:
    """Starts of the full windows of ``size`` along one axis, from ``start`` every ``stride``."""
    if length - start < size:
        return np.zeros(0, dtype=np.int64)
    n = (length - start - size) // stride + 1
    return start + stride * np.arange(n, dtype=np.int64)


def tile_origins(height: int, width: int, rule: TileConfig = PAPER_RULE) -> np.ndarray:
    """Top-left (x, y) of every full tile of the grid, in raster order; partial edge tiles dropped."""
    rule = as_rule(rule)
    xs = _axis_origins(width, rule.tile_size, rule.stride, rule.offset[0])
    ys = _axis_origins(height, rule.tile_size, rule.stride, rule.offset[1])
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def tile_fractions(mask: np.ndarray, origins: np.ndarray, size: int) -> np.ndarray:
    """Fraction of True pixels of a boolean mask in each ``size`` tile at ``origins`` (x, y)."""
    if len(origins) == 0:
        return np.zeros(0, dtype=np.float64)
    x = np.asarray(origins[:, 0], dtype=np.int64)
    y = np.asarray(origins[:, 1], dtype=np.int64)
    # Column sums over each distinct band of rows [y, y + size), then a prefix sum along x.
    rows = np.zeros((mask.shape[0] + 1, mask.shape[1]), dtype=np.int32)
    np.cumsum(mask, axis=0, dtype=np.int32, out=rows[1:])
    band_ys, band_of = np.unique(y, return_inverse=True)
    bands = rows[band_ys + size] - rows[band_ys]
    prefix = np.zeros((len(band_ys), mask.shape[1] + 1), dtype=np.int64)
    np.cumsum(bands, axis=1, out=prefix[:, 1:])
    total = prefix[band_of, x + size] - prefix[band_of, x]
    return total / float(size * size)


def _empty_index() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "core_id": pd.Series([], dtype=str),
            "x": pd.Series([], dtype=np.int32),
            "y": pd.Series([], dtype=np.int32),
            "tissue_fraction": pd.Series([], dtype=np.float32),
        }
    )


def _index_frame(core_id: str, origins: np.ndarray, fractions: np.ndarray) -> pd.DataFrame:
    if len(origins) == 0:
        return _empty_index()
    return pd.DataFrame(
        {
            "core_id": pd.Series([core_id] * len(origins), dtype=str),
            "x": origins[:, 0].astype(np.int32),
            "y": origins[:, 1].astype(np.int32),
            "tissue_fraction": fractions.astype(np.float32),
        }
    )


def all_tiles(
    rgb: np.ndarray, rule: TileConfig = PAPER_RULE, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Origins (n, 2) of every full tile and its foreground fraction, before the tissue filter.

    ``mask`` (the foreground mask, when the caller already has it) avoids recomputing it.
    """
    rule = as_rule(rule)
    check_rgb(rgb)
    height, width = rgb.shape[:2]
    if mask is not None and mask.shape != (height, width):
        raise ValueError(f"mask {mask.shape} does not match the image {rgb.shape[:2]}")
    origins = tile_origins(height, width, rule)
    if len(origins) == 0:
        return origins, np.zeros(0, dtype=np.float64)
    size = rule.tile_size
    area = float(size * size)
    if rule.stride == size:  # non-overlapping, gap-free grid: per-band reshape-sum
        nx = _axis_origins(width, size, size, rule.offset[0]).size
        ny = _axis_origins(height, size, size, rule.offset[1]).size
        counts = np.zeros((ny, nx), dtype=np.int64)
        for j, row in tile_row_counts(
            rgb, size, rule.background_grey, offset=rule.offset, mask=mask
        ):
            counts[j] = row
        return origins, counts.ravel() / area
    if mask is None:
        mask = foreground_mask_fast(rgb, rule.background_grey)
    return origins, tile_fractions(mask, origins, size)


def tile_index_from_fractions(
    core_id: str, origins: np.ndarray, fractions: np.ndarray, rule: TileConfig = PAPER_RULE
) -> pd.DataFrame:
    """Apply the tissue filter (fraction strictly above ``rule.min_tissue``) and build the index."""
    keep = fractions > rule.min_tissue
    return _index_frame(core_id, origins[keep], fractions[keep])


def tile_index(rgb: np.ndarray, core_id: str, rule: TileConfig = PAPER_RULE) -> pd.DataFrame:
    """Kept tiles of one core: columns ``core_id, x, y, tissue_fraction`` (x, y = top-left, px)."""
    origins, fractions = all_tiles(rgb, rule)
    return tile_index_from_fractions(core_id, origins, fractions, rule)


def read_tile(image: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    """The ``size`` x ``size`` tile at top-left (x, y) of an image, as a view (no copy)."""
    x, y = int(x), int(y)
    if x < 0 or y < 0 or y + size > image.shape[0] or x + size > image.shape[1]:
        raise ValueError(f"tile ({x}, {y}, size {size}) leaves the image of shape {image.shape}")
    return image[y : y + size, x : x + size]


def iter_tiles(
    rgb: np.ndarray, index_rows: pd.DataFrame | Iterable[tuple[int, int]], size: int
) -> Iterator[np.ndarray]:
    """Yield the tiles (views) listed by a tile index frame (x, y columns) or (x, y) pairs."""
    if isinstance(index_rows, pd.DataFrame):
        pairs: Iterable[tuple[int, int]] = zip(
            index_rows["x"].to_numpy(), index_rows["y"].to_numpy(), strict=True
        )
    else:
        pairs = index_rows
    for x, y in pairs:
        yield read_tile(rgb, x, y, size)
