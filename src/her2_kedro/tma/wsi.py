"""One reader interface over whole-slide image libraries (tiffslide, openslide, PIL).

Every reader returns uint8 RGB arrays of shape (H, W, 3). Regions partly outside the slide
are padded with white (glass background), never an error. Thumbnails are built from the
smallest pyramid level that is still large enough, and big single-level images are
downsampled in horizontal strips, so memory stays bounded whatever the slide size.
Any failure to open or decode a slide raises :class:`SlideReadError` naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from her2_kedro.imaging.pixels import WHITE, to_rgb_uint8

__all__ = [
    "SlideReadError",
    "SlideTooLarge",
    "SlideReader",
    "BaseSlideReader",
    "TiffSlideReader",
    "OpenSlideReader",
    "open_slide",
    "to_rgb_uint8",
    "TIFF_SUFFIXES",
    "OPENSLIDE_SUFFIXES",
    "PIL_SUFFIXES",
]

TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif"})
OPENSLIDE_SUFFIXES = frozenset({".mrxs", ".vms", ".vmu", ".svslide", ".dcm"})
PIL_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

# Whole levels up to this many bytes are read in one go for a thumbnail; above it the
# level is read in strips of at most _STRIP_BYTES and reduced as it goes.
_WHOLE_LEVEL_BYTES = 64 * 1024 * 1024
_STRIP_BYTES = 32 * 1024 * 1024

# A TIFF level is read chunk (tile or strip) by chunk; a level stored as chunks bigger than this
# (e.g. a flat TIFF written as one strip) would be decoded whole, so it is refused.
MAX_CHUNK_BYTES = 256 * 1024 * 1024
#: How a user turns a slide this reader refuses into one it streams (libvips, free software).
CONVERT_HINT = (
    "convert it to a tiled pyramidal TIFF, e.g. "
    "`vips tiffsave slide.jpg slide.tif --tile --pyramid --compression jpeg --Q 90`"
)


class SlideReadError(Exception):
    """A slide could not be opened or read; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class SlideTooLarge(SlideReadError):
    """A slide that could only be read by decoding more than the memory bound allows."""


@runtime_checkable
class SlideReader(Protocol):
    """What the dearrayer needs from a slide: geometry, region reads and a thumbnail."""

    path: Path

    @property
    def dimensions(self) -> tuple[int, int]: ...

    @property
    def level_count(self) -> int: ...

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    def level_downsamples(self) -> tuple[float, ...]: ...

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray: ...

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]: ...

    def close(self) -> None: ...

    def __enter__(self) -> SlideReader: ...

    def __exit__(self, *exc: object) -> None: ...


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB array to (w, h): area averaging when shrinking, bilinear otherwise."""
    h, w = rgb.shape[:2]
    if (w, h) == tuple(size):
        return rgb
    shrink = size[0] <= w and size[1] <= h
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize(size, method))


class BaseSlideReader:
    """Shared logic: white padding of out-of-bounds regions and bounded-memory thumbnails.

    Subclasses implement ``_read_level(level, x, y, w, h)`` for boxes fully inside the level
    (level coordinates) and set the geometry attributes.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._dimensions: tuple[int, int] = (0, 0)
        self._level_dimensions: tuple[tuple[int, int], ...] = ()
        self._level_downsamples: tuple[float, ...] = ()
        self._closed = False

    # --- geometry -----------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Width and height of level 0."""
        return self._dimensions

    @property
    def level_count(self) -> int:
        """Number of pyramid levels (1 for flat images)."""
        return len(self._level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(w, h) of every level, level 0 first."""
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of every level relative to level 0."""
        return self._level_downsamples

    # --- backend hook --------------------------------------------------------------------
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read an in-bounds box in level coordinates; return uint8 RGB (h, w, 3)."""
        raise NotImplementedError

    def _guarded(self, what: str, fn: Callable[[], np.ndarray]) -> np.ndarray:
        if self._closed:
            raise SlideReadError(self.path, f"{what}: reader is closed")
        try:
            return fn()
        except SlideReadError:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # decoder errors of any backend
            raise SlideReadError(self.path, f"{what} failed: {type(exc).__name__}: {exc}") from exc

    # --- public API ------------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read a (w, h) region at ``level`` whose top-left is ``location`` in level-0 px.

        Parts outside the slide are white; the result is always uint8 RGB of shape (h, w, 3).
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range 0..{self.level_count - 1}")
        w, h = int(size[0]), int(size[1])
        if w < 0 or h < 0:
            raise ValueError(f"{self.path}: negative region size {size}")
        out = np.full((h, w, 3), WHITE, dtype=np.uint8)
        if w == 0 or h == 0:
            return out
        ds = self._level_downsamples[level]
        lx = math.floor(location[0] / ds)
        ly = math.floor(location[1] / ds)
        lw, lh = self._level_dimensions[level]
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lw), min(ly + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        part = self._guarded(
            f"reading region {tuple(location)} size {(w, h)} at level {level}",
            lambda: self._read_level(level, x0, y0, x1 - x0, y1 - y0),
        )
        out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = part
        return out

    def _thumbnail_level(self, max_side: int) -> int:
        """Smallest level whose long side is still >= max_side (level 0 if none is)."""
        best = 0
        for i, (w, h) in enumerate(self._level_dimensions):
            if max(w, h) >= max_side and (
                self._level_downsamples[i] > self._level_downsamples[best]
            ):
                best = i
        return best

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """RGB thumbnail whose long side is at most ``max_side`` and its level-0 downsample.

        Read from the smallest sufficient level; large levels are reduced strip by strip.
        """
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}")
        level = self._thumbnail_level(max_side)
        lw, lh = self._level_dimensions[level]
        scale = min(1.0, max_side / max(lw, lh))
        tw, th = max(1, round(lw * scale)), max(1, round(lh * scale))
        img = self._guarded(
            f"building a {tw}x{th} thumbnail from level {level}",
            lambda: self._level_thumbnail(level, tw, th),
        )
        w0, h0 = self._dimensions
        return img, (w0 / tw + h0 / th) / 2.0

    def _level_thumbnail(self, level: int, tw: int, th: int) -> np.ndarray:
        lw, lh = self._level_dimensions[level]
        if lw * lh * 3 <= _WHOLE_LEVEL_BYTES:
            return _resize(self._read_level(level, 0, 0, lw, lh), (tw, th))
        f = max(1, min(lw // tw, lh // th))  # integer pre-reduction factor
        rows_per_strip = max(f, (_STRIP_BYTES // (lw * 3)) // f * f)
        pieces = []
        for y in range(0, lh, rows_per_strip):
            hh = min(rows_per_strip, lh - y)
            strip = self._read_level(level, 0, y, lw, hh)
            if f > 1:
                strip = np.asarray(Image.fromarray(strip).reduce(f))
            pieces.append(strip)
            del strip
        reduced = np.concatenate(pieces, axis=0)
        del pieces
        return _resize(reduced, (tw, th))

    def close(self) -> None:
        """Release the underlying file handles."""
        self._closed = True

    def __enter__(self) -> BaseSlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, dimensions={self._dimensions})"


def _level0_location(level_coord: int, ds: float) -> int:
    """A level-0 coordinate L with int(L / ds) == level_coord (what tiffslide/openslide do)."""
    if level_coord == 0:
        return 0
    base = math.ceil(level_coord * ds)
    for cand in (base, base - 1, base + 1, base + 2):
        if cand >= 0 and int(cand / ds) == level_coord:
            return cand
    return base


def _adopt_geometry(reader: BaseSlideReader, slide: Any) -> None:
    """Copy an OpenSlide-like backend's level geometry onto ``reader``; close the backend on error."""
    try:
        reader._dimensions = tuple(int(v) for v in slide.dimensions)  # type: ignore[assignment]
        reader._level_dimensions = tuple((int(w), int(h)) for w, h in slide.level_dimensions)
        reader._level_downsamples = tuple(float(d) for d in slide.level_downsamples)
    except Exception:
        slide.close()
        raise


def _check_tiff_chunks(path: Path) -> None:
    """Refuse a TIFF whose pages are stored in chunks too big to decode one at a time."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            chunk = getattr(page, "chunks", None)
            if not chunk:
                continue
            n_bytes = int(np.prod(chunk)) * (page.dtype.itemsize if page.dtype else 1)
            if n_bytes > MAX_CHUNK_BYTES:
                raise SlideTooLarge(
                    path,
                    f"a {page.imagewidth}x{page.imagelength} page is stored in chunks of "
                    f"{n_bytes / 2**20:.0f} MiB, above the {MAX_CHUNK_BYTES // 2**20} MiB that are "
                    f"decoded at once (memory bound); {CONVERT_HINT}",
                )


class TiffSlideReader(BaseSlideReader):
    """Reader backed by ``tiffslide.TiffSlide`` (pyramidal/flat TIFF, SVS, NDPI, SCN, BIF)."""

    def __init__(self, path: Path) -> None:
        import tiffslide

        super().__init__(path)
        self._slide: Any = tiffslide.TiffSlide(str(self.path))
        _adopt_geometry(self, self._slide)
        _check_tiff_chunks(self.path)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._level_downsamples[level]
        loc = (_level0_location(x, ds), _level0_location(y, ds))
        arr = self._slide.read_region(loc, level, (w, h), as_array=True, padding=True)
        arr = to_rgb_uint8(arr)
        if arr.shape[:2] != (h, w):
            raise ValueError(f"backend returned shape {arr.shape}, expected {(h, w)}")
        return arr

    def close(self) -> None:
        """Release the TIFF file handle."""
        if not self._closed:
            self._slide.close()
        super().close()


class OpenSlideReader(BaseSlideReader):
    """Reader backed by ``openslide.OpenSlide`` (MRXS, VMS and TIFFs tiffslide rejects)."""

    def __init__(self, path: Path) -> None:
        import openslide

        super().__init__(path)
        self._slide: Any = openslide.OpenSlide(str(self.path))
        _adopt_geometry(self, self._slide)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._level_downsamples[level]
        loc = (_level0_location(x, ds), _level0_location(y, ds))
        img = self._slide.read_region(loc, level, (w, h))  # RGBA PIL, premultiplied-free
        return to_rgb_uint8(np.asarray(img))

    def close(self) -> None:
        """Release the OpenSlide handle."""
        if not self._closed:
            self._slide.close()
        super().close()


def _probe(reader: BaseSlideReader) -> None:
    """Decode one pixel of the smallest level so broken files fail at open time."""
    from her2_kedro.tma.wsi_plain import PILSlideReader

    if isinstance(reader, PILSlideReader):
        reader._guarded("probe decode", lambda: (reader.probe(), np.zeros(0))[1])
        return
    level = reader.level_count - 1
    lw, lh = reader.level_dimensions[level]
    if lw < 1 or lh < 1:
        raise SlideReadError(reader.path, f"level {level} has an empty size {lw}x{lh}")
    reader._guarded("probe read", lambda: reader._read_level(level, lw // 2, lh // 2, 1, 1))


def _is_tiff(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_slide(path: Path, max_pixels: int = 2_000_000_000) -> BaseSlideReader:
    """Open a whole-slide image with the best available backend.

    tiffslide for TIFF-family files, openslide as fallback (MRXS, VMS, TIFFs tiffslide
    rejects), PIL for plain JPEG/PNG (refused above ``max_pixels``). Raises SlideReadError.
    """
    path = Path(path)
    if not path.exists():
        raise SlideReadError(path, "file does not exist")
    if path.is_dir() and path.suffix.lower() not in OPENSLIDE_SUFFIXES:
        raise SlideReadError(path, "is a directory, not a slide file")
    try:
        if path.stat().st_size == 0:
            raise SlideReadError(path, "file is empty")
    except OSError as exc:
        raise SlideReadError(path, f"cannot stat file: {exc}") from exc

    from her2_kedro.tma.wsi_plain import PILSlideReader

    suffix = path.suffix.lower()
    if suffix in PIL_SUFFIXES:
        attempts: list[Callable[[], BaseSlideReader]] = [lambda: PILSlideReader(path, max_pixels)]
        names = ["PIL"]
    elif suffix in TIFF_SUFFIXES or _is_tiff(path):
        attempts = [lambda: TiffSlideReader(path), lambda: OpenSlideReader(path)]
        names = ["tiffslide", "openslide"]
    else:
        attempts = [lambda: OpenSlideReader(path)]
        names = ["openslide"]

    problems: list[str] = []
    for name, attempt in zip(names, attempts, strict=True):
        reader: BaseSlideReader | None = None
        try:
            reader = attempt()
            _probe(reader)
            return reader
        except SlideReadError as exc:
            if reader is not None:
                reader.close()
            if isinstance(exc, SlideTooLarge):
                raise
            problems.append(f"{name}: {exc.problem}")
        except MemoryError:
            raise
        except Exception as exc:
            if reader is not None:
                try:
                    reader.close()
                except Exception:
                    pass
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            problems.append(f"{name}: {type(exc).__name__}: {msg}"[:300])
    kind = "unsupported or corrupt slide" if suffix not in PIL_SUFFIXES else "unreadable image"
    raise SlideReadError(path, f"{kind} ({'; '.join(problems)})")


def __getattr__(name: str) -> Any:
    """The plain JPEG/PNG reader lives in ``tma.wsi_plain``; it is importable from here too."""
    if name in ("PILSlideReader", "pil_pixel_limit"):
        from her2_kedro.tma import wsi_plain

        return getattr(wsi_plain, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
