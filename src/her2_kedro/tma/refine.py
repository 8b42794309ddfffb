"""Checking every node of a fitted grid on the thumbnail's tissue mask (a core-sized matched filter).

Finds cores that blob detection lost or mis-centred -- a touching pair merged into one off-grid
blob, a core cut by lumens that open onto the glass into pieces each below ``min_area_fraction``,
a pale core above ``background_grey`` -- centres each core on its punch (not on the centroid of a
torn rim), folds the pieces of a core back into it instead of reporting them as debris, and
extends an inferred grid by an edge row/column whose cores were all lost.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError, cKDTree

from her2_kedro.config.ingestion import DearrayConfig
from her2_kedro.tma.grid import (
    DearrayResult,
    GridCore,
    core_box,
    from_grid_frame,
    missing_labels,
    to_grid_frame,
)
from her2_kedro.tma.grid_labels import grid_label

__all__ = ["diameter_on_grid", "refine_on_tissue"]


_CORNERS = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])


def _grid_origin(result: DearrayResult, theta: float, px: float, py: float) -> tuple[float, float]:
    """Grid-frame position of node (0, 0): the median over the found cores."""
    uv = to_grid_frame(np.array([(k.cx, k.cy) for k in result.cores], np.float64), theta)
    rows = np.array([k.row for k in result.cores], dtype=np.float64)
    cols = np.array([k.col for k in result.cores], dtype=np.float64)
    return (
        float(np.median(uv[:, 0] - cols * px)),
        float(np.median(uv[:, 1] - rows * py)),
    )


def diameter_on_grid(
    result: DearrayResult, tissue: np.ndarray | None, downsample: float
) -> float | None:
    """Core diameter (level-0 px) from the tissue around the fitted grid's occupied nodes.

    Lumens and pale stroma that run out to the rim cut a core into pieces, so the area of a
    tissue component underestimates the punch; the pieces still lie around one grid node. Every
    component of the tissue mask goes to its nearest node of the fitted lattice (components wider
    than a pitch, such as a touching pair, and specks under 1 % of a grid cell are left out), and
    the convex hull of a node's components, which bridges the glass between the pieces, gives
    that core's diameter (of the disk of the hull's area). The median over the nodes that hold a
    core of the grid fit is the estimate; None without a grid or tissue.
    """
    if tissue is None or not result.cores or downsample <= 0:
        return None
    ds = float(downsample)
    px = (result.pitch_x_px or result.pitch_px) / ds
    py = (result.pitch_y_px or result.pitch_px) / ds
    if px <= 2 or py <= 2:
        return None
    theta = math.radians(result.rotation_deg)
    au, av = _grid_origin(result, theta, px * ds, py * ds)
    lab, n = ndi.label(tissue)
    if n == 0:
        return None
    edge = tissue & ~ndi.binary_erosion(tissue)
    occupied = {(k.row, k.col) for k in result.cores}
    members: dict[tuple[int, int], list[np.ndarray]] = {}
    min_area = 0.01 * px * py
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        rr, cc = np.nonzero(lab[sl] == k)
        if rr.size < min_area or max(h, w) > 1.1 * max(px, py):
            continue
        # level-0 centroid in the grid's frame, then its nearest lattice node
        xy = np.array(
            [[(cc.mean() + sl[1].start + 0.5) * ds, (rr.mean() + sl[0].start + 0.5) * ds]]
        )
        u, v = to_grid_frame(xy, theta)[0]
        node = (int(round((v - av) / (py * ds))), int(round((u - au) / (px * ds))))
        if node in occupied:
            # the outline's pixel corners span the hull of the whole pixels
            er, ec = np.nonzero((lab[sl] == k) & edge[sl])
            rc = np.stack([er + sl[0].start, ec + sl[1].start], axis=1).astype(np.float64)
            members.setdefault(node, []).append((rc[:, None, :] + _CORNERS).reshape(-1, 2))
    diameters = []
    for pieces in members.values():
        try:
            area = ConvexHull(np.concatenate(pieces)).volume
        except QhullError:  # degenerate (fewer than three distinct, non-collinear points)
            continue
        diameters.append(2.0 * math.sqrt(area / math.pi))
    if not diameters:
        return None
    return float(np.median(diameters) * ds)


class _NodeProbe:
    """Best core-sized disk near a grid node on the tissue mask (a matched filter).

    The score of a disk position is the tissue fraction inside the disk minus half the tissue
    fraction of a thin ring just outside it, so it peaks where a core of the fitted diameter
    sits, however its inside is broken up by lumens or tears, and a touching neighbour (outside
    the disk) hardly pulls it. The score map is one FFT convolution of the thumbnail-sized mask
    (float32); positions are searched within ``radius`` of a node.
    """

    def __init__(self, tissue: np.ndarray, d_t: float, radius: float) -> None:
        self.tissue = tissue
        r_in = d_t / 2.0
        ring = max(1.5, 0.12 * d_t)
        half = int(math.ceil(r_in + ring))
        yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
        rr = np.hypot(yy, xx)
        inner = rr <= r_in
        outer = (rr > r_in) & (rr <= r_in + ring)
        kernel = inner / inner.sum() - 0.5 * outer / outer.sum()
        from scipy.signal import fftconvolve  # here: scipy.signal costs ~1 s at every Kedro start

        self.score = fftconvolve(tissue.astype(np.float32), kernel.astype(np.float32), mode="same")
        self.disk = inner
        self.half = half
        self.radius = float(radius)
        self.eps = 1.0 / (math.pi * max(r_in, 1.0))  # about a one-pixel step of the score

    def fraction(self, r: int, c: int) -> float:
        """Tissue fraction of the core-sized disk centred on thumbnail pixel (r, c)."""
        h, w = self.tissue.shape
        k = self.half
        ys, ye, xs, xe = max(0, r - k), min(h, r + k + 1), max(0, c - k), min(w, c + k + 1)
        if ys >= ye or xs >= xe:
            return 0.0
        sub = self.tissue[ys:ye, xs:xe]
        dsk = self.disk[ys - (r - k) : ye - (r - k), xs - (c - k) : xe - (c - k)]
        return float(np.count_nonzero(sub & dsk)) / float(self.disk.sum())

    def __call__(self, rc: tuple[float, float]) -> tuple[float, float, float] | None:
        """(tissue fraction, row, col) of the best disk near thumbnail position rc, or None."""
        h, w = self.tissue.shape
        rad = self.radius
        ys, ye = max(0, int(math.floor(rc[0] - rad))), min(h, int(math.ceil(rc[0] + rad)) + 1)
        xs, xe = max(0, int(math.floor(rc[1] - rad))), min(w, int(math.ceil(rc[1] + rad)) + 1)
        if ys >= ye or xs >= xe:
            return None
        rows = np.arange(ys, ye, dtype=np.float64)[:, None]
        cols = np.arange(xs, xe, dtype=np.float64)[None, :]
        dist = np.hypot(rows - rc[0], cols - rc[1])
        within = dist <= rad
        if not within.any():
            return None
        score = np.where(within, self.score[ys:ye, xs:xe] - 0.02 * dist / max(rad, 1.0), -np.inf)
        best = np.unravel_index(int(np.argmax(score)), score.shape)
        plateau, _ = ndi.label(score >= score[best] - self.eps)
        sel = plateau == plateau[best]
        wts = score[sel] - (score[best] - self.eps) + 1e-9
        r = float(np.average(np.broadcast_to(rows, sel.shape)[sel], weights=wts))
        c = float(np.average(np.broadcast_to(cols, sel.shape)[sel], weights=wts))
        return self.fraction(int(best[0]) + ys, int(best[1]) + xs), r, c


class _GridNodes:
    """The core on each node (i, j) of the fitted lattice, found on the tissue mask; cached.

    A node holds a core when its best core-sized disk (``_NodeProbe``) has at least
    ``min_area_fraction`` tissue: the core is centred on that disk. Otherwise a blob the grid fit
    placed on the node stands; else the node is empty. Indices may lie outside the fitted grid.
    """

    def __init__(
        self, result: DearrayResult, tissue: np.ndarray, downsample: float, params: DearrayConfig
    ) -> None:
        self.ds = float(downsample)
        self.px = result.pitch_x_px or result.pitch_px
        self.py = result.pitch_y_px or result.pitch_px
        self.theta = math.radians(result.rotation_deg)
        self.min_fraction = params.min_area_fraction
        self.au, self.av = self._origin(result)
        radius = params.max_offgrid * min(self.px, self.py) / self.ds
        self.probe = _NodeProbe(tissue, result.diameter_px / self.ds, radius)
        self.blob = {(k.row, k.col): k for k in result.cores}
        self.cache: dict[tuple[int, int], tuple[float, float] | None] = {}

    def _origin(self, result: DearrayResult) -> tuple[float, float]:
        return _grid_origin(result, self.theta, self.px, self.py)

    def __call__(self, i: int, j: int) -> tuple[float, float] | None:
        """Level-0 centre of the core on node (i, j) (lattice indices), or None."""
        if (i, j) not in self.cache:
            self.cache[(i, j)] = self._find(i, j)
        return self.cache[(i, j)]

    def _find(self, i: int, j: int) -> tuple[float, float] | None:
        ds = self.ds
        x, y = from_grid_frame(self.au + j * self.px, self.av + i * self.py, self.theta)
        found = self.probe((y / ds - 0.5, x / ds - 0.5))
        if found is not None and found[0] >= self.min_fraction:
            return (found[2] + 0.5) * ds, (found[1] + 0.5) * ds
        if (i, j) in self.blob:
            return self.blob[(i, j)].cx, self.blob[(i, j)].cy
        return None


def _grown_extent(
    nodes: _GridNodes, n_rows: int, n_cols: int, params: DearrayConfig
) -> tuple[int, int, int, int]:
    """Row and column range (r0, r1, c0, c1) of the grid, grown by edge lines holding cores.

    Only along an axis whose size is inferred (``n_rows``/``n_cols`` not given); capped at
    10 000 nodes.
    """
    r0, r1, c0, c1 = 0, n_rows, 0, n_cols
    grew = True
    while grew and (r1 - r0) * (c1 - c0) < 10_000:
        grew = False
        if params.n_rows is None:
            if any(nodes(r0 - 1, j) for j in range(c0, c1)):
                r0, grew = r0 - 1, True
            if any(nodes(r1, j) for j in range(c0, c1)):
                r1, grew = r1 + 1, True
        if params.n_cols is None:
            if any(nodes(i, c0 - 1) for i in range(r0, r1)):
                c0, grew = c0 - 1, True
            if any(nodes(i, c1) for i in range(r0, r1)):
                c1, grew = c1 + 1, True
    return r0, r1, c0, c1


def _pieces_dropped(
    rejected: list[tuple[str, float, float]],
    cores: list[GridCore],
    diameter: float,
    params: DearrayConfig,
) -> list[tuple[str, float, float]]:
    """Rejected blobs that are not pieces of a found core (near its centre or in its box)."""
    if not cores:
        return list(rejected)
    centres = cKDTree(np.array([(k.cx, k.cy) for k in cores]))
    boxes = [core_box(k, params) for k in cores]
    kept = []
    for reason, x, y in rejected:
        dist, _ = centres.query((x, y))
        near = reason in ("debris", "duplicate", "off-grid") and dist < 0.6 * diameter
        boxed = any(bx <= x < bx + side and by <= y < by + side for bx, by, side in boxes)
        if near or boxed:
            continue  # a piece of a found core: it lies in that core's extracted image
        kept.append((reason, x, y))
    return kept


def refine_on_tissue(
    result: DearrayResult, tissue: np.ndarray | None, downsample: float, params: DearrayConfig
) -> DearrayResult:
    """Check every node of the fitted grid on the tissue mask and centre its core there.

    A node whose best core-sized disk holds at least ``min_area_fraction`` tissue has a core,
    centred on that disk, even when blob detection lost it (a touching pair merged into one
    blob, a core broken by lumens into pieces each too small, a pale core); its pieces are
    dropped from the rejected list. Nodes with a blob but no such disk keep the blob. When the
    grid size is inferred, a row or column just outside the grid holding cores extends it.
    """
    if tissue is None or not result.cores or downsample <= 0:
        return result
    px = result.pitch_x_px or result.pitch_px
    py = result.pitch_y_px or result.pitch_px
    if result.diameter_px / float(downsample) < 4 or px <= 0 or py <= 0:
        return result
    nodes = _GridNodes(result, tissue, downsample, params)
    r0, r1, c0, c1 = _grown_extent(nodes, result.n_rows, result.n_cols, params)
    cores: list[GridCore] = []
    for i in range(r0, r1):
        for j in range(c0, c1):
            xy = nodes(i, j)
            if xy is not None:
                label = grid_label(i - r0, j - c0, params)
                cores.append(
                    GridCore(label, i - r0, j - c0, float(xy[0]), float(xy[1]), result.diameter_px)
                )
    occupied = {(k.row, k.col) for k in cores}
    result.missing = missing_labels(r1 - r0, c1 - c0, occupied, params)
    result.rejected = _pieces_dropped(result.rejected, cores, result.diameter_px, params)
    result.cores = cores
    result.n_rows, result.n_cols = r1 - r0, c1 - c0
    return result
