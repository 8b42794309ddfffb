"""Colour deconvolution of RGB IHC images into stain concentrations (Ruifrok & Johnston, 2001).

By default this reproduces scikit-image's ``rgb2hed`` exactly (the definition the authors of
Pisula et al. 2023 used for their DAB-intensity baseline), only faster and in float32:

* optical density ``od = log(max(v / 255, 1e-6)) / log(1e-6)`` per channel value ``v`` (so
  ``od`` lies in [0, 1]; it is ``-log10(v / 255) / 6``);
* concentrations ``c = od @ inv(W).T`` where ``W`` is the 3x3 stain matrix whose *columns* are
  the stains' optical-density vectors (R, G, B); for the default ``W = rgb_from_hed.T``, i.e.
  ``c = od @ hed_from_rgb`` as in scikit-image;
* negative concentrations are clipped to 0.

Speed: the input is uint8, so ``od`` is a 256-entry table and every concentration is a sum of
three per-channel table values. :func:`dab_channel` reads each pixel's 24-bit colour with one
unaligned 32-bit load and looks its DAB value up in a 2**24-entry float32 table (64 MiB, built
once per stain matrix and cached); small images, :func:`rgb_to_hed` and :func:`deconvolve` use a
65536-entry table indexed by one unaligned 16-bit load (``r | g << 8``) plus a 256-entry table for
blue. Work proceeds in row chunks, so memory beyond the output stays O(chunk).

Channel order convention used across the project: stain matrices have columns
(haematoxylin, eosin-or-residual, DAB), so channel 2 of :func:`rgb_to_hed` is always DAB.

HistomicsTK's own definition differs (``histomicstk.preprocessing.color_conversion.rgb_to_sda``
with ``I_0=None``): ``sda = -ln((v + 1) / 256) * 255 / ln(256)`` -- natural log, background
intensity 256 after adding 1, scaled to 0..255 -- and ``color_deconvolution`` normalises the stain
columns to unit length and uses a pseudo-inverse, without clipping. Its values are roughly
``255 * 6 / log10(256) ~ 635`` times ours (apart from the +1 offset), so directions of stain
vectors agree but magnitudes do not; :mod:`her2_kedro.imaging.normalisation` uses HistomicsTK's units.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np
from skimage.color.colorconv import hed_from_rgb as _SKIMAGE_HED_FROM_RGB
from skimage.color.colorconv import rgb_from_hed as _SKIMAGE_RGB_FROM_HED

__all__ = [
    "STAIN_MATRIX_NAMES",
    "dab_channel",
    "deconvolve",
    "optical_density_lut",
    "rgb_to_hed",
    "separation_matrix",
    "stain_channel",
    "stain_matrix",
    "lookup_channel_tables",
]

CHUNK_ROWS = 512
_LOG_ADJUST = np.log(1e-6)
#: Images with at least this many pixels use the 2**24-entry table in :func:`dab_channel`.
_BIG_IMAGE_PIXELS = 1 << 21
#: Threads measuring cores in parallel build each 64 MiB table once, not once per thread.
_TABLE_LOCK = threading.Lock()

STAIN_MATRIX_NAMES = ("skimage_hed", "histomicstk_hdab", "histomicstk_hed")


def _unit(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float64) / np.linalg.norm(v)


def stain_matrix(name: str = "skimage_hed") -> np.ndarray:
    """Named 3x3 stain matrix (columns = stain OD vectors in R, G, B; order H, E/residual, DAB).

    * ``"skimage_hed"`` (default): scikit-image's ``rgb_from_hed.T`` exactly (Ruifrok-Johnston
      H, E, DAB; columns not unit-normalised, as in scikit-image), so results equal ``rgb2hed``.
    * ``"histomicstk_hdab"``: HistomicsTK ``stain_color_map`` 'hematoxylin' and 'dab', unit-
      normalised, with the middle column the normalised cross product H x DAB (the complement
      ``complement_stain_matrix`` would put last) -- a two-stain H-DAB model.
    * ``"histomicstk_hed"``: HistomicsTK 'hematoxylin', 'eosin', 'dab', unit-normalised (the same
      Ruifrok vectors as ``skimage_hed`` up to column length).
    """
    if name == "skimage_hed":
        return np.array(_SKIMAGE_RGB_FROM_HED, dtype=np.float64).T.copy()
    from her2_kedro.imaging._histomicstk import stain_color_map

    h = _unit(stain_color_map["hematoxylin"])
    d = _unit(stain_color_map["dab"])
    if name == "histomicstk_hdab":
        return np.stack([h, _unit(np.cross(h, d)), d], axis=1)
    if name == "histomicstk_hed":
        return np.stack([h, _unit(stain_color_map["eosin"]), d], axis=1)
    raise ValueError(f"unknown stain matrix {name!r}; choose one of {STAIN_MATRIX_NAMES}")


def separation_matrix(matrix: np.ndarray | None = None) -> np.ndarray:
    """Row-vector separation matrix ``S`` (3x3, float64) with ``concentrations = od @ S``.

    ``matrix`` is a stain matrix (columns = stain OD vectors); None means scikit-image's
    ``hed_from_rgb`` itself, so the default is bit-for-bit scikit-image's constant.
    """
    if matrix is None:
        return np.array(_SKIMAGE_HED_FROM_RGB, dtype=np.float64)
    w = np.asarray(matrix, dtype=np.float64)
    if w.shape != (3, 3):
        raise ValueError(f"stain matrix must have shape (3, 3), got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("stain matrix contains NaN or infinite values")
    if abs(np.linalg.det(w)) < 1e-9 * max(np.abs(w).max(), 1e-300) ** 3:
        raise ValueError("stain matrix is singular: its three columns must be independent")
    return np.linalg.inv(w).T


def optical_density_lut() -> np.ndarray:
    """scikit-image's optical density for each uint8 value 0..255 (float64, in [0, 1])."""
    v = np.arange(256, dtype=np.float64) / 255.0
    return np.log(np.maximum(v, 1e-6)) / _LOG_ADJUST


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB image of dtype uint8, got dtype {rgb.dtype}")
    return rgb


def _matrix_key(matrix: np.ndarray | None) -> bytes | None:
    return None if matrix is None else np.asarray(matrix, dtype=np.float64).tobytes()


@lru_cache(maxsize=4)
def _channel_tables(key: bytes | None) -> np.ndarray:
    """(3 channels, 256 values, 3 stains) float64: od(v) * S[channel, stain]."""
    s = separation_matrix(None if key is None else np.frombuffer(key).reshape(3, 3))
    return optical_density_lut()[None, :, None] * s[:, None, :]


@lru_cache(maxsize=2)
def _rgb24_table(key: bytes | None, stain: int) -> np.ndarray:
    """2**24-entry float32 table indexed by ``r | g << 8 | b << 16`` for one stain."""
    t = _channel_tables(key)[:, :, stain]
    table = t[2][:, None, None] + t[1][None, :, None] + t[0][None, None, :]
    np.maximum(table, 0, out=table)  # the clip at 0 is folded into the table
    return table.astype(np.float32).reshape(-1)


@lru_cache(maxsize=4)
def _rg_tables(key: bytes | None, stains: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Table indexed by ``r | g << 8`` (65536 x k) and by ``b`` (256 x k), float32."""
    t = _channel_tables(key)[:, :, list(stains)]
    rg = (t[1][:, None, :] + t[0][None, :, :]).reshape(65536, len(stains))
    return rg.astype(np.float32), t[2].astype(np.float32)


def _padded_chunk(chunk: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Copy a (n, W, 3) chunk into a contiguous buffer with one spare byte at the end."""
    nbytes = chunk.size
    flat = scratch[: nbytes + 1]
    flat[:nbytes].reshape(chunk.shape)[...] = chunk
    flat[nbytes] = 0
    return flat


def _stain_chunks(
    rgb: np.ndarray,
    matrix: np.ndarray | None,
    stain: int,
    chunk_rows: int,
    use_rgb24: bool | None,
) -> np.ndarray:
    h, w, _ = rgb.shape
    out = np.empty((h, w), dtype=np.float32)
    if h == 0 or w == 0:
        return out
    key = _matrix_key(matrix)
    if use_rgb24 is None:
        use_rgb24 = h * w >= _BIG_IMAGE_PIXELS
    chunk_rows = max(1, min(chunk_rows, h))
    idx = np.empty((chunk_rows, w), dtype=np.intp)
    if use_rgb24:
        with _TABLE_LOCK:
            table = _rgb24_table(key, stain)
        scratch = np.empty(chunk_rows * w * 3 + 1, dtype=np.uint8)
        contiguous = rgb.flags.c_contiguous
        flat_all = rgb.reshape(-1) if contiguous else None
        for y in range(0, h, chunk_rows):
            chunk = rgb[y : y + chunk_rows]
            n = chunk.shape[0]
            if contiguous and y + n < h:  # a following row supplies the 4th byte: no copy
                buf, offset = flat_all, y * w * 3
            else:
                buf, offset = _padded_chunk(chunk, scratch), 0
            # one unaligned little-endian 32-bit load per pixel: r | g<<8 | b<<16 | next<<24
            words = np.ndarray((n, w), dtype="<u4", buffer=buf, offset=offset, strides=(w * 3, 3))
            np.bitwise_and(words, 0xFFFFFF, out=idx[:n], casting="unsafe")
            # mode="clip" (indices are always valid) avoids numpy's buffered copy for out=
            np.take(table, idx[:n], out=out[y : y + n], mode="clip")
        return out
    else:
        rg, b = _rg_tables(key, (stain,))
        rg1, b1 = rg[:, 0].copy(), b[:, 0].copy()
        scratch = np.empty(chunk_rows * w * 3 + 1, dtype=np.uint8)
        tmp = np.empty((chunk_rows, w), dtype=np.float32)
        for y in range(0, h, chunk_rows):
            chunk = rgb[y : y + chunk_rows]
            n = chunk.shape[0]
            flat = _padded_chunk(chunk, scratch)
            pairs = np.ndarray((n, w), dtype="<u2", buffer=flat, strides=(w * 3, 3))
            o = out[y : y + n]
            np.copyto(idx[:n], pairs, casting="unsafe")
            np.take(rg1, idx[:n], out=o, mode="clip")
            np.copyto(idx[:n], chunk[..., 2], casting="unsafe")
            np.take(b1, idx[:n], out=tmp[:n], mode="clip")
            o += tmp[:n]
    np.maximum(out, 0, out=out)
    return out


def dab_channel(
    rgb: np.ndarray,
    matrix: np.ndarray | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
    use_rgb24: bool | None = None,
) -> np.ndarray:
    """DAB concentration (float32, (H, W)) of a uint8 RGB image: ``rgb2hed(rgb)[..., 2]``, fast.

    ``matrix`` is an optional stain matrix (columns = OD vectors, DAB in column 2); ``use_rgb24``
    forces (True) or forbids (False) the 64 MiB whole-colour table (default: by image size).
    """
    rgb = _check_rgb(rgb)
    return _stain_chunks(rgb, matrix, 2, chunk_rows, use_rgb24)


def stain_channel(
    rgb: np.ndarray,
    stain: int,
    matrix: np.ndarray | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
) -> np.ndarray:
    """One stain's concentration (float32, (H, W)), e.g. ``stain=0`` for haematoxylin."""
    rgb = _check_rgb(rgb)
    if stain not in (0, 1, 2):
        raise ValueError(f"stain index must be 0, 1 or 2, got {stain}")
    return _stain_chunks(rgb, matrix, stain, chunk_rows, None)


def lookup_channel_tables(
    rgb: np.ndarray,
    tables: np.ndarray,
    *,
    combine: str = "sum",
    chunk_rows: int = CHUNK_ROWS,
) -> np.ndarray:
    """Per-pixel ``tables[0, r] (+ or *) tables[1, g] (+ or *) tables[2, b]`` (float32, (H, W, K)).

    ``tables`` has shape (3, 256, K); any sum (or product) of per-channel functions of a uint8
    RGB pixel, e.g. optical density times a matrix, is evaluated with two look-ups per pixel.
    """
    rgb = _check_rgb(rgb)
    tables = np.asarray(tables, dtype=np.float64)
    if tables.ndim != 3 or tables.shape[:2] != (3, 256):
        raise ValueError(f"tables must have shape (3, 256, K), got {tables.shape}")
    if combine not in ("sum", "product"):
        raise ValueError(f"combine must be 'sum' or 'product', got {combine!r}")
    k = tables.shape[2]
    if combine == "sum":
        rg = tables[1][:, None, :] + tables[0][None, :, :]
    else:
        rg = tables[1][:, None, :] * tables[0][None, :, :]
    rg32 = rg.reshape(65536, k).astype(np.float32)
    return _combine_tables(rgb, rg32, tables[2].astype(np.float32), chunk_rows, combine)


def _combine_tables(
    rgb: np.ndarray, rg: np.ndarray, b: np.ndarray, chunk_rows: int, combine: str = "sum"
) -> np.ndarray:
    """Look-ups in tables indexed by ``r | g << 8`` (65536, K) and by ``b`` (256, K), combined."""
    h, w, _ = rgb.shape
    k = rg.shape[1]
    out = np.empty((h, w, k), dtype=np.float32)
    if h == 0 or w == 0:
        return out
    chunk_rows = max(1, min(chunk_rows, h))
    scratch = np.empty(chunk_rows * w * 3 + 1, dtype=np.uint8)
    idx = np.empty((chunk_rows, w), dtype=np.intp)
    tmp = np.empty((chunk_rows, w, k), dtype=np.float32)
    for y in range(0, h, chunk_rows):
        chunk = rgb[y : y + chunk_rows]
        n = chunk.shape[0]
        flat = _padded_chunk(chunk, scratch)
        # one unaligned little-endian 16-bit load per pixel gives r | g << 8
        pairs = np.ndarray((n, w), dtype="<u2", buffer=flat, strides=(w * 3, 3))
        o = out[y : y + n]
        np.copyto(idx[:n], pairs, casting="unsafe")
        # mode="clip" (indices are always valid) avoids numpy's buffered copy for out=
        np.take(rg, idx[:n], axis=0, out=o, mode="clip")
        np.copyto(idx[:n], chunk[..., 2], casting="unsafe")
        np.take(b, idx[:n], axis=0, out=tmp[:n], mode="clip")
        if combine == "sum":
            o += tmp[:n]
        else:
            o *= tmp[:n]
    return out


def deconvolve(
    rgb: np.ndarray, matrix: np.ndarray | None = None, *, chunk_rows: int = CHUNK_ROWS
) -> np.ndarray:
    """All three stain concentrations (float32, (H, W, 3)) for a stain matrix (columns = stains).

    Same optical density and clipping as ``skimage.color.separate_stains``; ``matrix=None`` is
    scikit-image's H-E-DAB. Computed as two table look-ups per pixel, chunk by chunk.
    """
    rgb = _check_rgb(rgb)
    rg, b = _rg_tables(_matrix_key(matrix), (0, 1, 2))
    out = _combine_tables(rgb, rg, b, chunk_rows)
    np.maximum(out, 0, out=out)
    return out


def rgb_to_hed(
    rgb: np.ndarray, matrix: np.ndarray | None = None, *, chunk_rows: int = CHUNK_ROWS
) -> np.ndarray:
    """Haematoxylin, eosin/residual and DAB (float32, (H, W, 3)): ``skimage.color.rgb2hed``, fast.

    ``matrix`` optionally replaces scikit-image's stain matrix (columns = stain OD vectors, in
    the order H, E/residual, DAB), e.g. ``stain_matrix("histomicstk_hdab")`` or Macenko vectors.
    """
    return deconvolve(rgb, matrix, chunk_rows=chunk_rows)
