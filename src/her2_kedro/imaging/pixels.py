"""Pixel rules shared by every stage, each defined once: grey level, tissue mask, tile counts, 8-bit RGB.

The background rule follows the authors' code: a pixel is background where its grey value
(0.2989 R + 0.587 G + 0.114 B on a 0..255 scale) is above 220. ``foreground_mask`` evaluates it in
float32, ``foreground_mask_fast`` in exact integer arithmetic (``2989 R + 5870 G + 1140 B <=
220 * 10_000``); the two agree on every colour except the one exact tie RGB (180, 254, 150), whose
grey is exactly 220 (tissue), which float32 rounds to 220.00002 (background).

Every decoded image (a core file, a slide region) reaches uint8 RGB through ``to_rgb_uint8``, so a
core read from a slide and the same core read from the cores folder get the same pixels.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image

GREY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)
BACKGROUND_GREY = 220.0
#: Integer grey weights: 10_000 x (0.2989, 0.587, 0.114); the products fit int32 without loss.
INT_GREY_WEIGHTS = (2989, 5870, 1140)
INT_GREY_SCALE = 10_000
WHITE = 255
# Rows processed at once by the integer foreground pass (keeps temporaries in cache).
_BAND_ROWS = 224


def check_rgb(rgb: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image, got dtype {rgb.dtype}")


# --------------------------------------------------------------------------- grey and tissue
def grey(rgb: np.ndarray) -> np.ndarray:
    """Grey level (0..255, float32) of an RGB image of shape (H, W, 3).

    Computed as ``(r * wr + g * wg) + b * wb``, one rounded float32 operation at a time, so the
    rounding of exact ties does not depend on the machine's BLAS kernel (a matrix product may
    fuse or reorder them) and the torch version (``device_embedding``) gets the same mask.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {rgb.shape}")
    out = rgb[..., 0].astype(np.float32)
    out *= GREY_WEIGHTS[0]
    for c in (1, 2):
        channel = rgb[..., c].astype(np.float32)
        channel *= GREY_WEIGHTS[c]
        out += channel
    return out


def foreground_mask(rgb: np.ndarray, background_grey: float = BACKGROUND_GREY) -> np.ndarray:
    """Boolean mask of tissue (True) versus glass background (False), grey <= background_grey."""
    return grey(rgb) <= background_grey


def int_threshold(background_grey: float) -> int:
    """Largest integer weighted sum that still counts as foreground (grey <= background_grey)."""
    return math.floor(background_grey * INT_GREY_SCALE + 1e-6)


def foreground_band(band: np.ndarray, threshold: int, out: np.ndarray) -> None:
    """Write the exact integer foreground mask of an RGB uint8 band into ``out``."""
    wr, wg, wb = INT_GREY_WEIGHTS
    s = band[..., 0].astype(np.int32)
    s *= wr
    t = np.multiply(band[..., 1], wg, dtype=np.int32)
    s += t
    np.multiply(band[..., 2], wb, out=t, dtype=np.int32)
    s += t
    np.less_equal(s, threshold, out=out)


def foreground_mask_fast(rgb: np.ndarray, background_grey: float = BACKGROUND_GREY) -> np.ndarray:
    """Tissue mask of an RGB uint8 image by the exact integer rule, ~4x faster than the float one."""
    check_rgb(rgb)
    out = np.empty(rgb.shape[:2], dtype=bool)
    threshold = int_threshold(background_grey)
    for y0 in range(0, rgb.shape[0], _BAND_ROWS):
        foreground_band(rgb[y0 : y0 + _BAND_ROWS], threshold, out[y0 : y0 + _BAND_ROWS])
    return out


def tissue_fraction(rgb: np.ndarray, background_grey: float = BACKGROUND_GREY) -> float:
    """Fraction of pixels that are tissue by the background rule (exact integer form)."""
    if rgb.size == 0:
        return 0.0
    return float(foreground_mask_fast(rgb, background_grey).mean())


# --------------------------------------------------------------------------- tile counting
def tile_row_counts(
    rgb: np.ndarray,
    tile_size: int,
    background_grey: float = BACKGROUND_GREY,
    *,
    offset: tuple[int, int] = (0, 0),
    rows: Iterable[int] | None = None,
    mask: np.ndarray | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(j, counts)``: tissue pixels in each full tile of tile row ``j`` of the gap-free grid.

    The grid has ``tile_size`` tiles from ``offset`` (x, y), partial edge tiles dropped; ``rows``
    picks the tile rows and their order (all, top to bottom, by default) so a caller can stop
    early; ``mask`` (a precomputed foreground mask) skips the grey test. One band of the image is
    tested at a time, so no full-size temporary is made.
    """
    ox, oy = offset
    height, width = rgb.shape[:2] if mask is None else mask.shape
    nx = max(0, (width - ox) // tile_size)
    ny = max(0, (height - oy) // tile_size)
    if nx == 0 or ny == 0:
        return
    threshold = int_threshold(background_grey)
    acc = np.uint16 if tile_size <= np.iinfo(np.uint16).max else np.uint32
    band_mask = np.empty((tile_size, nx * tile_size), dtype=bool)
    for j in range(ny) if rows is None else rows:
        y0 = oy + j * tile_size
        if mask is None:
            foreground_band(
                rgb[y0 : y0 + tile_size, ox : ox + nx * tile_size], threshold, band_mask
            )
            band = band_mask
        else:
            band = mask[y0 : y0 + tile_size, ox : ox + nx * tile_size]
        column_sums = np.add.reduce(band.view(np.uint8), axis=0, dtype=acc)
        yield j, column_sums.reshape(nx, tile_size).sum(axis=1, dtype=np.int64)


def tile_grid_shape(height: int, width: int, tile_size: int, offset: tuple[int, int] = (0, 0)):
    """(rows, columns) of full ``tile_size`` tiles of the grid starting at ``offset`` (x, y)."""
    return max(0, (height - offset[1]) // tile_size), max(0, (width - offset[0]) // tile_size)


def has_tissue_tile(
    rgb: np.ndarray,
    tile_size: int = 224,
    background_grey: float = BACKGROUND_GREY,
    min_tissue: float = 0.05,
) -> bool:
    """True when a full tile of the (0, 0) grid has tissue fraction > ``min_tissue`` (not blank).

    Scans tile rows from the image centre outwards and stops at the first kept tile.
    """
    n_rows, _ = tile_grid_shape(rgb.shape[0], rgb.shape[1], tile_size)
    needed = min_tissue * tile_size * tile_size
    centre = (n_rows - 1) / 2
    order = sorted(range(n_rows), key=lambda i: (abs(i - centre), i))
    return any(
        bool((counts > needed).any())
        for _, counts in tile_row_counts(rgb, tile_size, background_grey, rows=order)
    )


# --------------------------------------------------------------------------- 8-bit RGB
def uint16_to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit -> 8-bit by the linear map 0..65535 -> 0..255 (divide by 257, rounded)."""
    return ((np.asarray(arr).astype(np.uint32) + 128) // 257).astype(np.uint8)


def float_to_uint8(arr: np.ndarray) -> tuple[np.ndarray, str]:
    """Float pixels -> uint8: [0, 1] times 255, [0, 255] rounded, otherwise min-max stretched.

    Returns the pixels and a note saying which; raises ValueError when no value is finite.
    """
    arr = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        raise ValueError("unusable float image: no finite pixel values")
    arr = np.where(finite, arr, 0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return np.rint(arr * 255.0).astype(np.uint8), "float in [0, 1] scaled by 255"
    if lo >= 0.0 and hi <= 255.0:
        return np.rint(arr).astype(np.uint8), "float in [0, 255] rounded"
    if hi == lo:
        return np.zeros(arr.shape, np.uint8), f"constant float image ({lo:g}) mapped to 0"
    out = np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return out, f"float range [{lo:g}, {hi:g}] min-max stretched to 0..255"


def to_uint8(arr: np.ndarray) -> tuple[np.ndarray, str]:
    """Any integer or float sample array as uint8, with a note of the scaling ("" when none).

    uint16 is divided by 257; other integers within 0..255 are kept, within 0..65535 treated as
    16-bit, beyond that min-max stretched like floats.
    """
    a = np.asarray(arr)
    if a.dtype == np.uint8:
        return a, ""
    bits = f"{a.dtype.itemsize * 8}-bit"
    if a.dtype == np.uint16:
        return uint16_to_uint8(a), "16-bit scaled by 1/257"
    if a.dtype.kind in "ui" or a.dtype == np.bool_:
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 255:
            return a.astype(np.uint8), f"{bits} integer (values within 0..255 kept)"
        if lo >= 0 and hi <= 65535:
            return uint16_to_uint8(a), f"{bits} integer within 0..65535 scaled by 1/257"
        out, note = float_to_uint8(a)
        return out, f"{bits} integer, {note}"
    if a.dtype.kind == "f":
        out, note = float_to_uint8(a)
        return out, f"{bits} float, {note}"
    raise ValueError(f"unsupported sample type {a.dtype}")


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB of an 8-bit RGBA image composited onto white glass (exact integer rounding)."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    out = (rgb * alpha + WHITE * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Any decoded image array (grey, grey+alpha, RGB, RGBA; 8/16-bit, float) as uint8 RGB (H, W, 3).

    Samples go through ``to_uint8``; alpha is composited onto white so transparency reads as glass.
    """
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D image array, got shape {a.shape}")
    a, _ = to_uint8(a)
    channels = a.shape[2]
    if channels == 1:
        return np.repeat(a, 3, axis=2)
    if channels == 2:
        a = np.concatenate([np.repeat(a[:, :, :1], 3, axis=2), a[:, :, 1:2]], axis=2)
    if channels == 3:
        return np.ascontiguousarray(a)
    if a.shape[2] == 4:
        if bool(np.all(a[:, :, 3] == WHITE)):
            return np.ascontiguousarray(a[:, :, :3])
        return composite_on_white(a)
    raise ValueError(f"unsupported image with {channels} channels")


# --------------------------------------------------------------------------- decoding
def is_png16_colour(header: bytes) -> bool:
    """True for the first bytes of a PNG with 16-bit colour samples (RGB or RGBA)."""
    return (
        len(header) > 25
        and header[:8] == b"\x89PNG\r\n\x1a\n"
        and header[24] == 16
        and header[25] in (2, 6)
    )


def decode_png16(data: bytes) -> np.ndarray:
    """uint8 RGB of a 16-bit colour PNG decoded at full depth (PIL would keep only the high byte)."""
    import imagecodecs

    return to_rgb_uint8(imagecodecs.png_decode(data))


# --------------------------------------------------------------------------- encoding
def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an RGB uint8 image; full-resolution chroma (4:4:4) from quality 90 up.

    Keeping chroma at quality >= 90 preserves thin brown DAB membranes that 4:2:0 would smear.
    """
    check_rgb(rgb)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(
        buffer, format="JPEG", quality=int(quality), subsampling=0 if quality >= 90 else 2
    )
    return buffer.getvalue()


def encode_png(rgb: np.ndarray) -> bytes:
    """Lossless PNG bytes of an RGB uint8 image."""
    check_rgb(rgb)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def content_hash(rgb: np.ndarray) -> str:
    """sha256 hex digest of an image's pixels and shape, so duplicates are found by content."""
    arr = np.ascontiguousarray(rgb)
    digest = hashlib.sha256(f"{arr.dtype.str}:{'x'.join(map(str, arr.shape))}|".encode())
    digest.update(arr.reshape(-1).view(np.uint8))
    return digest.hexdigest()
