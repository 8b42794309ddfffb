"""Cells of a synthetic core: a Voronoi tessellation of jittered-grid seeds, their nuclei and
membranes.

Tumour cells (seeds inside the tumour band) get membranes (the Voronoi edges plus the basal and
apical borders of the lining), pale cytoplasm and an oval vesicular haematoxylin nucleus (pale
centre, chromatin rim, granular texture, a nucleolus) that in a gland lining is elongated
perpendicular to the lumen and shifted basally; in a lining the cell metric is stretched across
it, so cells are columnar. Stromal seeds get sparse spindle fibroblast nuclei and a few small dark
lymphocytes. Nothing here depends on a label; the status cue's atypia comes in as ``Atypia``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from her2_kedro.synthetic.geometry import EPI_CELLS, SEPTUM
from her2_kedro.synthetic.staining import Atypia

TUMOUR, FIBROBLAST, LYMPHOCYTE = 1, 2, 3
FIBROBLAST_RATE = 0.28  # share of stromal seeds that carry a fibroblast nucleus
LYMPHOCYTE_RATE = 0.06  # and a lymphocyte
NUCLEUS_AXES = (0.32, 0.24)  # semi-axes of a tumour nucleus without atypia (cell diameters)


@dataclass
class Cells:
    """Seeds (a (rows, cols) jittered grid) and per-cell nuclear parameters (flat arrays)."""

    sy: np.ndarray
    sx: np.ndarray
    kind: np.ndarray  # 0 none, 1 tumour, 2 fibroblast, 3 lymphocyte
    na: np.ndarray  # nuclear semi-axes (px), long and short
    nb: np.ndarray
    ncos: np.ndarray  # orientation of the long axis
    nsin: np.ndarray
    noy: np.ndarray  # offset of the nucleus from the seed (px)
    nox: np.ndarray
    nh: np.ndarray  # nuclear haematoxylin density
    nirr: np.ndarray  # outline irregularity
    nl_u: np.ndarray  # nucleolus offset along / across the nucleus's long axis (px)
    nl_v: np.ndarray
    nl_h: np.ndarray  # nucleolus haematoxylin (0: none)
    fibre_angle: float  # direction of the stroma fibres (and fibroblast nuclei)


def draw_seeds(size: int, d: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cell seeds: a grid of pitch d (one cell beyond each edge), each jittered by up to 0.32 d."""
    ny = int(np.ceil(size / d)) + 2
    gy, gx = np.meshgrid(np.arange(ny) - 1 + 0.5, np.arange(ny) - 1 + 0.5, indexing="ij")
    sy = ((gy + rng.uniform(-0.32, 0.32, gy.shape)) * d).astype(np.float32)
    sx = ((gx + rng.uniform(-0.32, 0.32, gx.shape)) * d).astype(np.float32)
    return sy, sx


def assign_kinds(
    geometry: tuple[np.ndarray, ...], d: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Kind of each seed from the gland geometry at the seeds (tumour in the band outside septa,
    else stroma with sparse fibroblasts and lymphocytes), and whether it lines a lumen."""
    s, hw, wl, sm = geometry[:4]
    septum = (sm < SEPTUM * d) & (s > wl + EPI_CELLS * d)
    u = rng.random(s.size)
    stromal = np.where(
        u < FIBROBLAST_RATE, FIBROBLAST, np.where(u < FIBROBLAST_RATE + LYMPHOCYTE_RATE, 3, 0)
    )
    kind = np.where((s < hw) & ~septum, TUMOUR, stromal).astype(np.int8)
    columnar = (wl > 0.3 * d) & (s < wl + 1.6 * d) & (kind == TUMOUR)
    return kind, columnar


def draw_nuclei(
    sy: np.ndarray,
    sx: np.ndarray,
    kind: np.ndarray,
    columnar: np.ndarray,
    normal: tuple[np.ndarray, np.ndarray],
    d: float,
    atypia: Atypia,
    rng: np.random.Generator,
) -> Cells:
    """Nuclear size, shape, orientation, position and density of every cell.

    In a columnar lining nuclei are elongated across the lining (perpendicular to the lumen) and
    shifted towards the basal side, at the same area, so the cue's nuclear size is unchanged.
    """
    n = kind.size
    tum, fib = kind == TUMOUR, kind == FIBROBLAST
    nrm_y, nrm_x = normal
    theta = rng.uniform(0, np.pi, n)
    fibre_angle = float(rng.uniform(0, np.pi))
    pleo = atypia.pleomorphism
    scale = np.exp(rng.normal(0.0, pleo, n) - pleo**2)
    aspect = rng.uniform(0.8, 1.05, n)
    theta_noise = rng.normal(0, 0.18, n)
    k_area = atypia.axis_scale
    na = np.where(tum, NUCLEUS_AXES[0] * d * k_area * scale, np.where(fib, 0.34 * d, 0.13 * d))
    nb = np.where(
        tum, NUCLEUS_AXES[1] * d * k_area * scale * aspect, np.where(fib, 0.075 * d, 0.12 * d)
    )
    na = np.where(columnar, na * 1.35, na)
    nb = np.where(columnar, nb * 0.74, nb)
    theta = np.where(columnar, np.arctan2(nrm_y, nrm_x) + theta_noise, theta)
    theta = np.where(fib, fibre_angle + rng.normal(0, 0.25, n), theta)
    nh = np.where(tum, atypia.hyperchromasia * rng.uniform(0.85, 1.15, n), np.where(fib, 0.6, 0.9))
    nirr = np.where(tum, atypia.irregularity, 0.03)
    off = 0.06 * d
    noy, nox = rng.uniform(-off, off, n), rng.uniform(-off, off, n)
    noy = np.where(columnar, noy + 0.14 * d * nrm_y, noy)
    nox = np.where(columnar, nox + 0.14 * d * nrm_x, nox)
    nl_u = rng.uniform(-0.35, 0.35, n) * na
    nl_v = rng.uniform(-0.3, 0.3, n) * nb
    nl_h = np.where(tum & (rng.random(n) < 0.85), 1.1 * nh, 0.0)
    f32 = np.float32
    return Cells(
        sy=sy,
        sx=sx,
        kind=kind,
        na=na.astype(f32),
        nb=nb.astype(f32),
        ncos=np.cos(theta).astype(f32),
        nsin=np.sin(theta).astype(f32),
        noy=noy.astype(f32),
        nox=nox.astype(f32),
        nh=nh.astype(f32),
        nirr=nirr.astype(f32),
        nl_u=nl_u.astype(f32),
        nl_v=nl_v.astype(f32),
        nl_h=nl_h.astype(f32),
        fibre_angle=fibre_angle,
    )


def voronoi_rows(
    cells: Cells,
    d: float,
    yy: np.ndarray,
    xx: np.ndarray,
    normal: tuple[np.ndarray, np.ndarray],
    stretch: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest seed (flat index) of each pixel and the half-difference of the distances to the
    nearest and second-nearest seed (distance to the cell border), among the 3x3 neighbouring
    grid cells; the metric is stretched by ``stretch`` across the lining (columnar cells)."""
    h, w = yy.shape[0], xx.shape[1]
    giy = (np.floor(yy[:, 0] / d)).astype(np.int64) + 1
    gix = (np.floor(xx[0] / d)).astype(np.int64) + 1
    ncol = cells.sy.shape[1]
    nrm_y, nrm_x = normal
    ik2, k2 = 1.0 / (stretch * stretch), stretch * stretch
    d1 = np.full((h, w), np.inf, np.float32)
    d2 = np.full((h, w), np.inf, np.float32)
    lab = np.zeros((h, w), np.int64)
    for di in (-1, 0, 1):
        iy = (giy + di)[:, None]
        for dj in (-1, 0, 1):
            ix = (gix + dj)[None, :]
            ey = yy - cells.sy[iy, ix]
            ex = xx - cells.sx[iy, ix]
            an = ey * nrm_y + ex * nrm_x
            at = ex * nrm_y - ey * nrm_x
            dd = an * an * ik2 + at * at * k2
            closer = dd < d1
            np.copyto(d2, np.where(closer, d1, np.minimum(d2, dd)))
            np.copyto(d1, dd, where=closer)
            np.copyto(lab, iy * ncol + ix, where=closer)
    return lab, (np.sqrt(d2) - np.sqrt(d1)) * 0.5


def nucleus_rows(
    cells: Cells,
    lab: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    d: float,
    mid: np.ndarray,
    fine: np.ndarray,
    grain: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclear coverage (0..1, anti-aliased) of each pixel and its haematoxylin: vesicular
    chromatin (pale centre, chromatin rim at the nuclear membrane, clumps and fine speckles) and,
    for tumour cells, a dark nucleolus."""
    sy_f, sx_f = cells.sy.ravel(), cells.sx.ravel()
    dy = yy - sy_f[lab] - cells.noy[lab]
    dx = xx - sx_f[lab] - cells.nox[lab]
    cs, sn = cells.ncos[lab], cells.nsin[lab]
    du = dx * cs + dy * sn
    dv = dy * cs - dx * sn
    del dx, dy, cs, sn
    rn = np.sqrt((du / cells.na[lab]) ** 2 + (dv / cells.nb[lab]) ** 2)
    rn *= 1.0 + cells.nirr[lab] * mid
    nuc = np.clip((1.0 - rn) * cells.nb[lab] + 0.5, 0.0, 1.0) * (cells.kind[lab] > 0)
    ring = np.exp(-(((rn - 0.86) / 0.14) ** 2))
    speckle = np.maximum(grain, 0.0)
    chromatin = np.clip(0.45 + 0.15 * fine + 0.15 * mid + 0.35 * speckle + 0.6 * ring, 0.2, 2.0)
    r_nl = np.float32(max(0.8, 0.055 * d))
    nl = np.exp(-((du - cells.nl_u[lab]) ** 2 + (dv - cells.nl_v[lab]) ** 2) / (r_nl * r_nl))
    return nuc, nuc * (cells.nh[lab] * chromatin + cells.nl_h[lab] * nl)


def membrane_rows(
    md: np.ndarray, wid: np.ndarray, geometry: tuple[np.ndarray, ...], d: float
) -> np.ndarray:
    """Membrane strength (0..1) from the distance to the cell border ``md`` and the borders of the
    lining (basal: the band edge; apical: the lumen edge) and of septa, for membrane width
    ``wid``."""
    s, hw, wl, sm, has_lumen, sep_gate = geometry
    mem = np.exp(-((md / wid) ** 2))
    mem = np.maximum(mem, np.exp(-(((hw - s) / wid - 0.8) ** 2)))
    mem = np.maximum(mem, has_lumen * np.exp(-(((s - wl) / wid - 0.8) ** 2)))
    return np.maximum(mem, sep_gate * np.exp(-(((sm - np.float32(SEPTUM * d)) / wid - 0.8) ** 2)))
