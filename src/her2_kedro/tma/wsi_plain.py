"""Plain JPEG/PNG whole slides: decoded whole, so bounded by a pixel limit, with PIL's guard scoped.

A plain JPEG or PNG cannot be read region by region. A slide is therefore decoded once, straight
into one NumPy array (simplejpeg, imagecodecs: about 3-5 bytes a pixel) and refused above
``ingestion.dearray.max_slide_pixels`` before anything is decoded, with a message saying how to
convert it to a tiled pyramidal TIFF, which ``tma.wsi`` reads tile by tile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from her2_kedro.imaging.pixels import decode_png16, is_png16_colour, to_rgb_uint8
from her2_kedro.tma.wsi import (
    CONVERT_HINT,
    BaseSlideReader,
    SlideReadError,
    SlideTooLarge,
    _resize,
)

__all__ = ["PILSlideReader", "pil_pixel_limit"]

logger = logging.getLogger(__name__)
_PIL_LOCK = threading.Lock()


@contextmanager
def pil_pixel_limit(limit: int) -> Iterator[None]:
    """Let PIL open images up to ``limit`` pixels inside the block; the global guard is restored.

    PIL's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) is process-wide. The slide reader
    checks the pixel count itself and needs a higher limit only while it opens a slide, so the
    change is made under a lock, never to ``None``, and undone on exit.
    """
    with _PIL_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max(int(limit), saved or 0)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


class PILSlideReader(BaseSlideReader):
    """Reader for plain JPEG/PNG slides (single level, decoded whole on first region read).

    A plain JPEG/PNG cannot be read region by region, so a slide above ``max_pixels`` is refused
    at open (the pixel count comes from the header) with a message saying how to convert it;
    decoding costs about ``PEAK_BYTES_PER_PIXEL`` bytes per pixel at its peak. JPEG thumbnails use
    ``Image.draft`` (DCT-domain downscale) so dearraying does not decode the full image.
    """

    #: Peak memory of a decoded plain slide per pixel: the RGB array decoded straight into NumPy
    #: (simplejpeg, imagecodecs), plus slack for the region being read.
    PEAK_BYTES_PER_PIXEL = 5
    #: The same through PIL (its own buffer plus copies), for colour modes only PIL decodes.
    PIL_BYTES_PER_PIXEL = 14

    def __init__(self, path: Path, max_pixels: int) -> None:
        super().__init__(path)
        self._max_pixels = int(max_pixels)
        (w, h), self._format = _header_size(self.path)
        if w < 1 or h < 1:
            raise SlideReadError(self.path, f"image has an empty size {w}x{h}")
        if w * h > max_pixels:
            peak = w * h * self.PEAK_BYTES_PER_PIXEL / 2**30
            raise SlideTooLarge(
                self.path,
                f"plain {self._format} slide of {w}x{h} = {w * h} pixels exceeds "
                f"ingestion.dearray.max_slide_pixels = {max_pixels} (a plain JPEG/PNG is decoded "
                f"whole, about {peak:.1f} GiB for this one); {CONVERT_HINT}",
            )
        self._dimensions = (w, h)
        self._level_dimensions = ((w, h),)
        self._level_downsamples = (1.0,)
        self._full: np.ndarray | None = None

    def _open(self) -> Image.Image:
        with pil_pixel_limit(self._max_pixels):
            return Image.open(self.path)

    def _decoded(self) -> np.ndarray:
        if self._full is None:
            arr = _decode_plain(self.path, self._format)
            if arr is None:  # a mode the direct decoders do not handle: PIL, ~3x the memory
                w, h = self._dimensions
                if w * h * self.PIL_BYTES_PER_PIXEL > self._max_pixels * self.PEAK_BYTES_PER_PIXEL:
                    raise SlideTooLarge(
                        self.path,
                        f"this plain {self._format} slide ({w}x{h}) can only be decoded by PIL, "
                        f"at about {self.PIL_BYTES_PER_PIXEL} bytes a pixel, above the memory "
                        f"bound of ingestion.dearray.max_slide_pixels; {CONVERT_HINT}",
                    )
                with self._open() as im:
                    arr = _pil_rgb(im)
            if arr.shape[:2] != (self._dimensions[1], self._dimensions[0]):
                raise ValueError(f"decoded shape {arr.shape} differs from header size")
            self._full = arr
        return self._full

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._decoded()[y : y + h, x : x + w].copy()

    def _level_thumbnail(self, level: int, tw: int, th: int) -> np.ndarray:
        if self._full is None and self._format == "JPEG":
            with self._open() as im:
                im.draft("RGB", (tw, th))  # DCT-domain downscale: decode at 1/2..1/8
                small = _pil_rgb(im)
            return _resize(small, (tw, th))
        self._decoded()
        return super()._level_thumbnail(level, tw, th)  # strip by strip, no full-size copy

    def probe(self) -> None:
        """Check the file decodes without keeping (or, for JPEG, fully decoding) it."""
        with self._open() as im:
            if self._format == "JPEG":
                im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                im.load()
            elif self._format == "PNG":
                im.verify()
            else:
                im.load()

    def close(self) -> None:
        """Drop the decoded image."""
        self._full = None
        super().close()


def _decode_plain(path: Path, fmt: str) -> np.ndarray | None:
    """uint8 RGB of a plain JPEG/PNG decoded straight into one NumPy array (3 bytes a pixel).

    PIL would hold its own 4-byte-a-pixel buffer and copies of it; simplejpeg (JPEG) and
    imagecodecs (PNG, 16-bit at full depth) decode into the array itself. None when the file's
    colour mode needs PIL (CMYK JPEG, for example).
    """
    data = path.read_bytes()
    try:
        if fmt == "JPEG":
            import simplejpeg

            colorspace = simplejpeg.decode_jpeg_header(data)[2]
            if colorspace not in ("YCbCr", "Gray"):
                return None
            if colorspace == "Gray":
                return to_rgb_uint8(simplejpeg.decode_jpeg(data, "GRAY", strict=False))
            return simplejpeg.decode_jpeg(data, "RGB", strict=False)
        if fmt == "PNG":
            if is_png16_colour(data[:32]):
                return decode_png16(data)
            import imagecodecs

            return to_rgb_uint8(imagecodecs.png_decode(data))
    except (ValueError, RuntimeError) as exc:
        logger.debug("%s: direct decode failed (%s); using PIL", path, exc)
        return None
    return None


def _header_size(path: Path) -> tuple[tuple[int, int], str]:
    """Size and format from a JPEG/PNG header, without PIL's global pixel guard (nothing decoded)."""
    from PIL import JpegImagePlugin, PngImagePlugin

    with path.open("rb") as fh:
        head = fh.read(8)
        fh.seek(0)
        if head.startswith(b"\x89PNG"):
            im: Image.Image = PngImagePlugin.PngImageFile(fh)
        elif head.startswith(b"\xff\xd8"):
            im = JpegImagePlugin.JpegImageFile(fh)
        else:
            raise ValueError("not a JPEG or PNG file")
        return im.size, str(im.format)


def _pil_rgb(im: Image.Image) -> np.ndarray:
    """uint8 RGB of a PIL image by the shared conversion rules (alpha onto white, 16-bit / 257)."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        return to_rgb_uint8(np.asarray(im.convert("RGBA")))
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        return to_rgb_uint8(np.asarray(im))
    return to_rgb_uint8(np.asarray(im.convert("RGB")))
