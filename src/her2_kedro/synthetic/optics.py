"""Stain optics for the synthetic cohort: stain vectors and Beer-Lambert rendering.

An image is rendered from per-pixel stain concentrations (optical-density units) with
I = I0 * exp(-(c_h * OD_h + c_dab * dab_scale * OD_dab + extra)), I0 being the glass colour.
Two stain sets model two centres: the internal one is close to the Ruifrok-Johnston H-DAB
vectors (so scikit-image's ``rgb2hed`` separates it well); the external one has bluer-purple
haematoxylin, a more yellow-red DAB, faded DAB and a warmer glass, to test stain shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Vector3 = tuple[float, float, float]


def _unit(v: Vector3) -> Vector3:
    """Normalise a 3-vector to unit length (stain vectors are directions in OD space)."""
    a = np.asarray(v, dtype=np.float64)
    a = a / np.linalg.norm(a)
    return (float(a[0]), float(a[1]), float(a[2]))


@dataclass(frozen=True)
class StainSet:
    """Optical-density directions of haematoxylin and DAB plus the glass colour of one centre."""

    name: str
    haematoxylin: Vector3
    dab: Vector3
    background_rgb: tuple[int, int, int]
    dab_scale: float = 1.0


INTERNAL_STAINS = StainSet(
    name="internal",
    # Ruifrok-Johnston H (0.65, 0.70, 0.29) nudged towards the bluer nuclei of the real cores.
    haematoxylin=_unit((0.70, 0.66, 0.27)),
    # Golden-brown: OD direction of strongly stained membranes in a real score-3 core (~(0.25,
    # 0.52, 0.81) before removing their haematoxylin share), a little yellower than Ruifrok's.
    dab=_unit((0.24, 0.53, 0.81)),
    background_rgb=(234, 233, 241),
    dab_scale=1.0,
)

EXTERNAL_STAINS = StainSet(
    name="external",
    haematoxylin=_unit((0.56, 0.78, 0.28)),  # more purple (absorbs green most)
    dab=_unit((0.14, 0.47, 0.87)),  # more yellow-red
    background_rgb=(241, 237, 238),
    dab_scale=0.6,  # faded chromogen
)


def render_optical_density(
    conc_h: np.ndarray,
    conc_dab: np.ndarray,
    stains: StainSet,
    extra_od: np.ndarray | None = None,
) -> np.ndarray:
    """Render stain concentration maps to an RGB uint8 image by the Beer-Lambert law.

    ``extra_od`` is added optical density, either (H, W) (neutral grey) or (H, W, 3).
    """
    conc_h = np.asarray(conc_h, dtype=np.float32)
    conc_dab = np.asarray(conc_dab, dtype=np.float32)
    if conc_h.shape != conc_dab.shape or conc_h.ndim != 2:
        raise ValueError(
            f"concentration maps must be equal 2-D shapes, got {conc_h.shape}, {conc_dab.shape}"
        )
    out = np.empty(conc_h.shape + (3,), dtype=np.uint8)
    h_vec = np.asarray(stains.haematoxylin, dtype=np.float32)
    d_vec = np.asarray(stains.dab, dtype=np.float32) * np.float32(stains.dab_scale)
    for c in range(3):
        od = conc_h * h_vec[c] + conc_dab * d_vec[c]
        if extra_od is not None:
            od = od + (extra_od if extra_od.ndim == 2 else extra_od[..., c]).astype(
                np.float32, copy=False
            )
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= np.float32(stains.background_rgb[c])
        np.clip(od + np.float32(0.5), 0, 255, out=od)
        out[..., c] = od.astype(np.uint8)
    return out
