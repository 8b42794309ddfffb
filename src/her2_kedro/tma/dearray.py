"""TMA dearraying: find cores on a thumbnail, fit a rotated grid, extract cores at level 0.

Only the thumbnail (``DearrayParams.thumbnail_max_side`` on its long side) and one core at a
time are ever held in memory, so slides of any size dearray in bounded memory.

Conventions: coordinates are level-0 pixels (x to the right, y down). Row ``i`` (top to
bottom) gets ``row_labels[i]``, column ``j`` (left to right) gets ``column_labels[j]`` or
``str(j + 1)``; a core's label is QuPath style ``"<row>-<col>"``, e.g. ``"B-7"``. Grid
indices are ``round(offset / pitch)`` from the first occupied row/column, so missing cores,
and even whole missing interior rows/columns, keep the labels of the others right.
``rotation_deg`` is the angle of the grid's row direction from the image x axis, measured
towards +y (clockwise on screen), folded into (-45, 45].

Pipeline (``dearray_slide``): blobs of the thumbnail's tissue mask (``detect_cores``) give the
grid's rotation, pitches and labels (``fit_grid``); then every node of that grid is checked on
a second, fainter tissue mask with a core-sized matched filter, which finds cores that blob
detection lost or mis-centred -- a touching pair merged into one off-grid blob, a core cut by
lumens that open onto the glass into pieces each below ``min_area_fraction``, a pale core above
``background_grey`` -- centres each core on its punch (not on the centroid of a torn rim), folds
the pieces of a core back into it instead of reporting them as debris, and extends an inferred
grid by an edge row/column whose cores were all lost.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.signal import fftconvolve
from scipy.spatial import cKDTree
from skimage.feature import peak_local_max
from skimage.morphology import disk
from skimage.segmentation import watershed

from her2_kedro.imaging.pixels import grey
from her2_kedro.tma.wsi import SlideReader

__all__ = [
    "DearrayParams",
    "GridCore",
    "DearrayResult",
    "CoreCandidates",
    "grid_label",
    "detect_cores",
    "fit_grid",
    "dearray_slide",
    "extract_core",
    "iter_cores",
]


@dataclass(frozen=True)
class DearrayParams:
    """Settings of the dearrayer; sizes are level-0 pixels, fractions are of the diameter/pitch."""

    row_labels: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    column_labels: tuple[str, ...] | None = None
    n_rows: int | None = None
    n_cols: int | None = None
    core_diameter_px: float | None = None
    thumbnail_max_side: int = 2048
    background_grey: float = 220.0
    min_area_fraction: float = 0.35
    max_offgrid: float = 0.35
    margin: float = 0.05


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


@dataclass
class CoreCandidates:
    """Blobs that may be cores (level-0 centroids and areas) plus the diameter used."""

    xy: np.ndarray  # (N, 2) level-0 (x, y)
    area: np.ndarray  # (N,) level-0 px^2
    diameter_px: float
    rejected: list[tuple[str, float, float]] = field(default_factory=list)
    # thumbnail-resolution mask of tissue down to faint, glass-like staining (pale cores,
    # lumens), used to confirm and centre cores on the fitted grid; None if not computed
    tissue: np.ndarray | None = None
    downsample: float = 1.0


# --------------------------------------------------------------------------- labels
def _spreadsheet_name(i: int) -> str:
    name = ""
    i += 1
    while i > 0:
        i, rem = divmod(i - 1, 26)
        name = chr(ord("A") + rem) + name
    return name


def grid_label(row: int, col: int, params: DearrayParams) -> str:
    """QuPath-style label "<row letter>-<column>" for 0-based grid indices."""
    if row < len(params.row_labels):
        r = params.row_labels[row]
    elif params.row_labels == DearrayParams.row_labels:
        r = _spreadsheet_name(row)  # AA, AB, ... beyond 26 rows
    else:
        raise ValueError(f"row {row} has no label in row_labels={params.row_labels!r}")
    if params.column_labels is None:
        c = str(col + 1)
    elif col < len(params.column_labels):
        c = params.column_labels[col]
    else:
        raise ValueError(f"column {col} has no label in column_labels={params.column_labels!r}")
    return f"{r}-{c}"


# --------------------------------------------------------------------------- detection
def _estimate_diameter_thumb(areas: np.ndarray) -> float:
    """Robust core diameter (thumb px) from blob areas: area-weighted median, then refine."""
    a = np.sort(areas[areas >= 4].astype(np.float64))
    if a.size == 0:
        return 0.0
    cum = np.cumsum(a)
    a0 = a[min(int(np.searchsorted(cum, cum[-1] / 2.0)), a.size - 1)]
    plausible = a[(a >= 0.4 * a0) & (a <= 1.6 * a0)]
    if plausible.size == 0:
        plausible = np.array([a0])
    return float(np.median(2.0 * np.sqrt(plausible / math.pi)))


def _split_blob(crop: np.ndarray, d_t: float) -> list[np.ndarray]:
    """Split a blob mask into touching disks by distance-transform watershed."""
    dist = ndi.distance_transform_edt(crop)
    peaks = peak_local_max(
        dist,
        min_distance=max(1, int(round(0.6 * d_t))),
        threshold_abs=0.25 * d_t,
        labels=crop.astype(np.int32),
        exclude_border=False,
    )
    if len(peaks) < 2:
        return [crop]
    markers = np.zeros(crop.shape, dtype=np.int32)
    for k, (r, c) in enumerate(peaks, start=1):
        markers[r, c] = k
    ws = watershed(-dist, markers, mask=crop)
    return [ws == k for k in range(1, len(peaks) + 1) if np.any(ws == k)]


def _faint_tissue_mask(g: np.ndarray, params: DearrayParams, se: np.ndarray) -> np.ndarray:
    """Tissue down to just below the glass level: pale (score 0) stroma and lumens included.

    The glass level is the mode of the grey values brighter than ``background_grey`` and the
    threshold sits a few noise widths below it (never below ``background_grey``), so faint
    tissue that the fixed threshold misses still counts when a grid node is checked.
    """
    bright = g[g > params.background_grey]
    thr = float(params.background_grey)
    if bright.size >= 0.05 * g.size:
        hist, edges = np.histogram(bright, bins=np.arange(params.background_grey, 256.5, 0.5))
        glass = float(edges[int(np.argmax(hist))] + 0.25)
        upper = bright[bright >= glass]
        sigma = 1.4826 * float(np.median(upper - glass)) if upper.size else 0.0
        thr = max(thr, glass - max(4.0, 6.0 * sigma))
    tissue = g <= thr
    tissue = ndi.binary_opening(tissue, structure=se)
    tissue = ndi.binary_closing(tissue, structure=se, border_value=0)
    return ndi.binary_fill_holes(tissue)


def detect_cores(thumb_rgb: np.ndarray, params: DearrayParams, downsample: float) -> CoreCandidates:
    """Find core-like blobs on a thumbnail: tissue mask, holes filled, touching cores split.

    Blobs smaller than ``min_area_fraction`` x the core area are rejected as debris.
    """
    if downsample <= 0:
        raise ValueError(f"downsample must be > 0, got {downsample}")
    g = ndi.gaussian_filter(grey(thumb_rgb), sigma=1.0)
    mask = g <= params.background_grey
    d_t = params.core_diameter_px / downsample if params.core_diameter_px else None
    r = max(1, int(round(0.03 * d_t))) if d_t else 1
    se = disk(r)
    mask = ndi.binary_opening(mask, structure=se)
    mask = ndi.binary_closing(mask, structure=se, border_value=0)
    mask = ndi.binary_fill_holes(mask)
    tissue = _faint_tissue_mask(g, params, se)
    lab, n = ndi.label(mask)
    if n == 0:
        return CoreCandidates(
            np.zeros((0, 2)),
            np.zeros(0),
            float(params.core_diameter_px or 0.0),
            [],
            tissue,
            downsample,
        )
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    if d_t is None:
        d_t = _estimate_diameter_thumb(areas)
    core_area = math.pi / 4.0 * d_t * d_t
    slices = ndi.find_objects(lab)

    xy: list[tuple[float, float]] = []
    area_out: list[float] = []
    rejected: list[tuple[str, float, float]] = []

    def to_level0(rc: tuple[float, float]) -> tuple[float, float]:
        return ((rc[1] + 0.5) * downsample, (rc[0] + 0.5) * downsample)

    for k, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        crop = lab[sl] == k
        a = float(areas[k - 1])
        pieces = [crop]
        if a > 1.3 * core_area:
            pieces = _split_blob(crop, d_t)
        for piece in pieces:
            pa = float(piece.sum())
            if pa == 0:
                continue
            rr, cc = np.nonzero(piece)
            rc = (rr.mean() + sl[0].start, cc.mean() + sl[1].start)
            x0, y0 = to_level0(rc)
            if pa < params.min_area_fraction * core_area:
                rejected.append(("debris", x0, y0))
                continue
            xy.append((x0, y0))
            area_out.append(pa * downsample * downsample)
    return CoreCandidates(
        np.asarray(xy, dtype=np.float64).reshape(-1, 2),
        np.asarray(area_out, dtype=np.float64),
        float(d_t * downsample),
        rejected,
        tissue,
        float(downsample),
    )


# --------------------------------------------------------------------------- grid fit
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
    params: DearrayParams,
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


# --------------------------------------------------------------------------- grid refinement
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


def _refine_on_tissue(
    result: DearrayResult, tissue: np.ndarray | None, downsample: float, params: DearrayParams
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
    ds = float(downsample)
    d_t = result.diameter_px / ds
    px = result.pitch_x_px or result.pitch_px
    py = result.pitch_y_px or result.pitch_px
    if d_t < 4 or px <= 0 or py <= 0:
        return result
    th = math.radians(result.rotation_deg)
    c, s = math.cos(th), math.sin(th)
    pts = np.array([(k.cx, k.cy) for k in result.cores], dtype=np.float64)
    rows = np.array([k.row for k in result.cores], dtype=np.float64)
    cols = np.array([k.col for k in result.cores], dtype=np.float64)
    au = float(np.median(pts[:, 0] * c + pts[:, 1] * s - cols * px))
    av = float(np.median(-pts[:, 0] * s + pts[:, 1] * c - rows * py))
    probe = _NodeProbe(tissue, d_t, params.max_offgrid * min(px, py) / ds)
    blob = {(k.row, k.col): k for k in result.cores}
    cache: dict[tuple[int, int], tuple[float, float] | None] = {}

    def node(i: int, j: int) -> tuple[float, float] | None:
        """Level-0 centre of the core on node (i, j) (lattice indices), or None."""
        if (i, j) not in cache:
            u, v = au + j * px, av + i * py
            x, y = u * c - v * s, u * s + v * c
            found = probe((y / ds - 0.5, x / ds - 0.5))
            if found is not None and found[0] >= params.min_area_fraction:
                cache[(i, j)] = ((found[2] + 0.5) * ds, (found[1] + 0.5) * ds)
            elif (i, j) in blob:
                cache[(i, j)] = (blob[(i, j)].cx, blob[(i, j)].cy)
            else:
                cache[(i, j)] = None
        return cache[(i, j)]

    r0, r1, c0, c1 = 0, result.n_rows, 0, result.n_cols
    grew = True
    while grew and (r1 - r0) * (c1 - c0) < 10_000:
        grew = False
        if params.n_rows is None:
            if any(node(r0 - 1, j) for j in range(c0, c1)):
                r0, grew = r0 - 1, True
            if any(node(r1, j) for j in range(c0, c1)):
                r1, grew = r1 + 1, True
        if params.n_cols is None:
            if any(node(i, c0 - 1) for i in range(r0, r1)):
                c0, grew = c0 - 1, True
            if any(node(i, c1) for i in range(r0, r1)):
                c1, grew = c1 + 1, True
    n_rows, n_cols = r1 - r0, c1 - c0
    cores: list[GridCore] = []
    missing: list[str] = []
    for i in range(r0, r1):
        for j in range(c0, c1):
            xy = node(i, j)
            lab = grid_label(i - r0, j - c0, params)
            if xy is None:
                missing.append(lab)
            else:
                cores.append(
                    GridCore(lab, i - r0, j - c0, float(xy[0]), float(xy[1]), result.diameter_px)
                )
    if cores:
        centres = cKDTree(np.array([(k.cx, k.cy) for k in cores]))
        boxes = [core_box(k, params) for k in cores]
        rejected = []
        for reason, x, y in result.rejected:
            dist, _ = centres.query((x, y))
            near = reason in ("debris", "duplicate", "off-grid") and dist < 0.6 * result.diameter_px
            boxed = any(bx <= x < bx + side and by <= y < by + side for bx, by, side in boxes)
            if near or boxed:
                continue  # a piece of a found core: it lies in that core's extracted image
            rejected.append((reason, x, y))
    else:
        rejected = list(result.rejected)
    result.cores, result.missing, result.rejected = cores, missing, rejected
    result.n_rows, result.n_cols = n_rows, n_cols
    return result


# --------------------------------------------------------------------------- slide level
def dearray_slide(reader: SlideReader, params: DearrayParams) -> DearrayResult:
    """Dearray a TMA slide from its thumbnail only (no full-resolution reads).

    Blobs give the grid (rotation, pitches, labels); then every grid node is checked on the
    thumbnail's tissue mask so cores that blob detection lost or mis-centred are recovered.
    """
    thumb, ds = reader.thumbnail(params.thumbnail_max_side)
    cand = detect_cores(thumb, params, ds)
    del thumb
    result = fit_grid(cand.xy, cand.diameter_px, params, cand.area)
    result.rejected = cand.rejected + result.rejected
    return _refine_on_tissue(result, cand.tissue, cand.downsample, params)


def core_box(core: GridCore, params: DearrayParams) -> tuple[int, int, int]:
    """Level-0 (x, y, side) of the square box read for a core (diameter plus margins)."""
    side = max(1, int(round(core.diameter * (1.0 + 2.0 * params.margin))))
    x0 = int(round(core.cx - side / 2.0))
    y0 = int(round(core.cy - side / 2.0))
    return x0, y0, side


def extract_core(reader: SlideReader, core: GridCore, params: DearrayParams) -> np.ndarray:
    """Read only this core's square box at level 0 (white-padded at slide edges)."""
    x0, y0, side = core_box(core, params)
    return reader.read_region((x0, y0), 0, (side, side))


def iter_cores(
    reader: SlideReader, result: DearrayResult, params: DearrayParams
) -> Iterator[tuple[GridCore, np.ndarray]]:
    """Yield (core, RGB image) one at a time so only one core is in memory."""
    for core in result.cores:
        yield core, extract_core(reader, core, params)
