"""The grid's lattice from the tissue itself: fragmentation-proof pitch and rotation.

When lumens or pale stroma cut many cores into pieces, the pieces' centres mislead a fit to blob
centres. The autocorrelation of the tissue mask does not care how a core is cut: its strongest
peaks away from the origin are the two lattice vectors of the array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["Lattice", "lattice_on_tissue"]


@dataclass(frozen=True)
class Lattice:
    """A grid's rotation (radians, in (-pi/4, pi/4]) and pitches (level-0 px) along a row (px,
    between columns) and along a column (py, between rows)."""

    theta: float
    px: float
    py: float

    def differs(self, rotation_deg: float, px: float, py: float) -> bool:
        """Whether a fitted grid's rotation (by over 3 degrees, modulo 90) or either pitch (by
        over 15 %) is off this lattice: then it was fitted at the wrong scale or angle."""
        turn = (rotation_deg - math.degrees(self.theta) + 45.0) % 90.0 - 45.0
        return (
            abs(turn) > 3.0
            or not 1 / 1.15 < px / self.px < 1.15
            or not 1 / 1.15 < py / self.py < 1.15
        )


def _subpixel(ac: np.ndarray, r: int, c: int) -> tuple[float, float]:
    """Peak (r, c) of ``ac`` refined by a parabola through it and its neighbours on each axis."""

    def step(lo: float, mid: float, hi: float) -> float:
        den = lo - 2.0 * mid + hi
        return 0.0 if den >= 0 else float(np.clip(0.5 * (lo - hi) / den, -0.5, 0.5))

    h, w = ac.shape
    dr = step(ac[r - 1, c], ac[r, c], ac[r + 1, c]) if 0 < r < h - 1 else 0.0
    dc = step(ac[r, c - 1], ac[r, c], ac[r, c + 1]) if 0 < c < w - 1 else 0.0
    return r + dr, c + dc


def lattice_on_tissue(
    tissue: np.ndarray | None, downsample: float, diameter_px: float
) -> Lattice | None:
    """The grid's lattice from the autocorrelation of the thumbnail's tissue mask, or None.

    Lumens that open onto the glass cut cores into pieces, and when many cores are cut the
    pieces' neighbour distances and directions, which ``fit_grid`` reads the lattice from, are
    those of the pieces. The autocorrelation of the tissue mask does not care how a core is cut:
    every core overlaps its neighbour shifted by one lattice vector, so its strongest peak off
    the origin is the row or column vector, and the strongest peak at 60-120 degrees to that is
    the other. The mask is first averaged over blocks of about a twelfth of ``diameter_px`` (the
    blob estimate, a lower bound of the pitch even when cores are cut), so the FFT stays small;
    peaks closer to the origin than half of ``diameter_px`` (the pieces of one core) are left
    out. None without tissue or without two such peaks each at least 15 % of the origin's.
    """
    if tissue is None or downsample <= 0 or diameter_px <= 0 or not tissue.any():
        return None
    d_t = diameter_px / downsample
    f = max(1, int(d_t // 12))
    h, w = (tissue.shape[0] // f) * f, (tissue.shape[1] // f) * f
    if h < 2 * f or w < 2 * f:
        return None
    dens = tissue[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    hh, ww = dens.shape
    spec = np.fft.rfft2(dens, s=(2 * hh, 2 * ww))  # zero padding: no wrap-around
    ac = np.fft.fftshift(np.fft.irfft2(spec * spec.conj(), s=(2 * hh, 2 * ww)))
    r0, c0 = hh, ww  # the origin after fftshift
    top = ac[r0, c0]
    peaks = (ac == ndi.maximum_filter(ac, size=5)) & (ac >= 0.15 * top)
    rr, cc = np.nonzero(peaks)
    lag = np.hypot(rr - r0, cc - c0) * f * downsample
    keep = (lag >= 0.5 * diameter_px) & ((rr > r0) | ((rr == r0) & (cc > c0)))  # half-plane
    rr, cc = rr[keep], cc[keep]
    if rr.size < 2:
        return None
    order = np.argsort(-ac[rr, cc], kind="stable")
    vecs = []
    for k in order:
        r, c = _subpixel(ac, int(rr[k]), int(cc[k]))
        vecs.append(np.array([c - c0, r - r0]) * f * downsample)
    v1 = vecs[0]
    ang1 = math.atan2(v1[1], v1[0])
    v2 = next(
        (
            v
            for v in vecs[1:]
            if abs(abs(math.remainder(math.atan2(v[1], v[0]) - ang1, math.pi)) - math.pi / 2)
            < math.pi / 6
        ),
        None,
    )
    if v2 is None:
        return None
    row, col = (v1, v2) if abs(v1[0]) >= abs(v2[0]) else (v2, v1)  # row: nearer the x axis
    theta = math.atan2(row[1], row[0])
    theta = (theta + math.pi / 4) % (math.pi / 2) - math.pi / 4
    c, s = math.cos(theta), math.sin(theta)
    px = abs(row[0] * c + row[1] * s)
    py = abs(-col[0] * s + col[1] * c)
    return Lattice(theta, float(px), float(py))
