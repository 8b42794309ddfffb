"""Procedural HER2 IHC tissue-microarray cores: a round core of gastric adenocarcinoma on glass.

Model (all lengths scale with ``CoreSpec.cell_diameter_px``):
- core: a disk of ~93 % of the image side with a slightly wavy rim, on glass (the stain set's
  background colour);
- architecture: a smooth random field G; glass-clear lumens where G is high, an epithelial
  (tumour) band around them, stroma elsewhere, so tumour forms tubular glands around lumens and
  solid nests where a core has no lumens (drawn per core, independent of every label);
- cells: a Voronoi tessellation of jittered-grid seeds; tumour cells get membranes (the Voronoi
  edges), pale cytoplasm and an oval haematoxylin nucleus with chromatin texture; stromal seeds
  get sparse spindle fibroblast nuclei and a few small dark lymphocytes; stroma is pale
  haematoxylin with a wavy fibre texture;
- DAB (gastric HER2 criteria, Hofmann/Rüschoff): score 0 -- faint partial membranes in < 10 % of
  tumour cells; 1 -- faint, barely perceptible, *partial* membranes (a patchy mask removes part
  of each membrane) in 40-85 %; 2 -- weak-moderate complete membranes in 45-90 %; 3 -- strong,
  thicker complete membranes in 65-100 % plus a cytoplasmic blush. Per-cell intensity is
  log-normal and modulated by a regional field (heterogeneity).

HER2-status cue (``CoreSpec.status_cue``), a stated property of this benchmark, never a claim
about real tissue: tumour nuclei show atypia -- mean nuclear area x1.5 (both semi-axes x1.22),
more size variation (pleomorphism), irregular outlines and hyperchromasia (nuclear haematoxylin
x1.45). Nothing else changes: the architecture field and its thresholds, cell size and
density, stained-cell fraction, DAB membrane intensity, width and cytoplasmic blush are drawn
from the same distributions with or without the cue, so the paper's max-mean-DAB descriptor
cannot see it (only the small haematoxylin-to-DAB cross-talk of ``rgb2hed`` touches it).

Artefacts: ``tear`` (a thin wavy glass-clear crack), ``fold`` (a band of doubled optical
density), ``partial`` (a chord cut off or a bite missing at the rim), ``blur_sigma`` (Gaussian
blur of the final image). Rendering works in row strips of float32, so memory stays modest
even at the paper's 5468 px.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from her2_kedro.synthetic.optics import INTERNAL_STAINS, StainSet, render_optical_density

_STRIP_ROWS = 384

# Per-score DAB model: (stained fraction range, membrane concentration, cytoplasm fraction of it,
# membrane width factor, partial membranes).
_DAB_MODEL: dict[int, tuple[tuple[float, float], float, float, float, bool]] = {
    0: ((0.0, 0.06), 0.08, 0.0, 1.0, True),
    1: ((0.40, 0.85), 0.34, 0.05, 1.0, True),
    2: ((0.45, 0.90), 0.70, 0.12, 1.1, False),
    3: ((0.65, 1.00), 1.30, 0.30, 1.5, False),
}


@dataclass(frozen=True)
class CoreSpec:
    """Everything that defines one synthetic core apart from the random seed."""

    ihc_score: int
    her2_status: int
    status_cue: bool
    size: int = 672
    cell_diameter_px: float = 24.0
    stains: StainSet = field(default=INTERNAL_STAINS)
    tear: bool = False
    fold: bool = False
    partial: bool = False
    blur_sigma: float = 0.0


class _Field:
    """A smooth random field stored on a coarse grid and bilinearly sampled at pixel positions."""

    def __init__(self, rng: np.random.Generator, size: int, corr_px: float) -> None:
        self.spacing = max(1.0, corr_px / 3.0)
        n = int(np.ceil(size / self.spacing)) + 4
        grid = ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), 1.5, mode="wrap")
        grid -= grid.mean()
        grid /= grid.std() + 1e-6
        self.grid = grid.astype(np.float32)

    def _coords(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = p / self.spacing + 1.0
        i0 = np.clip(np.floor(g).astype(np.int64), 0, self.grid.shape[0] - 2)
        return i0, (g - i0).astype(np.float32)

    def rows(self, y0: int, y1: int, width: int) -> np.ndarray:
        """Field values on pixel rows y0..y1-1 and columns 0..width-1 (pixel centres)."""
        iy, wy = self._coords(np.arange(y0, y1) + 0.5)
        ix, wx = self._coords(np.arange(width) + 0.5)
        r = self.grid[iy] * (1 - wy)[:, None] + self.grid[iy + 1] * wy[:, None]
        return r[:, ix] * (1 - wx) + r[:, ix + 1] * wx

    def at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Field values at arbitrary points (used for per-seed decisions)."""
        iy, wy = self._coords(np.asarray(y, dtype=np.float64))
        ix, wx = self._coords(np.asarray(x, dtype=np.float64))
        g = self.grid
        return (
            g[iy, ix] * (1 - wy) * (1 - wx)
            + g[iy + 1, ix] * wy * (1 - wx)
            + g[iy, ix + 1] * (1 - wy) * wx
            + g[iy + 1, ix + 1] * wy * wx
        )


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 below lo, 1 above hi, smooth (cubic) in between; float32."""
    t = np.clip((x - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32, copy=False)


@dataclass
class _Plan:
    """All random choices of one core, drawn up front so strips can be rendered independently."""

    size: int
    d: float
    centre: float
    radius: float
    f_arch: _Field
    f_rim: _Field
    f_low: _Field
    f_mid: _Field
    f_fine: _Field
    f_patch: _Field
    f_warp: _Field
    t_epi: float
    t_lumen: float
    fibre_angle: float
    sy: np.ndarray
    sx: np.ndarray
    kind: np.ndarray  # 0 none, 1 tumour, 2 fibroblast, 3 lymphocyte
    na: np.ndarray
    nb: np.ndarray
    ncos: np.ndarray
    nsin: np.ndarray
    noy: np.ndarray
    nox: np.ndarray
    nh: np.ndarray
    nirr: np.ndarray
    dab: np.ndarray
    mem_width: float
    cyto_frac: float
    partial_membranes: bool
    cuts: list[tuple[str, tuple[float, ...]]]


def _plan(spec: CoreSpec, rng: np.random.Generator) -> _Plan:
    """Draw every random quantity of a core (fields, seeds, per-cell parameters, artefacts)."""
    if spec.ihc_score not in _DAB_MODEL:
        raise ValueError(f"ihc_score must be 0..3, got {spec.ihc_score}")
    size, d = int(spec.size), float(spec.cell_diameter_px)
    if size < 32 or d < 4:
        raise ValueError("size must be >= 32 px and cell_diameter_px >= 4")
    centre = size / 2.0
    radius = size * rng.uniform(0.455, 0.475)
    f_arch = _Field(rng, size, d * rng.uniform(2.2, 3.2))
    f_rim = _Field(rng, size, size * 0.08)
    f_low = _Field(rng, size, d * 4.0)
    f_mid = _Field(rng, size, d * 0.18)
    f_fine = _Field(rng, size, max(1.0, d * 0.07))
    f_patch = _Field(rng, size, d * 0.35)
    f_warp = _Field(rng, size, d * 2.5)
    # Architecture thresholds on the (unit-variance) field: stroma < t_epi < epithelium < t_lumen.
    t_epi = float(rng.uniform(-0.9, 0.1))
    t_lumen = float(t_epi + rng.uniform(1.0, 1.5)) if rng.random() < 0.8 else 9.0

    ny = int(np.ceil(size / d)) + 2
    gy, gx = np.meshgrid(np.arange(ny) - 1 + 0.5, np.arange(ny) - 1 + 0.5, indexing="ij")
    sy = ((gy + rng.uniform(-0.32, 0.32, gy.shape)) * d).astype(np.float32)
    sx = ((gx + rng.uniform(-0.32, 0.32, gx.shape)) * d).astype(np.float32)
    g_seed = f_arch.at(sy.ravel(), sx.ravel())
    n = g_seed.size
    u = rng.random(n)
    kind = np.where(
        (g_seed > t_epi) & (g_seed < t_lumen),
        1,
        np.where(g_seed <= t_epi, np.where(u < 0.28, 2, np.where(u < 0.34, 3, 0)), 0),
    ).astype(np.int8)

    theta = rng.uniform(0, np.pi, n)
    fibre_angle = float(rng.uniform(0, np.pi))
    cue = bool(spec.status_cue)
    k_area = 1.22 if cue else 1.0
    pleo = 0.16 if cue else 0.07
    scale = np.exp(rng.normal(0.0, pleo, n) - pleo**2)
    na = np.where(kind == 1, 0.30 * d * k_area * scale, np.where(kind == 2, 0.34 * d, 0.13 * d))
    nb = np.where(kind == 1, 0.21 * d * k_area * scale * rng.uniform(0.8, 1.05, n), np.where(kind == 2, 0.075 * d, 0.12 * d))
    theta = np.where(kind == 2, fibre_angle + rng.normal(0, 0.25, n), theta)
    nh = np.where(kind == 1, (0.62 if not cue else 0.90) * rng.uniform(0.85, 1.15, n), np.where(kind == 2, 0.85, 1.25))
    nirr = np.where(kind == 1, 0.22 if cue else 0.06, 0.03)
    off = 0.06 * d
    noy, nox = rng.uniform(-off, off, n), rng.uniform(-off, off, n)

    frac_range, conc, cyto_frac, width_k, partial_mem = _DAB_MODEL[spec.ihc_score]
    frac = rng.uniform(*frac_range)
    stained = rng.random(n) < frac
    dab = np.where((kind == 1) & stained, conc * np.exp(rng.normal(0.0, 0.22, n)), 0.0)

    cuts: list[tuple[str, tuple[float, ...]]] = []
    if spec.partial:
        phi = rng.uniform(0, 2 * np.pi)
        if rng.random() < 0.5:
            cuts.append(("chord", (np.cos(phi), np.sin(phi), radius * rng.uniform(0.2, 0.55))))
        else:
            r_b = radius * rng.uniform(0.4, 0.65)
            cuts.append(("bite", (centre + radius * np.cos(phi), centre + radius * np.sin(phi), r_b)))
    if spec.tear:
        phi = rng.uniform(0, np.pi)
        cuts.append(("tear", (np.cos(phi), np.sin(phi), rng.uniform(-0.3, 0.3) * radius, max(1.0, d * rng.uniform(0.08, 0.2)))))
    if spec.fold:
        phi = rng.uniform(0, np.pi)
        cuts.append(("fold", (np.cos(phi), np.sin(phi), rng.uniform(-0.5, 0.5) * radius, radius * rng.uniform(0.05, 0.12))))

    f32 = np.float32
    return _Plan(
        size=size, d=d, centre=centre, radius=radius,
        f_arch=f_arch, f_rim=f_rim, f_low=f_low, f_mid=f_mid, f_fine=f_fine, f_patch=f_patch, f_warp=f_warp,
        t_epi=t_epi, t_lumen=t_lumen, fibre_angle=fibre_angle,
        sy=sy, sx=sx, kind=kind,
        na=na.astype(f32), nb=nb.astype(f32), ncos=np.cos(theta).astype(f32), nsin=np.sin(theta).astype(f32),
        noy=noy.astype(f32), nox=nox.astype(f32), nh=nh.astype(f32), nirr=nirr.astype(f32), dab=dab.astype(f32),
        mem_width=max(0.7, 0.05 * d) * width_k, cyto_frac=cyto_frac, partial_membranes=partial_mem, cuts=cuts,
    )


def _render_strip(p: _Plan, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Haematoxylin, DAB and extra optical density of rows y0..y1-1."""
    w, d = p.size, np.float32(p.d)
    yy = (np.arange(y0, y1, dtype=np.float32) + 0.5)[:, None]
    xx = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    c = np.float32(p.centre)

    # Core disk with a wavy rim, then missing parts.
    r = np.sqrt((xx - c) ** 2 + (yy - c) ** 2)
    rim = p.radius * (1.0 + 0.012 * p.f_rim.rows(y0, y1, w))
    core = np.clip((rim - r) / 1.5 + 0.5, 0.0, 1.0)
    del r, rim
    fold = None
    for kind, a in p.cuts:
        if kind == "chord":
            proj = (xx - c) * np.float32(a[0]) + (yy - c) * np.float32(a[1])
            core *= np.clip((np.float32(a[2]) - proj) / 1.5 + 0.5, 0.0, 1.0)
        elif kind == "bite":
            rb = np.sqrt((xx - np.float32(a[0])) ** 2 + (yy - np.float32(a[1])) ** 2)
            rb += np.float32(0.06 * a[2]) * p.f_rim.rows(y0, y1, w)
            core *= np.clip((rb - np.float32(a[2])) / 1.5 + 0.5, 0.0, 1.0)
        elif kind == "tear":
            s = (xx - c) * np.float32(a[0]) + (yy - c) * np.float32(a[1]) - np.float32(a[2])
            s += np.float32(0.05 * p.radius) * p.f_rim.rows(y0, y1, w)
            along = -(xx - c) * np.float32(a[1]) + (yy - c) * np.float32(a[0])
            crack = (np.abs(s) < np.float32(a[3])) & (np.abs(along) < np.float32(0.75 * p.radius))
            core *= ~crack
        elif kind == "fold":
            s = (xx - c) * np.float32(a[0]) + (yy - c) * np.float32(a[1]) - np.float32(a[2])
            fold = _smoothstep(np.float32(a[3]) - np.abs(s), 0.0, 2.0)

    # Architecture.
    g = p.f_arch.rows(y0, y1, w)
    lumen = _smoothstep(g, p.t_lumen - 0.02, p.t_lumen + 0.02)
    epi = _smoothstep(g, p.t_epi - 0.02, p.t_epi + 0.02) * (1.0 - lumen)
    stroma = 1.0 - epi - lumen
    del g

    # Voronoi: nearest and second-nearest seed among the 3x3 neighbouring grid cells.
    h = y1 - y0
    giy = (np.floor(yy[:, 0] / d)).astype(np.int64) + 1
    gix = (np.floor(xx[0] / d)).astype(np.int64) + 1
    ncol = p.sy.shape[1]
    d1 = np.full((h, w), np.inf, np.float32)
    d2 = np.full((h, w), np.inf, np.float32)
    lab = np.zeros((h, w), np.int64)
    for di in (-1, 0, 1):
        iy = (giy + di)[:, None]
        for dj in (-1, 0, 1):
            ix = (gix + dj)[None, :]
            dd = (yy - p.sy[iy, ix]) ** 2 + (xx - p.sx[iy, ix]) ** 2
            closer = dd < d1
            np.copyto(d2, np.where(closer, d1, np.minimum(d2, dd)))
            np.copyto(d1, dd, where=closer)
            np.copyto(lab, iy * ncol + ix, where=closer)
    md = (np.sqrt(d2) - np.sqrt(d1)) * 0.5
    del d1, d2
    sy_f, sx_f = p.sy.ravel(), p.sx.ravel()
    dy = yy - sy_f[lab] - p.noy[lab]
    dx = xx - sx_f[lab] - p.nox[lab]
    cs, sn = p.ncos[lab], p.nsin[lab]
    u = (dx * cs + dy * sn) / p.na[lab]
    v = (dy * cs - dx * sn) / p.nb[lab]
    del dx, dy, cs, sn
    rn = np.sqrt(u * u + v * v)
    del u, v
    mid = p.f_mid.rows(y0, y1, w)
    rn *= 1.0 + p.nirr[lab] * mid
    kind = p.kind[lab]
    nb_px = p.nb[lab]
    nuc = np.clip((1.0 - rn) * nb_px + 0.5, 0.0, 1.0) * (kind > 0)
    tum = kind == 1
    nuc *= np.where(tum, epi, stroma)
    fine = p.f_fine.rows(y0, y1, w)
    chromatin = np.clip(0.8 + 0.35 * fine + 0.3 * np.exp(-((rn - 0.88) / 0.12) ** 2), 0.3, 2.0)
    del rn, nb_px
    nuc_h = nuc * p.nh[lab] * chromatin

    # Stroma fibres: wavy parallel fibres with a slowly varying phase.
    low = p.f_low.rows(y0, y1, w)
    ca, sa = np.float32(np.cos(p.fibre_angle)), np.float32(np.sin(p.fibre_angle))
    phase = (xx * -sa + yy * ca) * np.float32(2 * np.pi / (0.32 * p.d)) + np.float32(6.0) * p.f_warp.rows(y0, y1, w)
    fib = (0.5 + 0.5 * np.sin(phase)) ** 3
    del phase
    stroma_h = (0.14 + 0.025 * low) * (0.8 + 0.3 * fib + 0.1 * fine)

    # Membranes and DAB.
    mw = np.float32(p.mem_width)
    mem = np.exp(-((md / mw) ** 2)) * epi
    del md
    cell_dab = p.dab[lab]
    if p.partial_membranes:
        mem_dab = mem * _smoothstep(p.f_patch.rows(y0, y1, w), 0.1, 0.5)
    else:
        mem_dab = mem
    region = np.clip(1.0 + 0.18 * low, 0.6, 1.4)
    dab = cell_dab * region * (mem_dab + np.float32(p.cyto_frac) * epi * (0.85 + 0.15 * fine))
    cyto_h = epi * (0.11 + 0.02 * fine)
    h_conc = stroma * stroma_h + cyto_h + 0.10 * mem + nuc_h + lumen * 0.008 * (1.0 + 0.3 * fine)
    h_conc = h_conc * core
    dab = dab * core
    if fold is not None:
        h_conc *= 1.0 + fold
        dab *= 1.0 + fold
    extra = (0.006 * fine + 0.035 * core).astype(np.float32)
    return h_conc.astype(np.float32), dab.astype(np.float32), extra


def render_core(spec: CoreSpec, rng: np.random.Generator) -> np.ndarray:
    """Render one synthetic HER2 IHC core as a (size, size, 3) uint8 RGB image on glass."""
    p = _plan(spec, rng)
    out = np.empty((p.size, p.size, 3), dtype=np.uint8)
    for y0 in range(0, p.size, _STRIP_ROWS):
        y1 = min(p.size, y0 + _STRIP_ROWS)
        h_conc, dab, extra = _render_strip(p, y0, y1)
        out[y0:y1] = render_optical_density(h_conc, dab, spec.stains, extra_od=extra)
    if spec.blur_sigma > 0:
        for ch in range(3):
            out[..., ch] = ndimage.gaussian_filter(out[..., ch], sigma=float(spec.blur_sigma))
    return out


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """Encode an RGB uint8 image as JPEG bytes; compression artefacts follow ``quality``."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError("expected an (H, W, 3) uint8 image")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality), subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()
