"""Decode-verify one core image: reject what cannot be trusted, normalise what can to 8-bit RGB.

`check_image` never raises for bad input; it returns a `CheckedImage` whose `reason` names the
problem precisely (empty, not an image, unsupported format, truncated/corrupt, pixel bomb, too
small, blank) or, for accepted images, notes any conversion that happened.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from her2_kedro.config.ingestion import ImageChecks
from her2_kedro.config.shared import TileConfig
from her2_kedro.imaging.pixels import (
    composite_on_white,
    content_hash,
    decode_png16,
    has_tissue_tile,
    is_png16_colour,
    to_rgb_uint8,
    to_uint8,
)

__all__ = ["ALLOWED_FORMATS", "CheckedImage", "check_image", "has_tissue_tile"]

#: Image formats accepted as core files.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF")

#: The first four bytes of a TIFF or BigTIFF file (either byte order).
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# PIL reports some JPEGs (multi-picture, e.g. from cameras) as MPO; they are JPEG streams.
_FORMAT_ALIASES = {"MPO": "JPEG"}
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_TRUNCATION_LOCK = threading.Lock()


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


def _grey_to_rgb(grey8: np.ndarray) -> np.ndarray:
    return np.repeat(grey8[:, :, None], 3, axis=2)


def pil_to_rgb(im: Image.Image) -> tuple[np.ndarray, str]:
    """Convert a loaded PIL image of any supported mode to uint8 RGB; returns (rgb, note).

    The one set of conversion rules for cores and plain slides alike (alpha onto white, 16-bit
    and float grey by ``imaging.pixels.to_uint8``); an unsupported mode raises, the reason as
    the message.
    """
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im), ""
    if mode in ("L", "1"):
        return np.asarray(
            im.convert("RGB")
        ), f"converted from {'1-bit' if mode == '1' else '8-bit'} grayscale ({mode})"
    if mode == "P":
        if "transparency" in im.info:
            return composite_on_white(
                np.asarray(im.convert("RGBA"))
            ), "converted from palette (P) with transparency composited on white"
        return np.asarray(im.convert("RGB")), "converted from palette (P)"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(im.convert("RGBA"))
        return composite_on_white(rgba), f"converted from {mode} (alpha composited on white)"
    if mode in _GREY16_MODES or mode in ("I", "F"):
        try:
            grey8, how = to_uint8(np.asarray(im))
        except ValueError as exc:
            raise _Rejected(str(exc)) from exc
        return _grey_to_rgb(grey8), f"converted from {mode} grayscale ({how})"
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


def _tiff_with_tifffile(
    data: bytes, checks: ImageChecks, tiles: TileConfig
) -> tuple[np.ndarray, str, int]:
    """Read the first page of a TIFF with tifffile (high bit depth, float); returns (rgb, note, pages)."""
    import tifffile

    try:
        with tifffile.TiffFile(BytesIO(data)) as tif:
            pages = len(tif.pages)
            page = tif.pages[0]
            shape = page.shape
            axes = page.axes
            dims = {ax: n for ax, n in zip(axes, shape, strict=False)}
            _check_size(dims.get("X", 0), dims.get("Y", 0), checks, tiles)
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
    try:
        arr8, how = to_uint8(arr)
    except ValueError as exc:
        raise _Rejected(f"unsupported TIFF samples: {exc}") from exc
    how = how or "8-bit"
    kind = {1: "grayscale", 2: "grayscale+alpha", 3: "RGB", 4: "RGBA"}.get(arr8.shape[2])
    if kind is None:
        raise _Rejected(f"unsupported TIFF with {arr8.shape[2]} samples per pixel")
    alpha = " (alpha composited on white)" if arr8.shape[2] == 4 else ""
    return to_rgb_uint8(arr8), f"converted from {how} {kind} TIFF{alpha}", pages


def _check_size(w: int, h: int, checks: ImageChecks, tiles: TileConfig) -> None:
    """Reject pixel-count bombs (from the header, before decoding) and images below one tile."""
    if w * h > checks.max_pixels:
        raise _Rejected(
            f"pixel count {w}x{h} = {w * h} exceeds the limit of {checks.max_pixels} pixels "
            "(decompression-bomb guard; not decoded)"
        )
    if min(w, h) < checks.min_side:
        raise _Rejected(_small_reason(w, h, checks, tiles))


def _small_reason(w: int, h: int, checks: ImageChecks, tiles: TileConfig) -> str:
    return (
        f"too small: {w}x{h} px, a side is below {checks.min_side} px "
        f"(less than one {tiles.tile_size} px tile)"
    )


def _jpeg_strict_check(data: bytes) -> None:
    """Reject a JPEG whose entropy-coded data the decoder had to repair (libjpeg warnings).

    PIL decodes corrupt scans (bit flips mid-stream) with only a libjpeg warning it never shows.
    simplejpeg turns warnings into errors; the scan is decoded at 1/8 scale (every Huffman code
    is still read, the inverse DCT of 1/64 of the pixels only), which costs a fraction of the
    full decode. Files simplejpeg cannot read at all (PIL could) are left to PIL's verdict.
    """
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, min_factor=8, min_width=1, min_height=1, strict=True)
        return
    except ValueError as strict_error:
        warning = str(strict_error)
    try:  # the same decode, tolerant: succeeds only when the strict failure was a warning
        simplejpeg.decode_jpeg(data, min_factor=8, min_width=1, min_height=1, strict=False)
    except ValueError:
        return
    raise _Rejected(f"corrupt JPEG data (decoder warning: {_short(ValueError(warning))})")


def _decode_png16(data: bytes) -> tuple[np.ndarray, str]:
    try:
        rgb = decode_png16(data)
    except Exception as exc:  # noqa: BLE001
        raise _Rejected(f"truncated or corrupt image: {_short(exc)}") from exc
    return rgb, "converted from 16-bit colour PNG (scaled by 1/257)"


def _open(data: bytes, checks: ImageChecks, tiles: TileConfig) -> Image.Image | tuple:
    """PIL image of the bytes, or the finished decode of a TIFF only tifffile can read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise _Rejected(
            f"pixel count exceeds the decompression-bomb limit (not decoded): {_short(exc)}"
        ) from exc
    except UnidentifiedImageError as exc:
        if data[:4] in TIFF_MAGIC:
            return _tiff_decoded(data, checks, tiles)
        raise _Rejected("not an image: content is not a recognised image format") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on malformed headers
        raise _Rejected(f"not an image or corrupt header: {_short(exc)}") from exc


def _tiff_decoded(
    data: bytes, checks: ImageChecks, tiles: TileConfig
) -> tuple[np.ndarray, str, str, bool]:
    rgb, note, pages = _tiff_with_tifffile(data, checks, tiles)
    if pages > 1:
        note += f"; multi-frame file: first of {pages} frames used"
    return rgb, "TIFF", note, True


def _load_verified(data: bytes, n_frames: int) -> Image.Image:
    """Verify, then fully decode (first frame) with truncated data treated as an error."""
    with _strict_decoding():
        try:
            Image.open(BytesIO(data)).verify()
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
    return im


def _join(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more


def _decode(
    data: bytes, checks: ImageChecks, tiles: TileConfig
) -> tuple[np.ndarray, str, str, bool]:
    """Open, verify and fully decode; returns (rgb, format, note, converted) or raises _Rejected."""
    im = _open(data, checks, tiles)
    if isinstance(im, tuple):
        return im
    fmt = _FORMAT_ALIASES.get(im.format or "", im.format or "unknown")
    if fmt not in ALLOWED_FORMATS:
        raise _Rejected(f"unsupported image format {fmt} (allowed: {', '.join(ALLOWED_FORMATS)})")
    _check_size(*im.size, checks, tiles)
    if fmt == "TIFF":
        bits, sample_format = _tiff_bits(im)
        high_depth = bits > 8 and im.mode not in _GREY16_MODES + ("I", "F")
        if high_depth or (sample_format == 3 and im.mode != "F"):
            # PIL drops the low byte of 16-bit RGB(A) silently; read those with tifffile.
            rgb, _, note, _ = _tiff_decoded(data, checks, tiles)
            return rgb, fmt, note, True
    if fmt == "PNG":
        iend = data.rfind(b"IEND")
        if iend < 0 or iend + 8 > len(data):
            raise _Rejected("truncated or corrupt image: PNG ends before its IEND chunk")
    n_frames = int(getattr(im, "n_frames", 1) or 1)
    im = _load_verified(data, n_frames)
    if fmt == "JPEG":
        _jpeg_strict_check(data)
    png16 = fmt == "PNG" and is_png16_colour(data[:32])
    try:
        rgb, note = _decode_png16(data) if png16 else pil_to_rgb(im)
    except _Rejected:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _Rejected(f"cannot convert pixel mode {im.mode!r} to RGB: {_short(exc)}") from exc
    converted = im.mode != "RGB" or png16
    if n_frames > 1:
        note = _join(note, f"multi-frame file: first of {n_frames} frames used")
        converted = True
    return rgb, fmt, note, converted


def check_image(
    data: bytes,
    name: str,
    checks: ImageChecks | None = None,
    tiles: TileConfig | None = None,
) -> CheckedImage:
    """Decode-verify one image file's bytes and normalise it to uint8 RGB; never raises for bad input.

    `checks` sets the size limits, `tiles` the blank-core rule (no tile with more than
    `min_tissue` tissue). `name` is only context; the caller records it as the QC row's core id.
    """
    del name  # the QC row carries the file name; reasons name the problem
    checks = checks or ImageChecks()
    tiles = tiles or TileConfig()
    if not data:
        return CheckedImage(ok=False, reason="empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns on corrupt EXIF etc.; the outcome is reported through `reason` instead.
            warnings.simplefilter("ignore")
            rgb, fmt, note, converted = _decode(data, checks, tiles)
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
    if min(w, h) < checks.min_side:  # frames of a multi-frame file may differ in size
        reason = _small_reason(w, h, checks, tiles)
        return CheckedImage(ok=False, reason=reason, width=w, height=h, format=fmt)
    if not has_tissue_tile(rgb, tiles.tile_size, tiles.background_grey, tiles.min_tissue):
        reason = (
            f"blank core: no tissue (no {tiles.tile_size} px tile has more than "
            f"{tiles.min_tissue:.0%} foreground)"
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
