"""Pixel-level conventions shared by every stage: grey level, background and tissue masks.

The background rule follows the authors' code: a pixel is background where its grey value
(0.2989 R + 0.587 G + 0.114 B on a 0..255 scale) is above 220.
"""

from __future__ import annotations

import numpy as np

GREY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)
BACKGROUND_GREY = 220.0


def grey(rgb: np.ndarray) -> np.ndarray:
    """Grey level (0..255, float32) of an RGB uint8 image of shape (H, W, 3)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {rgb.shape}")
    return rgb.astype(np.float32) @ GREY_WEIGHTS


def foreground_mask(rgb: np.ndarray, background_grey: float = BACKGROUND_GREY) -> np.ndarray:
    """Boolean mask of tissue (True) versus glass background (False)."""
    return grey(rgb) <= background_grey


def tissue_fraction(rgb: np.ndarray, background_grey: float = BACKGROUND_GREY) -> float:
    """Fraction of pixels that are tissue by the background rule."""
    if rgb.size == 0:
        return 0.0
    return float(foreground_mask(rgb, background_grey).mean())
