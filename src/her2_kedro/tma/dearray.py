"""TMA dearraying: find cores on a thumbnail, fit a rotated grid, extract cores at level 0.

Only the thumbnail (``DearrayConfig.thumbnail_max_side`` on its long side) and one core at a
time are ever held in memory, so slides of any size dearray in bounded memory.

Pipeline (``dearray_slide``): blobs of the thumbnail's tissue mask (``tma.detect``) give the
grid's rotation, pitches and labels (``tma.grid.fit_grid``); when that grid is off the lattice
that the autocorrelation of the faint tissue mask shows (``tma.lattice.lattice_on_tissue``), as
when many cores are cut into pieces, the grid is fitted again on that lattice; unless given,
the core diameter is then measured on the tissue around the grid's nodes, where the pieces of a
core that lumens cut apart are bridged (``tma.refine.diameter_on_grid``; the grid is refitted when the blob estimate
was far off); then every node of that grid is checked on a second, fainter tissue mask
(``tma.refine``). Labels follow ``tma.grid_labels``;
``tma.anchoring.anchor_to_positions`` re-anchors them to a slide map.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from her2_kedro.config.ingestion import DearrayConfig
from her2_kedro.config.shared import TileConfig
from her2_kedro.tma.anchoring import Anchoring, anchor_to_positions
from her2_kedro.tma.detect import CoreCandidates, detect_cores
from her2_kedro.tma.grid import (
    DearrayResult,
    GridCore,
    core_box,
    fit_grid,
)
from her2_kedro.tma.grid_labels import canonical_label, grid_label, parse_grid_label
from her2_kedro.tma.lattice import lattice_on_tissue
from her2_kedro.tma.refine import diameter_on_grid, refine_on_tissue
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
    result = _fit_grid_measured(cand, params)
    result.rejected = cand.rejected + result.rejected
    return refine_on_tissue(result, cand.tissue, cand.downsample, params)


def _fit_grid_measured(cand: CoreCandidates, params: DearrayConfig) -> DearrayResult:
    """Fit the grid to the blobs; without a given diameter, measure it around the grid's nodes.

    When more than about half the cores are cut into pieces (lumens opening onto the glass),
    the blobs' neighbour distances and directions are those of the pieces and the grid comes
    out at the wrong scale or angle. The autocorrelation of the tissue mask shows the lattice
    however the cores are cut (``tma.lattice.lattice_on_tissue``): when the blob grid is off it
    (``Lattice.differs``), the grid is fitted again with that rotation and those pitches, and
    every later fit keeps them. Where the blob grid agrees, it stands as it is.

    Blob areas underestimate cores that lumens or pale stroma cut apart (real cores: only
    24-47 % of a core is darker than the grey-220 rule), and with too small a diameter the grid
    fit may take the pieces of a core for neighbouring cores. So the diameter is measured on
    the tissue around the fitted grid's nodes (``tma.refine.diameter_on_grid``); when that
    differs from the blob estimate by more than 10 % the grid is fitted again with it, and the
    diameter is measured again on that grid.
    """
    result = fit_grid(cand.xy, cand.diameter_px, params, cand.area)
    lattice = lattice_on_tissue(cand.tissue, cand.downsample, cand.diameter_px)
    if lattice is not None and lattice.differs(
        result.rotation_deg, result.pitch_x_px, result.pitch_y_px
    ):
        result = fit_grid(cand.xy, cand.diameter_px, params, cand.area, lattice)
    else:
        lattice = None
    if params.core_diameter_px is not None:
        return result
    d = diameter_on_grid(result, cand.tissue, cand.downsample)
    if d is None:
        return result
    if abs(d - cand.diameter_px) > 0.1 * cand.diameter_px:
        refit = fit_grid(cand.xy, d, params, cand.area, lattice)
        d = diameter_on_grid(refit, cand.tissue, cand.downsample) or d
        result = refit
    result.diameter_px = d
    for core in result.cores:
        core.diameter = d
    return result


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
