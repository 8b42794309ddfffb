"""Decode-verify one core image: reject what cannot be trusted, normalise what can to 8-bit RGB.

`check_image` never raises for bad input; it returns a `CheckedImage` whose `reason` names the
problem precisely (empty, not an image, unsupported format, truncated/corrupt, pixel bomb, too
small, blank) or, for accepted images, notes any conversion that happened.
"""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from her2_kedro.imaging.pixels import BACKGROUND_GREY, GREY_WEIGHTS

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# PIL reports some JPEGs (multi-picture, e.g. from cameras) as MPO; they are JPEG streams.
_FORMAT_ALIASES = {"MPO": "JPEG"}
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# Integer form of the grey rule: 10000 * grey = 2989 R + 5870 G + 1140 B (exact for uint8 input).
_INT_WEIGHTS = tuple(int(round(float(w) * 10000)) for w in GREY_WEIGHTS)
_TRUNCATION_LOCK = threading.Lock()


@dataclass(frozen=True)
class ImageCheckParams:
    """Limits for accepting a core image.

    `max_pixels` guards against decompression bombs (width x height, read from the header before
    decoding); `min_side` rejects images smaller than one tile; a core is blank (rejected) when no
    `tile_size` tile on the (0, 0)-anchored grid has foreground fraction > `min_tile_tissue`,
    foreground being grey <= `background_grey` (the authors' rule).
    """

    max_pixels: int = 100_000_000
    min_side: int = 224
    tile_size: int = 224
    background_grey: float = BACKGROUND_GREY
    min_tile_tissue: float = 0.05
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "TIFF")


@dataclass
class CheckedImage:
    """Outcome of `check_image`.

    `rgb` is the decoded uint8 (H, W, 3) image when `ok`; `content_hash` is the sha256 of its
    pixels and shape (duplicates are by content); `converted` is True when the pixels differ from a
    plain decode of the file (mode conversion, bit-depth scaling, first frame of several), so the
    caller must re-encode `rgb` instead of copying the original bytes.
    """

    ok: bool
    reason: str
    rgb: np.ndarray | None = None
    width: int = 0
    height: int = 0
    format: str = ""
    content_hash: str = ""
    converted: bool = False


class _Rejected(Exception):
    """Internal: carries a rejection reason out of a nested decoding step."""


def _short(exc: BaseException) -> str:
    msg = str(exc).strip() or type(exc).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make PIL raise on truncated data even if some other code enabled LOAD_TRUNCATED_IMAGES."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _TRUNCATION_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def content_hash(rgb: np.ndarray) -> str:
    """sha256 hex digest of an image's pixels and shape, so duplicates are found by content."""
    arr = np.ascontiguousarray(rgb)
    digest = hashlib.sha256(f"{arr.dtype.str}:{'x'.join(map(str, arr.shape))}|".encode())
    digest.update(arr.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _foreground_int(strip: np.ndarray, background_grey: float) -> np.ndarray:
    """Foreground mask of a uint8 RGB block with integer arithmetic (grey <= background_grey)."""
    limit = math.floor(background_grey * 10000 + 1e-6)
    wr, wg, wb = _INT_WEIGHTS
    acc = strip[..., 0].astype(np.uint32)
    acc *= wr
    tmp = strip[..., 1].astype(np.uint32)
    tmp *= wg
    acc += tmp
    np.multiply(strip[..., 2], wb, out=tmp, dtype=np.uint32)
    acc += tmp
    return acc <= limit


def has_tissue_tile(
    rgb: np.ndarray,
    tile_size: int = 224,
    background_grey: float = BACKGROUND_GREY,
    min_tile_tissue: float = 0.05,
) -> bool:
    """True when at least one full tile of the (0, 0) grid has foreground fraction > min_tile_tissue.

    Cheap: scans strips of tile rows from the image centre outwards and stops at the first kept
    tile, using integer arithmetic on uint8 (no full-size float temporaries).
    """
    h, w = rgb.shape[:2]
    n_rows, n_cols = h // tile_size, w // tile_size
    if n_rows == 0 or n_cols == 0:
        return False
    needed = min_tile_tissue * tile_size * tile_size  # kept where count > needed
    centre = (n_rows - 1) / 2
    for r in sorted(range(n_rows), key=lambda i: (abs(i - centre), i)):
        strip = rgb[r * tile_size : (r + 1) * tile_size, : n_cols * tile_size]
        fg = _foreground_int(strip, background_grey)
        counts = fg.reshape(tile_size, n_cols, tile_size).sum(axis=(0, 2))
        if bool((counts > needed).any()):
            return True
    return False


def _grey_to_rgb(grey8: np.ndarray) -> np.ndarray:
    return np.repeat(grey8[:, :, None], 3, axis=2)


def _scale_uint16(arr: np.ndarray) -> np.ndarray:
    """16-bit -> 8-bit by dividing by 257 (65535 -> 255), rounded."""
    return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _scale_float(arr: np.ndarray) -> tuple[np.ndarray, str]:
    """Float pixels -> uint8: [0, 1] times 255, [0, 255] as is, otherwise min-max stretched."""
    arr = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        raise _Rejected("unusable float image: no finite pixel values")
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


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _pil_to_rgb(im: Image.Image) -> tuple[np.ndarray, str]:
    """Convert a loaded PIL image of any supported mode to uint8 RGB; returns (rgb, note)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im), ""
    if mode in ("L", "1"):
        return np.asarray(
            im.convert("RGB")
        ), f"converted from {'1-bit' if mode == '1' else '8-bit'} grayscale ({mode})"
    if mode == "P":
        if "transparency" in im.info:
            return _composite_on_white(
                np.asarray(im.convert("RGBA"))
            ), "converted from palette (P) with transparency composited on white"
        return np.asarray(im.convert("RGB")), "converted from palette (P)"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(im.convert("RGBA"))
        return _composite_on_white(rgba), f"converted from {mode} (alpha composited on white)"
    if mode in _GREY16_MODES:
        arr = np.asarray(im)
        return _grey_to_rgb(_scale_uint16(arr)), "converted from 16-bit grayscale"
    if mode == "I":
        arr = np.asarray(im)
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            return _grey_to_rgb(
                arr.astype(np.uint8)
            ), "converted from 32-bit integer grayscale (values within 0..255 kept)"
        if lo >= 0 and hi <= 65535:
            return _grey_to_rgb(_scale_uint16(arr)), "converted from 16-bit grayscale (I)"
        grey8, note = _scale_float(arr)
        return _grey_to_rgb(grey8), f"converted from 32-bit integer grayscale ({note})"
    if mode == "F":
        grey8, note = _scale_float(np.asarray(im))
        return _grey_to_rgb(grey8), f"converted from float grayscale ({note})"
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB")), f"converted from {mode}"
    try:
        return np.asarray(im.convert("RGB")), f"converted from {mode}"
    except (ValueError, OSError) as exc:
        raise _Rejected(f"unsupported pixel mode {mode!r}: {_short(exc)}") from exc


def _tiff_bits(im: Image.Image) -> tuple[int, int]:
    """(max BitsPerSample, SampleFormat) from a PIL TIFF header; (8, 1) when unknown."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return 8, 1
    bits = tags.get(258, 8)
    bits_max = max(bits) if isinstance(bits, tuple) else int(bits)
    fmt = tags.get(339, 1)
    fmt_max = max(fmt) if isinstance(fmt, tuple) else int(fmt)
    return bits_max, fmt_max


def _tiff_with_tifffile(data: bytes, params: ImageCheckParams) -> tuple[np.ndarray, str, int]:
    """Read the first page of a TIFF with tifffile (high bit depth, float); returns (rgb, note, pages)."""
    import tifffile

    try:
        with tifffile.TiffFile(BytesIO(data)) as tif:
            pages = len(tif.pages)
            page = tif.pages[0]
            shape = page.shape
            axes = page.axes
            dims = {ax: n for ax, n in zip(axes, shape, strict=False)}
            h, w = dims.get("Y", 0), dims.get("X", 0)
            if h * w > params.max_pixels:
                raise _Rejected(_bomb_reason(w, h, params))
            if min(w, h) < params.min_side:
                raise _Rejected(_small_reason(w, h, params))
            arr = page.asarray()
    except _Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a corrupt file
        raise _Rejected(f"truncated or corrupt image: {_short(exc)}") from exc
    if "S" in axes and axes.index("S") < axes.index("Y"):
        arr = np.moveaxis(arr, axes.index("S"), -1)
    arr = np.squeeze(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise _Rejected(f"unsupported TIFF layout: axes {axes!r}, shape {tuple(shape)}")
    bits = f"{arr.dtype.itemsize * 8}-bit"
    if arr.dtype == np.uint8:
        arr8, how = arr, "8-bit"
    elif arr.dtype == np.uint16:
        arr8, how = _scale_uint16(arr), "16-bit scaled by 1/257"
    elif arr.dtype.kind == "f":
        arr8, note = _scale_float(arr)
        how = f"{bits} float, {note}"
    elif arr.dtype.kind in "ui":
        arr8, note = _scale_float(arr.astype(np.float64))
        how = f"{bits} integer, {note}"
    else:
        raise _Rejected(f"unsupported TIFF sample type {arr.dtype}")
    channels = arr8.shape[2]
    if channels == 1:
        return _grey_to_rgb(arr8[:, :, 0]), f"converted from {how} grayscale TIFF", pages
    if channels == 2:
        la = np.concatenate([np.repeat(arr8[:, :, :1], 3, axis=2), arr8[:, :, 1:2]], axis=2)
        return _composite_on_white(la), f"converted from {how} grayscale+alpha TIFF", pages
    if channels == 3:
        return np.ascontiguousarray(arr8), f"converted from {how} RGB TIFF", pages
    if channels == 4:
        return (
            _composite_on_white(arr8),
            f"converted from {how} RGBA TIFF (alpha composited on white)",
            pages,
        )
    raise _Rejected(f"unsupported TIFF with {channels} samples per pixel")


def _bomb_reason(w: int, h: int, params: ImageCheckParams) -> str:
    return (
        f"pixel count {w}x{h} = {w * h} exceeds the limit of {params.max_pixels} pixels "
        "(decompression-bomb guard; not decoded)"
    )


def _small_reason(w: int, h: int, params: ImageCheckParams) -> str:
    return f"too small: {w}x{h} px, a side is below {params.min_side} px (less than one {params.tile_size} px tile)"


def _decode(data: bytes, params: ImageCheckParams) -> tuple[np.ndarray, str, str, bool]:
    """Open, verify and fully decode; returns (rgb, format, note, converted) or raises _Rejected."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise _Rejected(
            f"pixel count exceeds the decompression-bomb limit (not decoded): {_short(exc)}"
        ) from exc
    except UnidentifiedImageError as exc:
        if data[:4] in _TIFF_MAGIC and "TIFF" in params.allowed_formats:
            rgb, note, pages = _tiff_with_tifffile(data, params)
            if pages > 1:
                note += f"; multi-frame file: first of {pages} frames used"
            return rgb, "TIFF", note, True
        raise _Rejected("not an image: content is not a recognised image format") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on malformed headers
        raise _Rejected(f"not an image or corrupt header: {_short(exc)}") from exc

    fmt = _FORMAT_ALIASES.get(im.format or "", im.format or "unknown")
    if fmt not in params.allowed_formats:
        raise _Rejected(
            f"unsupported image format {fmt} (allowed: {', '.join(params.allowed_formats)})"
        )
    w, h = im.size
    if w * h > params.max_pixels:
        raise _Rejected(_bomb_reason(w, h, params))
    if min(w, h) < params.min_side:
        raise _Rejected(_small_reason(w, h, params))

    if fmt == "TIFF":
        bits, sample_format = _tiff_bits(im)
        high_depth = bits > 8 and im.mode not in _GREY16_MODES + ("I", "F")
        if high_depth or (sample_format == 3 and im.mode != "F"):
            # PIL drops the low byte of 16-bit RGB(A) silently; read those with tifffile.
            rgb, note, pages = _tiff_with_tifffile(data, params)
            if pages > 1:
                note += f"; multi-frame file: first of {pages} frames used"
            return rgb, fmt, note, True

    if fmt == "PNG":
        iend = data.rfind(b"IEND")
        if iend < 0 or iend + 8 > len(data):
            raise _Rejected("truncated or corrupt image: PNG ends before its IEND chunk")

    n_frames = int(getattr(im, "n_frames", 1) or 1)
    with _strict_decoding():
        try:
            im.verify()
        except Exception as exc:  # noqa: BLE001
            raise _Rejected(f"truncated or corrupt image (verify failed): {_short(exc)}") from exc
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(BytesIO(data))
                if n_frames > 1:
                    im.seek(0)
                im.load()
        except Image.DecompressionBombError as exc:
            raise _Rejected(
                f"pixel count exceeds the decompression-bomb limit: {_short(exc)}"
            ) from exc
        except Exception as exc:  # noqa: BLE001
            raise _Rejected(f"truncated or corrupt image: {_short(exc)}") from exc
    try:
        rgb, note = _pil_to_rgb(im)
    except _Rejected:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _Rejected(f"cannot convert pixel mode {im.mode!r} to RGB: {_short(exc)}") from exc
    converted = im.mode != "RGB"
    if fmt == "PNG" and len(data) > 24 and data[24] == 16 and im.mode in ("RGB", "RGBA"):
        # PIL keeps the high byte of 16-bit colour PNGs; the original bytes are not 8-bit.
        note = (note + "; " if note else "") + "converted from 16-bit colour PNG (high byte kept)"
        converted = True
    if n_frames > 1:
        note = (note + "; " if note else "") + f"multi-frame file: first of {n_frames} frames used"
        converted = True
    return rgb, fmt, note, converted


def check_image(
    data: bytes, name: str, params: ImageCheckParams = ImageCheckParams()
) -> CheckedImage:
    """Decode-verify one image file's bytes and normalise it to uint8 RGB; never raises for bad input.

    `name` is only used for context in messages; the caller records it as the QC row's core id.
    """
    del name  # the QC row carries the file name; reasons name the problem
    if not data:
        return CheckedImage(ok=False, reason="empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns on corrupt EXIF etc.; the outcome is reported through `reason` instead.
            warnings.simplefilter("ignore")
            rgb, fmt, note, converted = _decode(data, params)
    except _Rejected as rej:
        return CheckedImage(ok=False, reason=str(rej))
    except MemoryError:
        return CheckedImage(ok=False, reason="not decodable: out of memory while decoding")
    h, w = rgb.shape[:2]
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        return CheckedImage(
            ok=False,
            reason=f"cannot normalise to 8-bit RGB: got {rgb.dtype} {rgb.shape}",
            width=w,
            height=h,
            format=fmt,
        )
    if min(w, h) < params.min_side:  # frames of a multi-frame file may differ in size
        return CheckedImage(
            ok=False, reason=_small_reason(w, h, params), width=w, height=h, format=fmt
        )
    if not has_tissue_tile(rgb, params.tile_size, params.background_grey, params.min_tile_tissue):
        reason = (
            f"blank core: no tissue (no {params.tile_size} px tile has more than "
            f"{params.min_tile_tissue:.0%} foreground)"
        )
        return CheckedImage(ok=False, reason=reason, width=w, height=h, format=fmt)
    return CheckedImage(
        ok=True,
        reason=note,
        rgb=rgb,
        width=w,
        height=h,
        format=fmt,
        content_hash=content_hash(rgb),
        converted=converted,
    )
