"""Fitting a rotated rectangular grid to core centres and labelling its nodes.

Conventions: coordinates are level-0 pixels (x to the right, y down); labels follow
``tma.grid_labels``. Grid indices are ``round(offset / pitch)`` from the first occupied
row/column, so missing cores, and even whole missing interior rows/columns, keep the labels of
the others right; an empty *first* row or column is recovered from ``slide_map.csv`` by
``tma.anchoring``. ``rotation_deg`` is the angle of the grid's row direction from the
image x axis, measured towards +y (clockwise on screen), folded into (-45, 45].
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from her2_kedro.config.ingestion import DearrayConfig
from her2_kedro.tma.grid_labels import grid_label
from her2_kedro.tma.lattice import Lattice

__all__ = [
    "DearrayResult",
    "GridCore",
    "core_box",
    "fit_grid",
    "from_grid_frame",
    "missing_labels",
    "to_grid_frame",
]


@dataclass
class GridCore:
    """One found core: its grid label/position and level-0 centre and diameter."""

    label: str
    row: int
    col: int
    cx: float
    cy: float
    diameter: float


@dataclass
class DearrayResult:
    """Found cores, empty grid positions, rejected blobs (reason, x, y) and the fitted grid."""

    cores: list[GridCore]
    missing: list[str]
    rejected: list[tuple[str, float, float]]
    rotation_deg: float
    pitch_px: float
    diameter_px: float
    n_rows: int
    n_cols: int
    pitch_x_px: float = 0.0  # pitch along a row (between columns)
    pitch_y_px: float = 0.0  # pitch along a column (between rows)

    def by_label(self) -> dict[str, GridCore]:
        """Cores keyed by label."""
        return {c.label: c for c in self.cores}


def core_box(core: GridCore, params: DearrayConfig) -> tuple[int, int, int]:
    """Level-0 (x, y, side) of the square box read for a core (diameter plus margins)."""
    side = max(1, int(round(core.diameter * (1.0 + 2.0 * params.margin))))
    x0 = int(round(core.cx - side / 2.0))
    y0 = int(round(core.cy - side / 2.0))
    return x0, y0, side


def _estimate_rotation(pts: np.ndarray, diameter: float) -> float:
    """Dominant nearest-neighbour direction modulo 90 degrees (radians, in (-pi/4, pi/4])."""
    n = len(pts)
    if n < 2:
        return 0.0
    k = min(5, n)
    dists, idx = cKDTree(pts).query(pts, k=k)
    nn = dists[:, 1]
    nn = nn[nn > 0.5 * diameter] if np.any(nn > 0.5 * diameter) else nn
    base = float(np.median(nn))
    vecs = []
    for j in range(1, k):
        ok = (dists[:, j] <= 1.25 * base) & (dists[:, j] >= 0.5 * min(base, diameter))
        vecs.append(pts[idx[ok, j]] - pts[ok])
    v = np.concatenate(vecs) if vecs else np.zeros((0, 2))
    if len(v) == 0:
        return 0.0
    ang = np.arctan2(v[:, 1], v[:, 0])
    theta = float(np.angle(np.exp(4j * ang).sum()) / 4.0)
    for _ in range(2):  # trim vectors far from the current estimate and re-average
        dev = np.angle(np.exp(4j * (ang - theta))) / 4.0
        keep = np.abs(dev) < math.radians(10)
        if keep.sum() == 0:
            break
        theta = theta + float(np.angle(np.exp(4j * dev[keep]).sum()) / 4.0)
    # fold into (-45, 45]
    theta = (theta + math.pi / 4) % (math.pi / 2) - math.pi / 4
    return theta


def _estimate_pitches(uv: np.ndarray, diameter: float) -> tuple[float, float]:
    """Median distance to the nearest horizontal / vertical neighbour in the rotated frame."""
    n = len(uv)
    if n < 2:
        return 1.5 * diameter, 1.5 * diameter
    k = min(9, n)
    _, idx = cKDTree(uv).query(uv, k=k)
    best_h = np.full(n, np.inf)
    best_v = np.full(n, np.inf)
    for j in range(1, k):
        d = uv[idx[:, j]] - uv
        du, dv = np.abs(d[:, 0]), np.abs(d[:, 1])
        length = np.hypot(du, dv)
        valid = length >= 0.6 * diameter
        h = valid & (dv < 0.35 * du)
        vv = valid & (du < 0.35 * dv)
        best_h = np.where(h, np.minimum(best_h, du), best_h)
        best_v = np.where(vv, np.minimum(best_v, dv), best_v)
    ph = float(np.median(best_h[np.isfinite(best_h)])) if np.isfinite(best_h).any() else None
    pv = float(np.median(best_v[np.isfinite(best_v)])) if np.isfinite(best_v).any() else None
    if ph is None and pv is None:
        dists, _ = cKDTree(uv).query(uv, k=2)
        ph = pv = max(float(np.median(dists[:, 1])), diameter)
    elif ph is None:
        ph = pv
    elif pv is None:
        pv = ph
    return float(ph), float(pv)  # type: ignore[arg-type]


def _fit_axis(
    coord: np.ndarray, pitch: float, weights: np.ndarray, tol: float
) -> tuple[np.ndarray, float, float]:
    """1-D lattice fit coord ~ a + idx * pitch: phase by circular mean, then robust LS."""
    z = (weights * np.exp(2j * math.pi * coord / pitch)).sum()
    a = float(np.angle(z) / (2 * math.pi) * pitch)
    idx = np.round((coord - a) / pitch)
    for _ in range(4):
        resid = coord - (a + idx * pitch)
        inl = np.abs(resid) < tol * pitch
        if inl.sum() >= 2 and len(np.unique(idx[inl])) >= 2:
            w = weights[inl]
            xi, yi = idx[inl], coord[inl]
            xm, ym = np.average(xi, weights=w), np.average(yi, weights=w)
            p_new = float(np.sum(w * (xi - xm) * (yi - ym)) / np.sum(w * (xi - xm) ** 2))
            if 0.8 * pitch < p_new < 1.25 * pitch:
                pitch = p_new
            a = float(ym - pitch * xm)
        elif inl.any():
            a = float(np.average(coord[inl] - idx[inl] * pitch, weights=weights[inl]))
        idx = np.round((coord - a) / pitch)
    return idx.astype(np.int64), a, pitch


def _best_window(idx: np.ndarray, weights: np.ndarray, size: int) -> int:
    """Start of the window of ``size`` consecutive indices holding the most weight."""
    lo, hi = int(idx.min()), int(idx.max())
    if hi - lo + 1 <= size:
        return lo
    best, best_w = lo, -1.0
    for s in range(lo, hi - size + 2):
        w = float(weights[(idx >= s) & (idx < s + size)].sum())
        if w > best_w:
            best, best_w = s, w
    return best


def to_grid_frame(pts: np.ndarray, theta: float) -> np.ndarray:
    """Level-0 (x, y) points in the grid's frame (u along a row, v along a column)."""
    c, s = math.cos(theta), math.sin(theta)
    return np.stack([pts[:, 0] * c + pts[:, 1] * s, -pts[:, 0] * s + pts[:, 1] * c], axis=1)


def from_grid_frame(u: float, v: float, theta: float) -> tuple[float, float]:
    """A point of the grid's frame back in level-0 (x, y)."""
    c, s = math.cos(theta), math.sin(theta)
    return u * c - v * s, u * s + v * c


def missing_labels(
    n_rows: int, n_cols: int, occupied: Collection[tuple[int, int]], params: DearrayConfig
) -> list[str]:
    """Labels of the (row, column) nodes of an n_rows x n_cols grid that hold no core."""
    return [
        grid_label(i, j, params)
        for i in range(n_rows)
        for j in range(n_cols)
        if (i, j) not in occupied
    ]


@dataclass
class _BlobsOnLattice:
    """Every blob's lattice column/row index in the grid's frame and its distance from its node."""

    theta: float  # rotation (radians)
    col: np.ndarray
    row: np.ndarray
    off: np.ndarray  # distance from the blob to its lattice node (level-0 px)
    px: float  # pitch along a row (between columns)
    py: float  # pitch along a column (between rows)


def _fit_lattice(
    pts: np.ndarray,
    weights: np.ndarray,
    diameter: float,
    params: DearrayConfig,
    lattice: Lattice | None = None,
) -> _BlobsOnLattice:
    """Rotation from neighbour directions (or ``lattice``), then a 1-D lattice fit along each
    grid axis starting from the neighbour distances (or ``lattice``'s pitches)."""
    if lattice is not None:
        theta = lattice.theta
        uv = to_grid_frame(pts, theta)
        px, py = lattice.px, lattice.py
    else:
        theta = _estimate_rotation(pts, diameter)
        uv = to_grid_frame(pts, theta)
        px, py = _estimate_pitches(uv, diameter)
    if len(pts) >= 2:
        iu, au, px = _fit_axis(uv[:, 0], px, weights, params.max_offgrid)
        iv, av, py = _fit_axis(uv[:, 1], py, weights, params.max_offgrid)
    else:
        iu, iv = np.zeros(1, np.int64), np.zeros(1, np.int64)
        au, av = float(uv[0, 0]), float(uv[0, 1])
    off = np.hypot(uv[:, 0] - (au + iu * px), uv[:, 1] - (av + iv * py))
    return _BlobsOnLattice(theta, iu, iv, off, px, py)


def _place_on_grid(
    lattice: _BlobsOnLattice, on_grid: np.ndarray, weights: np.ndarray, params: DearrayConfig
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Rows and columns counted from the grid's first row/column, and the grid's size.

    With an expected size, the window of that size holding the most blob weight is the grid;
    without one, the grid spans the on-grid blobs.
    """
    iu, iv, w = lattice.col[on_grid], lattice.row[on_grid], weights[on_grid]
    col0 = _best_window(iu, w, params.n_cols) if params.n_cols else int(iu.min())
    row0 = _best_window(iv, w, params.n_rows) if params.n_rows else int(iv.min())
    cols, rows = lattice.col - col0, lattice.row - row0
    n_cols = params.n_cols or int(cols[on_grid].max()) + 1
    n_rows = params.n_rows or int(rows[on_grid].max()) + 1
    return rows, cols, n_rows, n_cols


def _one_blob_per_node(
    candidates: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    weights: np.ndarray,
    off: np.ndarray,
) -> tuple[dict[tuple[int, int], int], list[int]]:
    """The blob kept on each (row, column) node and the losers, in the order they lost.

    Of two blobs on one node the clearly larger one (by 25 %) wins, else the closer one.
    """
    chosen: dict[tuple[int, int], int] = {}
    losers: list[int] = []
    for k in candidates:
        key = (int(rows[k]), int(cols[k]))
        if key not in chosen:
            chosen[key] = int(k)
            continue
        j = chosen[key]
        if weights[k] >= 1.25 * weights[j] or (weights[j] < 1.25 * weights[k] and off[k] < off[j]):
            chosen[key], loser = int(k), j
        else:
            loser = int(k)
        losers.append(loser)
    return chosen, losers


def _rejections(
    reason: str, pts: np.ndarray, index: Iterable[int]
) -> list[tuple[str, float, float]]:
    """(reason, x, y) of the blobs at ``index``."""
    return [(reason, float(pts[k, 0]), float(pts[k, 1])) for k in index]


def fit_grid(
    centroids: np.ndarray,
    diameter_px: float,
    params: DearrayConfig,
    areas: np.ndarray | None = None,
    lattice: Lattice | None = None,
) -> DearrayResult:
    """Fit a rotated rectangular grid to core centroids (level-0) and label each core.

    Off-grid blobs, blobs outside the expected n_rows x n_cols and duplicates on one node
    are rejected; empty nodes of the fitted grid are reported as missing. The rotation and
    starting pitches come from the centroids' neighbours unless ``lattice`` gives them (see
    ``tma.lattice.lattice_on_tissue``).
    """
    pts = np.asarray(centroids, dtype=np.float64).reshape(-1, 2)
    n = len(pts)
    w = (
        np.ones(n)
        if areas is None
        else np.asarray(areas, dtype=np.float64).reshape(-1).clip(min=1e-9)
    )
    diameter = float(diameter_px) if diameter_px and diameter_px > 0 else 1.0
    if n == 0:
        nr, nc = params.n_rows or 0, params.n_cols or 0
        missing = missing_labels(nr, nc, (), params)
        return DearrayResult([], missing, [], 0.0, 0.0, float(diameter_px or 0.0), nr, nc)

    lat = _fit_lattice(pts, w, diameter, params, lattice)
    rotation_deg, pitch = math.degrees(lat.theta), min(lat.px, lat.py)
    on_grid = lat.off <= params.max_offgrid * pitch
    rejected = _rejections("off-grid", pts, np.nonzero(~on_grid)[0])
    if not on_grid.any():
        return DearrayResult(
            [], [], rejected, rotation_deg, float(pitch), diameter, 0, 0, lat.px, lat.py
        )

    rows, cols, n_rows, n_cols = _place_on_grid(lat, on_grid, w, params)
    inside = on_grid & (cols >= 0) & (cols < n_cols) & (rows >= 0) & (rows < n_rows)
    rejected += _rejections("outside-grid", pts, np.nonzero(on_grid & ~inside)[0])
    chosen, losers = _one_blob_per_node(np.nonzero(inside)[0], rows, cols, w, lat.off)
    rejected += _rejections("duplicate", pts, losers)

    cores = [
        GridCore(grid_label(r, c, params), r, c, float(pts[k, 0]), float(pts[k, 1]), diameter)
        for (r, c), k in sorted(chosen.items())
    ]
    return DearrayResult(
        cores=cores,
        missing=missing_labels(n_rows, n_cols, chosen, params),
        rejected=rejected,
        rotation_deg=rotation_deg,
        pitch_px=float((lat.px + lat.py) / 2.0),
        diameter_px=diameter,
        n_rows=n_rows,
        n_cols=n_cols,
        pitch_x_px=float(lat.px),
        pitch_y_px=float(lat.py),
    )
