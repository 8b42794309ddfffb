"""Geometry of a synthetic core: smooth random fields, the round core outline and its artefacts,
and the gland architecture (tumour band, lumens, septa) that the cells are laid out in.

All lengths are pixels and scale with the cell diameter ``d``. Lumen centre lines are the zero set
of a gland-scale field; the tumour band is the set of points closer to one than a half-width that
grows with a regional field (gland-scale plus core-scale: regional tumour content), its threshold
a quantile set by the core's tumour fraction; so elongated, branching tubular glands thicken and
merge into sheets where tumour content is high and thin out into small glands and cords where it
is low. A glass-clear lumen runs down the middle of bands wider than the epithelial lining; septa
(narrow stromal strands along the zero set of a second field) split wide sheets into glands.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BIG_WEIGHT = 0.8  # weight of the core-scale field in the architecture (regional tumour content)
HW_GAIN = 0.55  # tumour-band half-width (cell diameters) per unit of the regional field
EPI_CELLS = 1.3  # thickness of the epithelial lining around a lumen (cell diameters)
SEPTUM = 0.2  # half-width of the stromal septa that split tumour sheets (cell diameters)
COLUMNAR = 1.35  # stretch of the cell metric across a gland lining (columnar cells)
NO_LUMEN_RATE = 0.2  # share of cores without lumens (solid nests), independent of every label


def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 below lo, 1 above hi, smooth (cubic) in between; float32."""
    t = np.clip((x - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32, copy=False)


class Field:
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


class Texture:
    """Periodic fine noise (a small tile repeated at a random offset): chromatin granules, the
    grain of cytoplasm and stroma. Cheap at any core size, unlike a field on a 1 px grid."""

    def __init__(self, rng: np.random.Generator, grain_px: float, period: int = 256) -> None:
        tile = ndimage.gaussian_filter(
            rng.standard_normal((period, period)).astype(np.float32), grain_px, mode="wrap"
        )
        tile -= tile.mean()
        tile /= tile.std() + 1e-6
        self.tile = tile
        self.offset = rng.integers(0, period, 2)

    def rows(self, y0: int, y1: int, width: int) -> np.ndarray:
        """Texture values on pixel rows y0..y1-1 and columns 0..width-1."""
        n = self.tile.shape[0]
        iy = (np.arange(y0, y1) + self.offset[0]) % n
        ix = (np.arange(width) + self.offset[1]) % n
        return self.tile[iy[:, None], ix[None, :]]


@dataclass
class Outline:
    """The core's round outline (a Fourier-modulated rim) and its cut-away parts and artefacts."""

    centre: float
    radius: float
    rim_k: np.ndarray  # angular frequencies of the rim's Fourier modulation
    rim_a: np.ndarray  # their amplitudes (fractions of the radius)
    rim_phi: np.ndarray  # and phases
    cuts: list[tuple[str, tuple[float, ...]]]


def draw_outline(size: int, rng: np.random.Generator) -> Outline:
    """A disk of ~93 % of the image side with a smooth, slightly oval, gently wavy rim."""
    centre = size / 2.0
    radius = size * rng.uniform(0.455, 0.475)
    rim_k = np.arange(2, 10, dtype=np.float64)
    rim_a = rng.normal(0.0, 1.0, rim_k.size) * 0.016 / rim_k**1.2
    rim_a[0] = rng.uniform(0.0, 0.03)  # ovality
    rim_phi = rng.uniform(0, 2 * np.pi, rim_k.size)
    ang = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    r_max = 1.0 + np.max(
        np.sum(rim_a[:, None] * np.cos(rim_k[:, None] * ang + rim_phi[:, None]), 0)
    )
    radius = min(radius, 0.485 * size / r_max)
    return Outline(centre, radius, rim_k, rim_a, rim_phi, [])


def draw_cuts(
    outline: Outline, d: float, rng: np.random.Generator, partial: bool, tear: bool, fold: bool
) -> None:
    """Add the requested artefacts: a chord cut off or a bite missing at the rim (``partial``), a
    thin wavy glass-clear crack (``tear``) and a band of doubled optical density (``fold``)."""
    c, radius = outline.centre, outline.radius
    if partial:
        phi = rng.uniform(0, 2 * np.pi)
        if rng.random() < 0.5:
            outline.cuts.append(
                ("chord", (np.cos(phi), np.sin(phi), radius * rng.uniform(0.2, 0.55)))
            )
        else:
            r_b = radius * rng.uniform(0.4, 0.65)
            outline.cuts.append(("bite", (c + radius * np.cos(phi), c + radius * np.sin(phi), r_b)))
    if tear:
        phi = rng.uniform(0, np.pi)
        offset, width = rng.uniform(-0.3, 0.3) * radius, max(1.0, d * rng.uniform(0.08, 0.2))
        outline.cuts.append(("tear", (np.cos(phi), np.sin(phi), offset, width)))
    if fold:
        phi = rng.uniform(0, np.pi)
        offset, width = rng.uniform(-0.5, 0.5) * radius, radius * rng.uniform(0.05, 0.12)
        outline.cuts.append(("fold", (np.cos(phi), np.sin(phi), offset, width)))


def outline_rows(
    o: Outline, f_rim: Field, y0: int, y1: int, width: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Tissue coverage (0..1) of rows y0..y1-1 inside the outline minus its cuts, and the fold
    band (or None)."""
    f32 = np.float32
    yy = (np.arange(y0, y1, dtype=np.float32) + 0.5)[:, None]
    xx = (np.arange(width, dtype=np.float32) + 0.5)[None, :]
    c = f32(o.centre)
    r = np.sqrt((xx - c) ** 2 + (yy - c) ** 2)
    phi = np.arctan2(yy - c, xx - c)
    mod = np.ones_like(r)
    for k, a_k, ph in zip(o.rim_k, o.rim_a, o.rim_phi, strict=True):
        mod += f32(a_k) * np.cos(f32(k) * phi + f32(ph))
    core = np.clip((f32(o.radius) * mod - r) / 1.5 + 0.5, 0.0, 1.0)
    fold = None
    for kind, a in o.cuts:
        if kind == "chord":
            proj = (xx - c) * f32(a[0]) + (yy - c) * f32(a[1])
            core *= np.clip((f32(a[2]) - proj) / 1.5 + 0.5, 0.0, 1.0)
        elif kind == "bite":
            rb = np.sqrt((xx - f32(a[0])) ** 2 + (yy - f32(a[1])) ** 2)
            rb += f32(0.06 * a[2]) * f_rim.rows(y0, y1, width)
            core *= np.clip((rb - f32(a[2])) / 1.5 + 0.5, 0.0, 1.0)
        elif kind == "tear":
            s = (xx - c) * f32(a[0]) + (yy - c) * f32(a[1]) - f32(a[2])
            s += f32(0.05 * o.radius) * f_rim.rows(y0, y1, width)
            along = -(xx - c) * f32(a[1]) + (yy - c) * f32(a[0])
            crack = (np.abs(s) < f32(a[3])) & (np.abs(along) < f32(0.75 * o.radius))
            core *= ~crack
        elif kind == "fold":
            s = (xx - c) * f32(a[0]) + (yy - c) * f32(a[1]) - f32(a[2])
            fold = smoothstep(f32(a[3]) - np.abs(s), 0.0, 2.0)
    return core, fold


def gland_geometry(
    d: float,
    t_band: float,
    lumen_w: float,
    gland: tuple[np.ndarray, np.ndarray, np.ndarray],
    sept: tuple[np.ndarray, np.ndarray, np.ndarray],
    reg: np.ndarray,
    lumen_mod: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Gland geometry at points (pixels or seeds), all in pixels.

    s = |n| / |grad n| estimates the distance to the nearest lumen centre line (zero set of the
    gland field n); the tumour band is s < hw, its half-width hw growing with the regional field;
    a lumen of half-width wl runs down its middle where the band is wider than the epithelial
    lining; septa follow the zero set of a second field. Returns s, hw, wl, the distance to the
    septum line, and the unit normal (ny, nx) of the lining.
    """
    n, ny, nx = gland
    gn = np.sqrt(ny * ny + nx * nx) + np.float32(1e-4 / d)
    s = np.minimum(np.abs(n) / gn, np.float32(8.0 * d))
    hw = np.float32(d) * (np.float32(HW_GAIN) * reg - np.float32(t_band))
    wl = np.clip(
        np.minimum(hw - np.float32(EPI_CELLS * d), np.float32(lumen_w) * (1.0 + 0.35 * lumen_mod)),
        0.0,
        None,
    )
    m, my, mx = sept
    sm = np.minimum(np.abs(m) / (np.sqrt(my * my + mx * mx) + np.float32(1e-4 / d)), 8.0 * d)
    sgn = np.sign(n) / gn
    return s, hw, wl, sm, ny * sgn, nx * sgn


@dataclass
class Architecture:
    """The fields and thresholds of a core's gland architecture (see the module docstring)."""

    d: float
    f_gland: Field
    f_sept: Field
    f_arch: Field
    f_big: Field
    f_low: Field
    t_band: float
    lumen_w: float

    def regional(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Regional tumour-content field at points (gland scale plus core scale)."""
        return (self.f_arch.at(y, x) + BIG_WEIGHT * self.f_big.at(y, x)).astype(np.float32)

    def at(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """``gland_geometry`` at points (cell seeds)."""
        gland = tuple(v.astype(np.float32) for v in self.f_gland.at_grad(y, x))
        sept = tuple(v.astype(np.float32) for v in self.f_sept.at_grad(y, x))
        low = self.f_low.at(y, x).astype(np.float32)
        return gland_geometry(
            self.d, self.t_band, self.lumen_w, gland, sept, self.regional(y, x), low
        )

    def rows(self, y0: int, y1: int, width: int) -> tuple[np.ndarray, ...]:
        """``gland_geometry`` on pixel rows y0..y1-1."""
        reg = self.f_arch.rows(y0, y1, width) + np.float32(BIG_WEIGHT) * self.f_big.rows(
            y0, y1, width
        )
        return gland_geometry(
            self.d,
            self.t_band,
            self.lumen_w,
            tuple(self.f_gland.rows_grad(y0, y1, width)),
            tuple(self.f_sept.rows_grad(y0, y1, width)),
            reg,
            self.f_low.rows(y0, y1, width),
        )


def band_threshold(
    arch: Architecture, sy: np.ndarray, sx: np.ndarray, inside: np.ndarray, band_share: float
) -> float:
    """Threshold of the tumour-band score HW_GAIN * reg - s / d so that a share ``band_share`` of
    the core's seeds (epithelium plus lumens) falls in the band."""
    if band_share <= 0:
        return 99.0
    d = arch.d
    gland = tuple(v.astype(np.float32) for v in arch.f_gland.at_grad(sy, sx))
    s0 = np.minimum(np.abs(gland[0]) / (np.hypot(gland[1], gland[2]) + 1e-4 / d), 8.0 * d)
    q = HW_GAIN * arch.regional(sy, sx) - s0 / d
    sel = inside if inside.any() else np.ones_like(inside)
    return float(np.quantile(q[sel], 1.0 - band_share))
