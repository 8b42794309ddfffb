"""Fitting a rotated rectangular grid to core centres, and anchoring its labels to a slide map.

Conventions: coordinates are level-0 pixels (x to the right, y down); labels follow
``tma.grid_labels``. Grid indices are ``round(offset / pitch)`` from the first occupied
row/column, so missing cores, and even whole missing interior rows/columns, keep the labels of
the others right; an empty *first* row or column is recovered from ``slide_map.csv`` by
``anchor_to_positions``. ``rotation_deg`` is the angle of the grid's row direction from the
image x axis, measured towards +y (clockwise on screen), folded into (-45, 45].
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from her2_kedro.config.ingestion import DearrayConfig
from her2_kedro.tma.grid_labels import grid_label

__all__ = ["Anchoring", "DearrayResult", "GridCore", "anchor_to_positions", "core_box", "fit_grid"]


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


def fit_grid(
    centroids: np.ndarray,
    diameter_px: float,
    params: DearrayConfig,
    areas: np.ndarray | None = None,
) -> DearrayResult:
    """Fit a rotated rectangular grid to core centroids (level-0) and label each core.

    Off-grid blobs, blobs outside the expected n_rows x n_cols and duplicates on one node
    are rejected; empty nodes of the fitted grid are reported as missing.
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
        missing = [grid_label(i, j, params) for i in range(nr) for j in range(nc)]
        return DearrayResult([], missing, [], 0.0, 0.0, float(diameter_px or 0.0), nr, nc)

    theta = _estimate_rotation(pts, diameter)
    c, s = math.cos(theta), math.sin(theta)
    uv = np.stack([pts[:, 0] * c + pts[:, 1] * s, -pts[:, 0] * s + pts[:, 1] * c], axis=1)
    px, py = _estimate_pitches(uv, diameter)
    if n >= 2:
        iu, au, px = _fit_axis(uv[:, 0], px, w, params.max_offgrid)
        iv, av, py = _fit_axis(uv[:, 1], py, w, params.max_offgrid)
    else:
        iu, iv = np.zeros(1, np.int64), np.zeros(1, np.int64)
        au, av = float(uv[0, 0]), float(uv[0, 1])
    res_u = uv[:, 0] - (au + iu * px)
    res_v = uv[:, 1] - (av + iv * py)
    off = np.hypot(res_u, res_v)
    pitch = min(px, py)

    rejected: list[tuple[str, float, float]] = []
    ok = off <= params.max_offgrid * pitch
    for k in np.nonzero(~ok)[0]:
        rejected.append(("off-grid", float(pts[k, 0]), float(pts[k, 1])))
    if not ok.any():
        return DearrayResult(
            [], [], rejected, math.degrees(theta), float(pitch), diameter, 0, 0, px, py
        )

    col0 = _best_window(iu[ok], w[ok], params.n_cols) if params.n_cols else int(iu[ok].min())
    row0 = _best_window(iv[ok], w[ok], params.n_rows) if params.n_rows else int(iv[ok].min())
    cols = iu - col0
    rows = iv - row0
    n_cols = params.n_cols or int(cols[ok].max()) + 1
    n_rows = params.n_rows or int(rows[ok].max()) + 1
    inside = ok & (cols >= 0) & (cols < n_cols) & (rows >= 0) & (rows < n_rows)
    for k in np.nonzero(ok & ~inside)[0]:
        rejected.append(("outside-grid", float(pts[k, 0]), float(pts[k, 1])))

    # one blob per node: keep the clearly larger one, else the closer one
    chosen: dict[tuple[int, int], int] = {}
    for k in np.nonzero(inside)[0]:
        key = (int(rows[k]), int(cols[k]))
        if key not in chosen:
            chosen[key] = int(k)
            continue
        j = chosen[key]
        if w[k] >= 1.25 * w[j] or (w[j] < 1.25 * w[k] and off[k] < off[j]):
            chosen[key], loser = int(k), j
        else:
            loser = int(k)
        rejected.append(("duplicate", float(pts[loser, 0]), float(pts[loser, 1])))

    cores = [
        GridCore(
            label=grid_label(r, cc, params),
            row=r,
            col=cc,
            cx=float(pts[k, 0]),
            cy=float(pts[k, 1]),
            diameter=diameter,
        )
        for (r, cc), k in sorted(chosen.items())
    ]
    missing = [
        grid_label(i, j, params)
        for i in range(n_rows)
        for j in range(n_cols)
        if (i, j) not in chosen
    ]
    return DearrayResult(
        cores=cores,
        missing=missing,
        rejected=rejected,
        rotation_deg=math.degrees(theta),
        pitch_px=float((px + py) / 2.0),
        diameter_px=diameter,
        n_rows=n_rows,
        n_cols=n_cols,
        pitch_x_px=float(px),
        pitch_y_px=float(py),
    )


# --------------------------------------------------------------------------- anchoring
@dataclass(frozen=True)
class Anchoring:
    """How the labels of a fitted grid were shifted to agree with the slide map."""

    row_shift: int
    col_shift: int
    agree: int  # found cores whose shifted position the map names
    found: int  # cores found
    ties: int  # shifts that agree equally well (1 = unambiguous)

    def describe(self) -> str:
        """One line for the log."""
        text = (
            f"labels anchored to slide_map.csv: grid shifted by {self.row_shift} row(s), "
            f"{self.col_shift} column(s); {self.agree} of {self.found} cores agree with the map"
        )
        if self.ties > 1:
            text += (
                f"; {self.ties} shifts fit equally well, the smallest was taken (give "
                "ingestion.dearray.n_rows/n_cols or list only the punched cores in the map)"
            )
        return text


def _shift_limit(found_max: int, expected: int | None, map_max: int) -> int:
    """Largest shift to try along one axis: within the expected grid size when it is given."""
    if expected is not None:
        return max(0, expected - 1 - found_max)
    return max(0, map_max)


def anchor_to_positions(
    result: DearrayResult, positions: Collection[tuple[int, int]], params: DearrayConfig
) -> tuple[DearrayResult, Anchoring | None]:
    """Shift the grid's labels so that its cores land on the positions the slide map names.

    A grid inferred from the cores found starts at the first occupied row and column, so an
    empty first row or column shifts every label. Here the shift (rows, columns >= 0) that puts
    the most found cores on (row, column) positions named in the map wins; ties go to the
    smallest shift (the unshifted grid first). The grid then spans both the shifted cores and
    every map position, so map positions without a core are reported as missing. With no map
    position, or none that any shift reaches, the grid is returned unchanged (and None).
    """
    wanted = {(int(r), int(c)) for r, c in positions}
    if not wanted or not result.cores:
        return result, None
    found = [(core.row, core.col) for core in result.cores]
    max_r = _shift_limit(max(r for r, _ in found), params.n_rows, max(r for r, _ in wanted))
    max_c = _shift_limit(max(c for _, c in found), params.n_cols, max(c for _, c in wanted))
    scores: dict[tuple[int, int], int] = {}
    for dr in range(max_r + 1):
        for dc in range(max_c + 1):
            scores[(dr, dc)] = sum((r + dr, c + dc) in wanted for r, c in found)
    best = max(scores.values())
    if best == 0:
        return result, None
    ties = sorted((k for k, v in scores.items() if v == best), key=lambda k: (sum(k), k))
    dr, dc = ties[0]
    anchoring = Anchoring(dr, dc, best, len(found), len(ties))
    if (dr, dc) == (0, 0) and all(r < result.n_rows and c < result.n_cols for r, c in wanted):
        return result, anchoring
    n_rows = params.n_rows or max(result.n_rows + dr, 1 + max(r for r, _ in wanted))
    n_cols = params.n_cols or max(result.n_cols + dc, 1 + max(c for _, c in wanted))
    for core in result.cores:
        core.row, core.col = core.row + dr, core.col + dc
        core.label = grid_label(core.row, core.col, params)
    occupied = {(core.row, core.col) for core in result.cores}
    result.missing = [
        grid_label(i, j, params)
        for i in range(n_rows)
        for j in range(n_cols)
        if (i, j) not in occupied
    ]
    result.n_rows, result.n_cols = n_rows, n_cols
    return result, anchoring
