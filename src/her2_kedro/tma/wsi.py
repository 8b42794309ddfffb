"""Opening a whole slide with the backend that reads it: tiffslide, openslide or PIL.

Pyramidal and tiled files (TIFF/OME-TIFF/SVS/NDPI, MRXS, ...) are read region by region through
tiffslide or openslide; plain JPEG/PNG slides through ``tma.wsi_plain``. Every reader follows
``tma.wsi_base``: uint8 RGB regions, white outside the slide, bounded-memory thumbnails, and
:class:`SlideReadError` naming the file for any failure to open or decode it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from her2_kedro.imaging.pixels import to_rgb_uint8
from her2_kedro.tma.qc.images import TIFF_MAGIC
from her2_kedro.tma.wsi_base import (
    CONVERT_HINT,
    BaseSlideReader,
    SlideReader,
    SlideReadError,
    SlideTooLarge,
)
from her2_kedro.tma.wsi_plain import PILSlideReader, pil_pixel_limit

__all__ = [
    "SlideReadError",
    "SlideTooLarge",
    "SlideReader",
    "BaseSlideReader",
    "TiffSlideReader",
    "OpenSlideReader",
    "PILSlideReader",
    "open_slide",
    "pil_pixel_limit",
    "to_rgb_uint8",
    "TIFF_SUFFIXES",
    "OPENSLIDE_SUFFIXES",
    "PIL_SUFFIXES",
]

TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif"})
OPENSLIDE_SUFFIXES = frozenset({".mrxs", ".vms", ".vmu", ".svslide", ".dcm"})
PIL_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

# A TIFF level is read chunk (tile or strip) by chunk; a level stored as chunks bigger than this
# (e.g. a flat TIFF written as one strip) would be decoded whole, so it is refused.
MAX_CHUNK_BYTES = 256 * 1024 * 1024


def _level0_location(level_coord: int, ds: float) -> int:
    """A level-0 coordinate L with int(L / ds) == level_coord (what tiffslide/openslide do)."""
    if level_coord == 0:
        return 0
    base = math.ceil(level_coord * ds)
    for cand in (base, base - 1, base + 1, base + 2):
        if cand >= 0 and int(cand / ds) == level_coord:
            return cand
    return base


class _LibrarySlideReader(BaseSlideReader):
    """A reader over a library with OpenSlide's interface (tiffslide, openslide).

    The library's level geometry is adopted (the handle is closed if that fails), and a box of
    level coordinates is read from the level-0 location the library maps back onto it.
    """

    def __init__(self, path: Path, open_library_slide: Callable[[str], Any]) -> None:
        super().__init__(path)
        self._slide: Any = open_library_slide(str(self.path))
        try:
            self._dimensions = tuple(int(v) for v in self._slide.dimensions)  # type: ignore[assignment]
            self._level_dimensions = tuple(
                (int(w), int(h)) for w, h in self._slide.level_dimensions
            )
            self._level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        except Exception:
            self._slide.close()
            raise

    def _level0(self, level: int, x: int, y: int) -> tuple[int, int]:
        """Level-0 location of the level-``level`` pixel (x, y)."""
        ds = self._level_downsamples[level]
        return _level0_location(x, ds), _level0_location(y, ds)

    def close(self) -> None:
        """Release the library's file handle."""
        if not self._closed:
            self._slide.close()
        super().close()


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


class TiffSlideReader(_LibrarySlideReader):
    """Reader backed by ``tiffslide.TiffSlide`` (pyramidal/flat TIFF, SVS, NDPI, SCN, BIF)."""

    def __init__(self, path: Path) -> None:
        import tiffslide

        super().__init__(path, tiffslide.TiffSlide)
        try:
            _check_tiff_chunks(self.path)
        except Exception:
            self.close()
            raise

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        loc = self._level0(level, x, y)
        arr = self._slide.read_region(loc, level, (w, h), as_array=True, padding=True)
        arr = to_rgb_uint8(arr)
        if arr.shape[:2] != (h, w):
            raise ValueError(f"backend returned shape {arr.shape}, expected {(h, w)}")
        return arr


class OpenSlideReader(_LibrarySlideReader):
    """Reader backed by ``openslide.OpenSlide`` (MRXS, VMS and TIFFs tiffslide rejects)."""

    def __init__(self, path: Path) -> None:
        import openslide

        super().__init__(path, openslide.OpenSlide)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        img = self._slide.read_region(self._level0(level, x, y), level, (w, h))  # RGBA PIL
        return to_rgb_uint8(np.asarray(img))


def _is_tiff(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head in TIFF_MAGIC


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
            reader.probe()
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
