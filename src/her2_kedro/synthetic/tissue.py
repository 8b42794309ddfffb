"""Procedural HER2 IHC tissue-microarray cores: a round core of gastric adenocarcinoma on glass.

Model (all lengths scale with ``CoreSpec.cell_diameter_px``):
- core: a disk of ~93 % of the image side with a smooth, slightly oval rim (a low-order Fourier
  series in the angle), on glass (the stain set's background colour);
- architecture (``_geometry``): lumen centre lines are the zero set of a gland-scale field; the
  tumour band is the set of points closer to one than a half-width that grows with a regional
  field (gland-scale plus core-scale: regional tumour content), its threshold a quantile set by
  the core's tumour fraction (tumour share of the tissue, ``CoreSpec.tumour_fraction``); so
  elongated, branching tubular glands thicken and merge into sheets where tumour content is high
  and thin out into small glands and cords where it is low. A glass-clear lumen runs down the
  middle of bands wider than the epithelial lining, septa (narrow stromal strands along the zero
  set of a second field) split wide sheets into back-to-back glands and nests, stroma elsewhere;
  ~20 % of cores have no lumens (solid nests; drawn per core, independent of every label);
- cells: a Voronoi tessellation of jittered-grid seeds (in a lining, a metric stretched across
  it, so cells are columnar); tumour cells get membranes (the Voronoi edges plus the basal and
  apical borders of the lining), pale cytoplasm and an oval vesicular haematoxylin nucleus (pale
  centre, chromatin rim, granular texture, a nucleolus) that in a gland lining is elongated
  perpendicular to the lumen and shifted basally; stromal seeds get sparse spindle fibroblast
  nuclei and a few small dark lymphocytes; stroma is pale haematoxylin with a wavy fibre texture;
- DAB, per tumour cell, by staining category (gastric HER2 criteria, Hofmann/Rueschoff, >= 10 %
  of tumour cells): faint partial membranes (a patchy mask removes part of each membrane);
  weak-moderate complete; strong, thicker complete plus a cytoplasmic blush; and moderate but
  fragmented (partial) membranes, which a pathologist scores 1. A score fixes the category
  fractions (``_composition``): 0 -- < 10 % faint partial; 1 -- 15-80 % faint partial, up to 20 %
  fragmented moderate, < 5 % complete; 2 -- 10-90 % weak-moderate complete (10-40 % in 40 % of
  cores), < 5 % strong; 3 -- 10-100 % strong (10-40 % in 35 % of cores) plus weak-moderate ones.
  Categories are handed out at random (diffuse) or down a smooth field so the most stained cells
  form a patch (focal, ``CoreSpec.focal``). Per-cell intensity is log-normal, per-core intensity
  within a category varies ~12 %, a regional field modulates it, and a per-core DAB gain
  (``CoreSpec.dab_gain``: staining run, section thickness; log-normal, median 1, log-sd 0.3)
  scales it all. So the score is defined by the staining pattern while the paper's max-mean-DAB
  overlaps between neighbouring scores, as on real cores; fields left None in the spec are drawn
  from the core's generator (defaults ``DAB_GAIN_SD``, ``TUMOUR_FRACTION_RANGE``, ``FOCAL_RATE``).

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

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from her2_kedro.imaging.pixels import encode_jpeg  # noqa: F401  (re-exported: the synthetic API's encoder)
from her2_kedro.synthetic.optics import INTERNAL_STAINS, StainSet, render_optical_density

_STRIP_ROWS = 384

# Staining categories of a tumour cell: membrane DAB concentration (median), its per-cell log-sd,
# cytoplasmic blush (fraction of the membrane concentration), membrane width factor, partial
# membranes (a patchy mask removes part of each membrane).
_CATEGORY: dict[int, tuple[float, float, float, float, bool]] = {
    1: (0.30, 0.30, 0.04, 1.0, True),  # faint, barely perceptible, partial
    2: (0.62, 0.25, 0.10, 1.1, False),  # weak to moderate, complete
    3: (1.30, 0.22, 0.30, 1.5, False),  # strong, complete
    4: (0.62, 0.25, 0.04, 1.1, True),  # moderate but incomplete (fragmented): scored 1
}
#: Categories in the order they are handed out (highest first, the focus of a focal core).
_CATEGORY_ORDER = (3, 2, 4, 1)

#: Defaults of the per-core nuisance draws used when a ``CoreSpec`` field is None.
DAB_GAIN_SD = 0.3  # log-normal sd of the staining-run / section-thickness DAB gain (median 1)
TUMOUR_FRACTION_RANGE = (0.2, 0.9)  # uniform range of the tumour share of the core's tissue
FOCAL_RATE = 0.3  # probability that the stained cells are clustered in a patch
_BIG_WEIGHT = 0.8  # weight of the core-scale field in the architecture (regional tumour content)
_HW_GAIN = 0.55  # tumour-band half-width (cell diameters) per unit of the regional field
_EPI_CELLS = 1.3  # thickness of the epithelial lining around a lumen (cell diameters)
_SEPTUM = 0.2  # half-width of the stromal septa that split tumour sheets (cell diameters)
_COLUMNAR = 1.35  # stretch of the cell metric across a gland lining (columnar cells)


def _composition(score: int, rng: np.random.Generator) -> dict[int, float]:
    """Fractions of tumour cells in each staining category for a core of this IHC score.

    Gastric criteria (Hofmann/Ruschoff, >= 10 % of tumour cells): 0 -- < 10 % faint partial;
    1 -- >= 10 % faint partial (some fragmented moderate membranes), < 10 % complete; 2 -- >= 10 %
    weak-moderate complete, < 10 % strong; 3 -- >= 10 % strong complete. Always 4 draws.
    """
    u = rng.random(4)
    if score == 0:
        return {1: 0.08 * u[0]}
    if score == 1:
        return {2: 0.05 * u[0], 4: 0.20 * u[1], 1: 0.15 + 0.65 * u[2]}
    if score == 2:
        f2 = 0.10 + 0.30 * u[0] if u[3] < 0.4 else 0.40 + 0.50 * u[0]
        f3 = 0.05 * u[1]
        return {3: f3, 2: f2, 1: 0.6 * u[2] * (1.0 - f2 - f3)}
    f3 = 0.10 + 0.30 * u[0] if u[3] < 0.35 else 0.40 + 0.60 * u[0]
    f2 = 0.7 * u[1] * (1.0 - f3)
    return {3: f3, 2: f2, 1: 0.5 * u[2] * (1.0 - f3 - f2)}


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
    dab_gain: float | None = None
    tumour_fraction: float | None = None
    focal: bool | None = None


class _Field:
    """A smooth random field stored on a coarse grid and bilinearly sampled at pixel positions.

    With ``grad`` the field's spatial gradient (per pixel) is stored too, so the distance to the
    field's zero set can be estimated as |f| / |grad f| (used for the gland geometry).
    """

    def __init__(
        self, rng: np.random.Generator, size: int, corr_px: float, grad: bool = False
    ) -> None:
        self.spacing = max(1.0, corr_px / 3.0)
        n = int(np.ceil(size / self.spacing)) + 4
        grid = ndimage.gaussian_filter(
            rng.standard_normal((n, n)).astype(np.float32), 1.5, mode="wrap"
        )
        grid -= grid.mean()
        grid /= grid.std() + 1e-6
        self.grid = grid.astype(np.float32)
        self.grads: tuple[np.ndarray, np.ndarray] | None = None
        if grad:
            gy, gx = np.gradient(self.grid.astype(np.float64))
            self.grads = (
                (gy / self.spacing).astype(np.float32),
                (gx / self.spacing).astype(np.float32),
            )

    def _coords(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = p / self.spacing + 1.0
        i0 = np.clip(np.floor(g).astype(np.int64), 0, self.grid.shape[0] - 2)
        return i0, (g - i0).astype(np.float32)

    def rows(self, y0: int, y1: int, width: int) -> np.ndarray:
        """Field values on pixel rows y0..y1-1 and columns 0..width-1 (pixel centres)."""
        return self._rows((self.grid,), y0, y1, width)[0]

    def rows_grad(self, y0: int, y1: int, width: int) -> list[np.ndarray]:
        """Field value and gradient (d/dy, d/dx per pixel) on rows y0..y1-1."""
        assert self.grads is not None
        return self._rows((self.grid, *self.grads), y0, y1, width)

    def _rows(
        self, grids: tuple[np.ndarray, ...], y0: int, y1: int, width: int
    ) -> list[np.ndarray]:
        iy, wy = self._coords(np.arange(y0, y1) + 0.5)
        ix, wx = self._coords(np.arange(width) + 0.5)
        out = []
        for grid in grids:
            r = grid[iy] * (1 - wy)[:, None] + grid[iy + 1] * wy[:, None]
            out.append(r[:, ix] * (1 - wx) + r[:, ix + 1] * wx)
        return out

    def at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Field values at arbitrary points (used for per-seed decisions)."""
        return self._at(self.grid, y, x)

    def at_grad(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Field value and gradient (d/dy, d/dx per pixel) at arbitrary points."""
        assert self.grads is not None
        return tuple(self._at(g, y, x) for g in (self.grid, *self.grads))

    def _at(self, g: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        iy, wy = self._coords(np.asarray(y, dtype=np.float64))
        ix, wx = self._coords(np.asarray(x, dtype=np.float64))
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
    rim_k: np.ndarray  # angular frequencies of the rim's Fourier modulation
    rim_a: np.ndarray  # their amplitudes (fractions of the radius)
    rim_phi: np.ndarray  # and phases
    f_gland: _Field
    f_sept: _Field
    f_arch: _Field
    f_big: _Field
    f_rim: _Field
    f_low: _Field
    f_mid: _Field
    f_fine: _Field
    f_patch: _Field
    f_warp: _Field
    t_band: float
    lumen_w: float
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
    nl_u: np.ndarray  # nucleolus offset along / across the nucleus's long axis (px)
    nl_v: np.ndarray
    nl_h: np.ndarray  # nucleolus haematoxylin (0: none)
    category: np.ndarray  # staining category of each cell (0 none, see _CATEGORY)
    dab: np.ndarray  # membrane DAB concentration of each cell (gain included)
    cyto: np.ndarray  # cytoplasmic DAB concentration of each cell
    width: np.ndarray  # membrane width of each cell (px)
    partial_mem: np.ndarray  # 1.0 where a cell's membrane is partial (patchy), else 0.0
    any_partial: bool
    dab_gain: float
    tumour_fraction: float
    focal: bool
    cuts: list[tuple[str, tuple[float, ...]]]


def _geometry(
    d: float,
    t_band: float,
    lumen_w: float,
    gland: tuple[np.ndarray, np.ndarray, np.ndarray],
    sept: tuple[np.ndarray, np.ndarray, np.ndarray],
    reg: np.ndarray,
    lumen_mod: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Gland geometry at points (pixels or seeds), all in pixels.

    Lumen centre lines are the zero set of the gland field n; s = |n| / |grad n| estimates the
    distance to the nearest one. The tumour band is s < hw, its half-width hw growing with the
    regional field (so glands thicken and merge into sheets where tumour content is high and
    thin out and break up where it is low); a lumen of half-width wl runs down its middle where
    the band is wider than the epithelial lining; septa (narrow strands of stroma) follow the
    zero set of a second field and split wide sheets into glands and nests.
    Returns s, hw, wl, distance to the septum line, and the unit normal (ny, nx) of the lining.
    """
    n, ny, nx = gland
    gn = np.sqrt(ny * ny + nx * nx) + np.float32(1e-4 / d)
    s = np.minimum(np.abs(n) / gn, np.float32(8.0 * d))
    hw = np.float32(d) * (np.float32(_HW_GAIN) * reg - np.float32(t_band))
    wl = np.clip(
        np.minimum(hw - np.float32(_EPI_CELLS * d), np.float32(lumen_w) * (1.0 + 0.35 * lumen_mod)),
        0.0,
        None,
    )
    m, my, mx = sept
    sm = np.minimum(np.abs(m) / (np.sqrt(my * my + mx * mx) + np.float32(1e-4 / d)), 8.0 * d)
    sgn = np.sign(n) / gn
    return s, hw, wl, sm, ny * sgn, nx * sgn


def _plan(spec: CoreSpec, rng: np.random.Generator) -> _Plan:
    """Draw every random quantity of a core (fields, seeds, per-cell parameters, artefacts).

    The per-core nuisances (DAB gain, tumour fraction, focal staining) are always drawn, then
    replaced by the spec's value where one is given, so a spec that fixes them renders the same
    tissue as one that does not.
    """
    if spec.ihc_score not in (0, 1, 2, 3):
        raise ValueError(f"ihc_score must be 0..3, got {spec.ihc_score}")
    size, d = int(spec.size), float(spec.cell_diameter_px)
    if size < 32 or d < 4:
        raise ValueError("size must be >= 32 px and cell_diameter_px >= 4")
    if spec.dab_gain is not None and not spec.dab_gain >= 0:
        raise ValueError(f"dab_gain must be >= 0, got {spec.dab_gain}")
    if spec.tumour_fraction is not None and not 0.0 <= spec.tumour_fraction <= 1.0:
        raise ValueError(f"tumour_fraction must lie in [0, 1], got {spec.tumour_fraction}")
    centre = size / 2.0
    radius = size * rng.uniform(0.455, 0.475)
    # Smooth rim: a low-order Fourier series in the angle (slightly oval, gently wavy).
    rim_k = np.arange(2, 10, dtype=np.float64)
    rim_a = rng.normal(0.0, 1.0, rim_k.size) * 0.016 / rim_k**1.2
    rim_a[0] = rng.uniform(0.0, 0.03)  # ovality
    rim_phi = rng.uniform(0, 2 * np.pi, rim_k.size)
    ang = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    r_max = 1.0 + np.max(
        np.sum(rim_a[:, None] * np.cos(rim_k[:, None] * ang + rim_phi[:, None]), 0)
    )
    radius = min(radius, 0.485 * size / r_max)
    f_gland = _Field(rng, size, d * rng.uniform(3.0, 4.0), grad=True)
    f_sept = _Field(rng, size, d * rng.uniform(4.0, 5.5), grad=True)
    f_arch = _Field(rng, size, d * rng.uniform(2.2, 3.2))
    f_big = _Field(rng, size, d * 9.0)
    f_rim = _Field(rng, size, size * 0.08)
    f_low = _Field(rng, size, d * 4.0)
    f_mid = _Field(rng, size, d * 0.18)
    f_fine = _Field(rng, size, max(1.0, d * 0.07))
    f_patch = _Field(rng, size, d * 0.35)
    f_warp = _Field(rng, size, d * 2.5)
    f_focus = _Field(rng, size, d * 5.0)

    # Per-core nuisances (independent of every label).
    gain = float(np.exp(rng.normal(0.0, DAB_GAIN_SD)))
    tumour_fraction = float(rng.uniform(*TUMOUR_FRACTION_RANGE))
    focal = bool(rng.random() < FOCAL_RATE)
    lumen_ratio = (
        float(rng.uniform(0.1, 0.4)) if rng.random() < 0.8 else 0.0
    )  # lumen / epithelium area
    gain = gain if spec.dab_gain is None else float(spec.dab_gain)
    tumour_fraction = (
        tumour_fraction if spec.tumour_fraction is None else float(spec.tumour_fraction)
    )
    focal = focal if spec.focal is None else bool(spec.focal)
    lumen_w = d * (0.3 + 1.6 * lumen_ratio) if lumen_ratio > 0 else 0.0

    ny = int(np.ceil(size / d)) + 2
    gy, gx = np.meshgrid(np.arange(ny) - 1 + 0.5, np.arange(ny) - 1 + 0.5, indexing="ij")
    sy = ((gy + rng.uniform(-0.32, 0.32, gy.shape)) * d).astype(np.float32)
    sx = ((gx + rng.uniform(-0.32, 0.32, gx.shape)) * d).astype(np.float32)
    sy_f, sx_f = sy.ravel(), sx.ravel()
    reg_seed = (f_arch.at(sy_f, sx_f) + _BIG_WEIGHT * f_big.at(sy_f, sx_f)).astype(np.float32)
    gland = tuple(v.astype(np.float32) for v in f_gland.at_grad(sy_f, sx_f))
    sept = tuple(v.astype(np.float32) for v in f_sept.at_grad(sy_f, sx_f))
    inside = (sy_f - centre) ** 2 + (sx_f - centre) ** 2 < radius**2
    # Architecture from a quantile over the core's seeds: the tumour band (epithelium E plus
    # lumens L = lumen_ratio * E of the disk, E / (1 - L) = tumour fraction) is where the score
    # _HW_GAIN * reg - s / d exceeds t_band, i.e. where s < hw.
    epi_share = tumour_fraction / (1.0 + lumen_ratio * tumour_fraction)
    band_share = (1.0 + lumen_ratio) * epi_share
    sel = inside if inside.any() else np.ones_like(inside)
    s0 = np.minimum(np.abs(gland[0]) / (np.hypot(gland[1], gland[2]) + 1e-4 / d), 8.0 * d)
    q = _HW_GAIN * reg_seed - s0 / d
    t_band = float(np.quantile(q[sel], 1.0 - band_share)) if band_share > 0 else 99.0
    s, hw, wl, sm, nrm_y, nrm_x = _geometry(
        d, t_band, lumen_w, gland, sept, reg_seed, f_low.at(sy_f, sx_f).astype(np.float32)
    )
    septum = (sm < _SEPTUM * d) & (s > wl + _EPI_CELLS * d)
    n = sy_f.size
    u = rng.random(n)
    kind = np.where((s < hw) & ~septum, 1, np.where(u < 0.28, 2, np.where(u < 0.34, 3, 0))).astype(
        np.int8
    )
    columnar = (wl > 0.3 * d) & (s < wl + 1.6 * d) & (kind == 1)

    theta = rng.uniform(0, np.pi, n)
    fibre_angle = float(rng.uniform(0, np.pi))
    cue = bool(spec.status_cue)
    k_area = 1.22 if cue else 1.0
    pleo = 0.16 if cue else 0.07
    scale = np.exp(rng.normal(0.0, pleo, n) - pleo**2)
    aspect = rng.uniform(0.8, 1.05, n)
    theta_noise = rng.normal(0, 0.18, n)
    na = np.where(kind == 1, 0.30 * d * k_area * scale, np.where(kind == 2, 0.34 * d, 0.13 * d))
    nb = np.where(
        kind == 1,
        0.21 * d * k_area * scale * aspect,
        np.where(kind == 2, 0.075 * d, 0.12 * d),
    )
    # Columnar lining: nuclei elongated across the lining (perpendicular to the lumen) and
    # shifted towards the basal side (same area, so the cue's nuclear size is unchanged).
    na = np.where(columnar, na * 1.35, na)
    nb = np.where(columnar, nb * 0.74, nb)
    theta = np.where(columnar, np.arctan2(nrm_y, nrm_x) + theta_noise, theta)
    theta = np.where(kind == 2, fibre_angle + rng.normal(0, 0.25, n), theta)
    nh = np.where(
        kind == 1,
        (0.62 if not cue else 0.90) * rng.uniform(0.85, 1.15, n),
        np.where(kind == 2, 0.85, 1.25),
    )
    nirr = np.where(kind == 1, 0.22 if cue else 0.06, 0.03)
    off = 0.06 * d
    noy, nox = rng.uniform(-off, off, n), rng.uniform(-off, off, n)
    noy = np.where(columnar, noy + 0.14 * d * nrm_y, noy)
    nox = np.where(columnar, nox + 0.14 * d * nrm_x, nox)
    nl_u = rng.uniform(-0.35, 0.35, n) * na
    nl_v = rng.uniform(-0.3, 0.3, n) * nb
    nl_h = np.where((kind == 1) & (rng.random(n) < 0.85), 1.1 * nh, 0.0)

    # Staining: category fractions of the score, handed out highest first along a random order
    # (diffuse) or down a smooth field (focal: the most stained cells form a patch).
    fractions = _composition(spec.ihc_score, rng)
    key_diffuse = rng.random(n)
    key_focal = f_focus.at(sy_f, sx_f) + 0.35 * rng.standard_normal(n)
    cell_noise = rng.standard_normal(n)
    core_k = np.exp(rng.normal(0.0, 0.12, 5))  # per-core intensity within each category
    tumour = np.flatnonzero((kind == 1) & inside)
    key = key_focal if focal else key_diffuse
    order = tumour[np.argsort(-key[tumour], kind="stable")]
    category = np.zeros(n, np.int8)
    start = 0
    for cat in _CATEGORY_ORDER:
        k = int(round(fractions.get(cat, 0.0) * tumour.size))
        category[order[start : start + k]] = cat
        start += k
    med, sd, cyto_k, width_k, partial_k = (np.zeros(5) for _ in range(5))
    for cat, (m, s_, c, w, pm) in _CATEGORY.items():
        med[cat], sd[cat], cyto_k[cat], width_k[cat], partial_k[cat] = (
            m * core_k[cat],
            s_,
            c,
            w,
            float(pm),
        )
    width_k[0] = 1.0
    dab = gain * med[category] * np.exp(sd[category] * cell_noise)
    partial_mem = partial_k[category]

    cuts: list[tuple[str, tuple[float, ...]]] = []
    if spec.partial:
        phi = rng.uniform(0, 2 * np.pi)
        if rng.random() < 0.5:
            cuts.append(("chord", (np.cos(phi), np.sin(phi), radius * rng.uniform(0.2, 0.55))))
        else:
            r_b = radius * rng.uniform(0.4, 0.65)
            cuts.append(
                ("bite", (centre + radius * np.cos(phi), centre + radius * np.sin(phi), r_b))
            )
    if spec.tear:
        phi = rng.uniform(0, np.pi)
        cuts.append(
            (
                "tear",
                (
                    np.cos(phi),
                    np.sin(phi),
                    rng.uniform(-0.3, 0.3) * radius,
                    max(1.0, d * rng.uniform(0.08, 0.2)),
                ),
            )
        )
    if spec.fold:
        phi = rng.uniform(0, np.pi)
        cuts.append(
            (
                "fold",
                (
                    np.cos(phi),
                    np.sin(phi),
                    rng.uniform(-0.5, 0.5) * radius,
                    radius * rng.uniform(0.05, 0.12),
                ),
            )
        )

    f32 = np.float32
    return _Plan(
        size=size,
        d=d,
        centre=centre,
        radius=radius,
        rim_k=rim_k,
        rim_a=rim_a,
        rim_phi=rim_phi,
        f_gland=f_gland,
        f_sept=f_sept,
        f_arch=f_arch,
        f_big=f_big,
        f_rim=f_rim,
        f_low=f_low,
        f_mid=f_mid,
        f_fine=f_fine,
        f_patch=f_patch,
        f_warp=f_warp,
        t_band=t_band,
        lumen_w=lumen_w,
        fibre_angle=fibre_angle,
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
        category=category,
        dab=dab.astype(f32),
        cyto=(dab * cyto_k[category]).astype(f32),
        width=(max(0.7, 0.05 * d) * width_k[category]).astype(f32),
        partial_mem=partial_mem.astype(f32),
        any_partial=bool(partial_mem.any()),
        dab_gain=gain,
        tumour_fraction=tumour_fraction,
        focal=focal,
        cuts=cuts,
    )


def _render_strip(p: _Plan, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Haematoxylin, DAB and extra optical density of rows y0..y1-1."""
    w, d = p.size, np.float32(p.d)
    f32 = np.float32
    yy = (np.arange(y0, y1, dtype=np.float32) + 0.5)[:, None]
    xx = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    c = np.float32(p.centre)

    # Core disk with a smooth (Fourier-modulated) rim, then missing parts.
    r = np.sqrt((xx - c) ** 2 + (yy - c) ** 2)
    phi = np.arctan2(yy - c, xx - c)
    mod = np.ones_like(r)
    for k, a_k, ph in zip(p.rim_k, p.rim_a, p.rim_phi, strict=True):
        mod += f32(a_k) * np.cos(f32(k) * phi + f32(ph))
    core = np.clip((f32(p.radius) * mod - r) / 1.5 + 0.5, 0.0, 1.0)
    del r, phi, mod
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

    # Architecture: tumour band around the lumen centre lines, lumens, septa (see _geometry).
    reg = p.f_arch.rows(y0, y1, w) + np.float32(_BIG_WEIGHT) * p.f_big.rows(y0, y1, w)
    low = p.f_low.rows(y0, y1, w)
    s, hw, wl, sm, nrm_y, nrm_x = _geometry(
        p.d,
        p.t_band,
        p.lumen_w,
        tuple(p.f_gland.rows_grad(y0, y1, w)),
        tuple(p.f_sept.rows_grad(y0, y1, w)),
        reg,
        low,
    )
    del reg
    band = _smoothstep(hw - s, -0.8, 0.8)
    has_lumen = _smoothstep(wl, 0.0, 1.0)
    lum = _smoothstep(wl - s, -0.8, 0.8) * has_lumen
    sep_gate = _smoothstep(s - wl - f32(_EPI_CELLS) * d, 0.0, 2.0)
    sep = _smoothstep(f32(_SEPTUM) * d - sm, -0.8, 0.8) * sep_gate
    lumen = band * lum
    epi = band * (1.0 - lum) * (1.0 - sep)
    stroma = 1.0 - epi - lumen
    # Columnar lining: the cell metric is stretched across the lining (cells taller than wide).
    colw = _smoothstep(wl, 0.3 * d, 0.7 * d) * _smoothstep(wl + 1.7 * d - s, 0.0, 0.5 * d)
    kcol = 1.0 + f32(_COLUMNAR - 1.0) * colw
    ik2 = 1.0 / (kcol * kcol)
    k2 = kcol * kcol
    del colw, kcol

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
            ey = yy - p.sy[iy, ix]
            ex = xx - p.sx[iy, ix]
            an = ey * nrm_y + ex * nrm_x
            at = ex * nrm_y - ey * nrm_x
            dd = an * an * ik2 + at * at * k2
            closer = dd < d1
            np.copyto(d2, np.where(closer, d1, np.minimum(d2, dd)))
            np.copyto(d1, dd, where=closer)
            np.copyto(lab, iy * ncol + ix, where=closer)
    del ey, ex, an, at, dd, closer, ik2, k2, nrm_y, nrm_x
    md = (np.sqrt(d2) - np.sqrt(d1)) * 0.5
    del d1, d2
    sy_f, sx_f = p.sy.ravel(), p.sx.ravel()
    dy = yy - sy_f[lab] - p.noy[lab]
    dx = xx - sx_f[lab] - p.nox[lab]
    cs, sn = p.ncos[lab], p.nsin[lab]
    du = dx * cs + dy * sn
    dv = dy * cs - dx * sn
    del dx, dy, cs, sn
    u = du / p.na[lab]
    v = dv / p.nb[lab]
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
    # Vesicular chromatin: pale centre, chromatin rim at the nuclear membrane, granular texture
    # and (tumour cells) a dark nucleolus.
    ring = np.exp(-(((rn - 0.86) / 0.14) ** 2))
    chromatin = np.clip(0.55 + 0.18 * fine + 0.12 * mid + 0.6 * ring, 0.25, 2.0)
    r_nl = f32(max(0.8, 0.055 * p.d))
    nl = np.exp(-((du - p.nl_u[lab]) ** 2 + (dv - p.nl_v[lab]) ** 2) / (r_nl * r_nl))
    del rn, nb_px, ring, du, dv
    nuc_h = nuc * (p.nh[lab] * chromatin + p.nl_h[lab] * nl)
    del nl, chromatin

    # Stroma fibres: wavy parallel fibres with a slowly varying phase.
    ca, sa = np.float32(np.cos(p.fibre_angle)), np.float32(np.sin(p.fibre_angle))
    phase = (xx * -sa + yy * ca) * np.float32(2 * np.pi / (0.32 * p.d)) + np.float32(
        6.0
    ) * p.f_warp.rows(y0, y1, w)
    fib = (0.5 + 0.5 * np.sin(phase)) ** 3
    del phase
    stroma_h = (0.13 + 0.025 * low) * (0.75 + 0.35 * fib + 0.1 * fine)

    # Membranes (cell borders plus the basal and apical borders of the lining and the borders
    # of septa) and DAB (per-cell concentration, width and partial mask).
    wid = p.width[lab]
    mem = np.exp(-((md / wid) ** 2))
    del md
    mem = np.maximum(mem, np.exp(-(((hw - s) / wid - 0.8) ** 2)))
    mem = np.maximum(mem, has_lumen * np.exp(-(((s - wl) / wid - 0.8) ** 2)))
    mem = np.maximum(mem, sep_gate * np.exp(-(((sm - f32(_SEPTUM) * d) / wid - 0.8) ** 2)))
    mem *= epi
    del s, hw, wl, sm, wid, has_lumen, sep_gate, band, lum, sep
    if p.any_partial:
        patchy = _smoothstep(p.f_patch.rows(y0, y1, w), 0.1, 0.5)
        mem_dab = mem * (1.0 - p.partial_mem[lab] * (1.0 - patchy))
        del patchy
    else:
        mem_dab = mem
    region = np.clip(1.0 + 0.18 * low, 0.6, 1.4)
    dab = region * (p.dab[lab] * mem_dab + p.cyto[lab] * epi * (0.85 + 0.15 * fine))
    cyto_h = epi * (0.10 + 0.02 * fine + 0.02 * mid)
    h_conc = stroma * stroma_h + cyto_h + 0.06 * mem + nuc_h + lumen * 0.008 * (1.0 + 0.3 * fine)
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
