"""TMA dearraying: find cores on a thumbnail, fit a rotated grid, extract cores at level 0.

Only the thumbnail (``DearrayConfig.thumbnail_max_side`` on its long side) and one core at a
time are ever held in memory, so slides of any size dearray in bounded memory.

Pipeline (``dearray_slide``): blobs of the thumbnail's tissue mask (``tma.detect``) give the
grid's rotation, pitches and labels (``tma.grid.fit_grid``); then every node of that grid is
checked on a second, fainter tissue mask (``tma.refine``). Labels follow ``tma.grid_labels``;
``tma.grid.anchor_to_positions`` re-anchors them to a slide map.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from her2_kedro.config.ingestion import DearrayConfig
from her2_kedro.config.shared import TileConfig
from her2_kedro.tma.detect import CoreCandidates, detect_cores
from her2_kedro.tma.grid import (
    Anchoring,
    DearrayResult,
    GridCore,
    anchor_to_positions,
    core_box,
    fit_grid,
)
from her2_kedro.tma.grid_labels import canonical_label, grid_label, parse_grid_label
from her2_kedro.tma.refine import refine_on_tissue
from her2_kedro.tma.wsi import SlideReader

__all__ = [
    "Anchoring",
    "CoreCandidates",
    "DearrayConfig",
    "DearrayResult",
    "GridCore",
    "anchor_to_positions",
    "canonical_label",
    "core_box",
    "dearray_slide",
    "detect_cores",
    "extract_core",
    "fit_grid",
    "grid_label",
    "iter_cores",
    "parse_grid_label",
]


def dearray_slide(
    reader: SlideReader, params: DearrayConfig, tiles: TileConfig | None = None
) -> DearrayResult:
    """Dearray a TMA slide from its thumbnail only (no full-resolution reads).

    Blobs give the grid (rotation, pitches, labels); then every grid node is checked on the
    thumbnail's tissue mask so cores that blob detection lost or mis-centred are recovered.
    ``tiles.background_grey`` is the glass level of the tissue mask.
    """
    tiles = tiles or TileConfig()
    thumb, ds = reader.thumbnail(params.thumbnail_max_side)
    cand = detect_cores(thumb, params, ds, tiles.background_grey)
    del thumb
    result = fit_grid(cand.xy, cand.diameter_px, params, cand.area)
    result.rejected = cand.rejected + result.rejected
    return refine_on_tissue(result, cand.tissue, cand.downsample, params)


def extract_core(reader: SlideReader, core: GridCore, params: DearrayConfig) -> np.ndarray:
    """Read only this core's square box at level 0 (white-padded at slide edges)."""
    x0, y0, side = core_box(core, params)
    return reader.read_region((x0, y0), 0, (side, side))


def iter_cores(
    reader: SlideReader, result: DearrayResult, params: DearrayConfig
) -> Iterator[tuple[GridCore, np.ndarray]]:
    """Yield (core, RGB image) one at a time so only one core is in memory."""
    for core in result.cores:
        yield core, extract_core(reader, core, params)
