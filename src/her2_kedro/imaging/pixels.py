"""Pixel-level conventions shared by every stage: grey level, background and tissue masks.

The background rule follows the authors' code: a pixel is background where its grey value
(0.2989 R + 0.587 G + 0.114 B on a 0..255 scale) is above 220.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

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


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an RGB uint8 image; full-resolution chroma (4:4:4) from quality 90 up.

    Keeping chroma at quality >= 90 preserves thin brown DAB membranes that 4:2:0 would smear.
    """
    _check_rgb(rgb)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(
        buffer, format="JPEG", quality=int(quality), subsampling=0 if quality >= 90 else 2
    )
    return buffer.getvalue()


def encode_png(rgb: np.ndarray) -> bytes:
    """Lossless PNG bytes of an RGB uint8 image."""
    _check_rgb(rgb)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()
