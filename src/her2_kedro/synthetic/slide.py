"""Synthetic whole TMA slides: cores on a labelled, slightly rotated grid in a pyramidal BigTIFF.

Grid labels are QuPath-style ``"<row letter>-<column number>"`` (``A-1`` is top left before
rotation). The layout table (``slide_layout``) is the ground truth for dearraying tests: level-0
centre of every grid position and whether a core is present there.

Core images are square RGB images whose round tissue disk fills about ``CORE_FILL`` of the side
(as ``render.render_core`` makes them); they are scaled so that the disk diameter is about
``core_diameter_px`` and blended only where there is tissue (grey below the glass level) inside
the inscribed circle, so their own glass merges with the slide glass.

The slide is written tile by tile (one tile row at a time, painting only the cores and debris
that intersect it) so a 20 000 x 30 000 px slide never exists in memory; each pyramid level is
painted from core images resized for that level, never by downsampling level 0.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image

from her2_kedro.imaging.pixels import grey
from her2_kedro.synthetic.optics import INTERNAL_STAINS

CORE_FILL = 0.93  # tissue-disk diameter / image side of a rendered core
MIN_LEVEL_SIDE = 1024  # add downsampled levels until the smaller side is below this
GLASS_RGB = INTERNAL_STAINS.background_rgb


@dataclass(frozen=True)
class SlideSpec:
    """Geometry and storage of one synthetic TMA slide (lengths in level-0 pixels)."""

    n_rows: int
    n_cols: int
    core_diameter_px: int
    pitch_px: int
    rotation_deg: float = 2.0
    jitter_px: float = 12.0
    missing: tuple[str, ...] = ()
    n_debris: int = 5
    margin_px: int = 256
    tile_size: int = 512
    jpeg_quality: int = 90
    n_touching: int = 0  # horizontally adjacent pairs pushed together until their disks touch
    mpp: float = 0.5  # microns per level-0 pixel, written as the TIFF resolution


def row_letter(row: int) -> str:
    """Row label of a 0-based grid row: A..Z, then AA, AB, ... (QuPath style)."""
    if row < 0:
        raise ValueError("row must be >= 0")
    out = ""
    row += 1
    while row:
        row, rem = divmod(row - 1, 26)
        out = chr(65 + rem) + out
    return out


def core_label(row: int, col: int) -> str:
    """QuPath-style core label of 0-based grid indices, e.g. (0, 0) -> 'A-1'."""
    return f"{row_letter(row)}-{col + 1}"


def _image_side(spec: SlideSpec) -> int:
    """Level-0 side of a pasted core image."""
    return int(round(spec.core_diameter_px / CORE_FILL))


def _half_extent(spec: SlideSpec) -> tuple[float, float]:
    """Half width and half height of the rotated grid of core centres."""
    gx = (spec.n_cols - 1) / 2.0 * spec.pitch_px
    gy = (spec.n_rows - 1) / 2.0 * spec.pitch_px
    a = np.deg2rad(spec.rotation_deg)
    return abs(np.cos(a)) * gx + abs(np.sin(a)) * gy, abs(np.sin(a)) * gx + abs(np.cos(a)) * gy


def slide_size(spec: SlideSpec) -> tuple[int, int]:
    """Level-0 (width, height) of the slide: rotated grid + core images + jitter + margins."""
    hx, hy = _half_extent(spec)
    pad = _image_side(spec) / 2.0 + 2.0 * spec.jitter_px + spec.margin_px
    return int(np.ceil(2 * (hx + pad))), int(np.ceil(2 * (hy + pad)))


def slide_layout(spec: SlideSpec, rng: np.random.Generator) -> pd.DataFrame:
    """Ground-truth grid: one row per position with label, row/col, level-0 centre, presence."""
    if spec.n_rows < 1 or spec.n_cols < 1:
        raise ValueError("a slide needs at least one row and one column")
    labels = [core_label(r, c) for r in range(spec.n_rows) for c in range(spec.n_cols)]
    unknown = set(spec.missing) - set(labels)
    if unknown:
        raise ValueError(f"missing labels not on the grid: {sorted(unknown)}")
    w, h = slide_size(spec)
    rr, cc = np.meshgrid(np.arange(spec.n_rows), np.arange(spec.n_cols), indexing="ij")
    x = (cc.ravel() - (spec.n_cols - 1) / 2.0) * spec.pitch_px
    y = (rr.ravel() - (spec.n_rows - 1) / 2.0) * spec.pitch_px
    a = np.deg2rad(spec.rotation_deg)
    jit = np.clip(
        rng.normal(0.0, spec.jitter_px, (2, x.size)), -2 * spec.jitter_px, 2 * spec.jitter_px
    )
    cx = w / 2.0 + np.cos(a) * x - np.sin(a) * y + jit[0]
    cy = h / 2.0 + np.sin(a) * x + np.cos(a) * y + jit[1]
    present = np.array([lab not in spec.missing for lab in labels])
    if spec.n_touching > 0 and spec.n_cols > 1:
        pairs = [
            (r * spec.n_cols + c, r * spec.n_cols + c + 1)
            for r in range(spec.n_rows)
            for c in range(spec.n_cols - 1)
        ]
        pairs = [p for p in pairs if present[p[0]] and present[p[1]]]
        for k in rng.permutation(len(pairs))[: spec.n_touching]:
            i, j = pairs[k]
            dx, dy = cx[j] - cx[i], cy[j] - cy[i]
            dist = float(np.hypot(dx, dy))
            shift = (dist - spec.core_diameter_px * 0.98) / dist
            cx[j] -= dx * shift
            cy[j] -= dy * shift
    return pd.DataFrame(
        {
            "core": labels,
            "row": rr.ravel().astype(int),
            "col": cc.ravel().astype(int),
            "cx": cx,
            "cy": cy,
            "present": present,
        }
    )


@dataclass
class _Sprite:
    """Something pasted on the slide: its level-0 centre and a way to get its pixels per level."""

    cx: float
    cy: float
    side0: int
    pixels: Callable[[int], np.ndarray]  # level -> RGB uint8 (side0 / 2**level square)

    def box(self, level: int) -> tuple[int, int, int]:
        """Top-left x, top-left y and side of the sprite at a level."""
        f = 2**level
        side = max(1, int(round(self.side0 / f)))
        return int(round(self.cx / f - side / 2.0)), int(round(self.cy / f - side / 2.0)), side


def _alpha(rgb: np.ndarray, glass_grey: float) -> np.ndarray:
    """Blend weight: tissue (darker than glass) inside the inscribed circle of the square."""
    g = grey(rgb)
    a = np.clip((glass_grey - 4.0 - g) / 6.0, 0.0, 1.0)
    n = rgb.shape[0]
    yy, xx = np.ogrid[:n, :n]
    r = np.hypot(yy + 0.5 - n / 2.0, xx + 0.5 - n / 2.0)
    return a * np.clip(n / 2.0 - 0.5 - r, 0.0, 1.0)


def _jpeg(rgb: np.ndarray) -> bytes:
    """Near-lossless JPEG bytes used to hold resized core images compactly while writing."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=94)
    return buf.getvalue()


def _core_sprite(rgb: np.ndarray, cx: float, cy: float, side0: int, n_levels: int) -> _Sprite:
    """Resize a core image once per level and keep each as JPEG bytes (decoded on demand)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError("core images must be (H, W, 3) uint8")
    im = Image.fromarray(rgb)
    stored: list[bytes] = []
    for level in range(n_levels):
        side = max(1, int(round(side0 / 2**level)))
        resized = (
            im
            if im.size == (side, side)
            else im.resize(
                (side, side),
                Image.Resampling.LANCZOS if side < im.size[0] else Image.Resampling.BILINEAR,
            )
        )
        stored.append(_jpeg(np.asarray(resized)))

    def pixels(level: int) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(stored[level])).convert("RGB"))

    return _Sprite(cx, cy, side0, pixels)


def _debris_sprite(rng: np.random.Generator, cx: float, cy: float, radius: float) -> _Sprite:
    """A small dark irregular speck or fragment (dust, a detached tissue crumb)."""
    side0 = max(4, int(np.ceil(2 * radius * 1.4)) + 2)
    harmonics = rng.normal(0.0, 0.18, 4)
    phases = rng.uniform(0, 2 * np.pi, 4)
    dark = rng.random() < 0.6
    colour = np.array((70, 52, 40) if dark else (150, 150, 200), dtype=np.float32) * rng.uniform(
        0.85, 1.15
    )

    def pixels(level: int) -> np.ndarray:
        side = max(1, int(round(side0 / 2**level)))
        yy, xx = np.mgrid[:side, :side].astype(np.float32) + 0.5 - side / 2.0
        ang = np.arctan2(yy, xx)
        rad = (
            radius
            / 2**level
            * (
                1.0
                + sum(
                    h * np.cos((k + 2) * ang + p)
                    for k, (h, p) in enumerate(zip(harmonics, phases, strict=True))
                )
            )
        )
        inside = np.clip(rad - np.hypot(yy, xx) + 0.5, 0.0, 1.0)[..., None]
        glass = np.array(GLASS_RGB, dtype=np.float32)
        return np.clip(glass * (1 - inside) + np.clip(colour, 0, 255) * inside, 0, 255).astype(
            np.uint8
        )

    return _Sprite(cx, cy, side0, pixels)


def _n_levels(width: int, height: int) -> int:
    """Number of pyramid levels (factor 2) until the smaller side drops below MIN_LEVEL_SIDE."""
    n, w, h = 1, width, height
    while min(w, h) >= MIN_LEVEL_SIDE:
        w, h = (w + 1) // 2, (h + 1) // 2
        n += 1
    return n


def _level_tiles(
    sprites: list[_Sprite],
    level: int,
    width: int,
    height: int,
    tile: int,
    noise: np.ndarray,
    glass_grey: float,
) -> Iterator[np.ndarray]:
    """Yield the level's tiles in row-major order, painting one tile row (strip) at a time."""
    n_tx = -(-width // tile)
    strip_w = n_tx * tile
    boxes = [s.box(level) for s in sprites]
    order = sorted(range(len(sprites)), key=lambda i: boxes[i][1])
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    glass = np.array(GLASS_RGB, dtype=np.int16)
    reps = -(-strip_w // noise.shape[1])
    for y0 in range(0, height, tile):
        y1 = y0 + tile
        strip16 = np.tile(noise, (1, reps, 1))[:, :strip_w] + glass
        strip = np.clip(strip16, 0, 255).astype(np.uint8)
        for i in order:
            bx, by, side = boxes[i]
            if by >= y1:
                break
            if by + side <= y0:
                cache.pop(i, None)
                continue
            if i not in cache:
                rgb = sprites[i].pixels(level)
                if rgb.shape[0] != side:
                    rgb = np.asarray(
                        Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR)
                    )
                cache[i] = (rgb, _alpha(rgb, glass_grey))
            rgb, alpha = cache[i]
            sy0, sy1 = max(y0, by), min(y1, by + side)
            sx0, sx1 = max(0, bx), min(strip_w, bx + side)
            if sy0 >= sy1 or sx0 >= sx1:
                continue
            src = rgb[sy0 - by : sy1 - by, sx0 - bx : sx1 - bx].astype(np.float32)
            a = alpha[sy0 - by : sy1 - by, sx0 - bx : sx1 - bx, None]
            dst = strip[sy0 - y0 : sy1 - y0, sx0:sx1]
            dst[...] = (dst * (1.0 - a) + src * a + 0.5).astype(np.uint8)
        if y1 > height:  # rows below the image: glass (tifffile crops them)
            strip[height - y0 :] = glass.astype(np.uint8)
        for x0 in range(0, strip_w, tile):
            yield strip[:, x0 : x0 + tile]


def write_synthetic_slide(
    path: Path,
    spec: SlideSpec,
    core_images: Mapping[str, np.ndarray] | Callable[[str], np.ndarray],
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Stream a pyramidal, tiled, JPEG-compressed BigTIFF TMA slide to ``path``; return its layout.

    ``core_images`` gives the image of each present label (mapping or function). The layout is
    drawn with ``rng`` first, exactly as ``slide_layout(spec, rng)`` would draw it.
    """
    layout = slide_layout(spec, rng)
    width, height = slide_size(spec)
    n_levels = _n_levels(width, height)
    side0 = _image_side(spec)
    get = core_images if callable(core_images) else core_images.__getitem__
    sprites: list[_Sprite] = []
    for row in layout.itertuples(index=False):
        if row.present:
            sprites.append(_core_sprite(np.asarray(get(row.core)), row.cx, row.cy, side0, n_levels))
    # Debris: specks and crumbs away from every grid position (present or not).
    centres = layout[["cx", "cy"]].to_numpy()
    keep_out = spec.core_diameter_px / 2.0 + 3.0 * spec.jitter_px + 10.0
    placed = 0
    for _ in range(spec.n_debris * 200):
        if placed >= spec.n_debris:
            break
        radius = float(
            np.exp(rng.uniform(np.log(3.0), np.log(max(4.0, spec.core_diameter_px * 0.04))))
        )
        x, y = (
            rng.uniform(radius * 2, width - radius * 2),
            rng.uniform(radius * 2, height - radius * 2),
        )
        if np.min(np.hypot(centres[:, 0] - x, centres[:, 1] - y)) < keep_out + 2 * radius:
            continue
        sprites.append(_debris_sprite(rng, x, y, radius))
        placed += 1

    tile = int(spec.tile_size)
    if tile % 16:
        raise ValueError("tile_size must be a multiple of 16")
    noise = np.round(rng.normal(0.0, 1.2, (tile, 509, 3))).astype(np.int16)
    glass_grey = float(grey(np.array([[GLASS_RGB]], dtype=np.uint8))[0, 0])
    res = 1e4 / spec.mpp  # pixels per centimetre
    try:
        import imagecodecs  # noqa: F401

        compression: tuple[str, dict[str, int]] = ("jpeg", {"level": int(spec.jpeg_quality)})
    except ImportError:
        compression = ("zlib", {"level": 6})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(n_levels):
            f = 2**level
            w, h = -(-width // f), -(-height // f)
            tif.write(
                _level_tiles(sprites, level, w, h, tile, noise, glass_grey),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression[0],
                compressionargs=compression[1],
                subifds=n_levels - 1 if level == 0 else None,
                subfiletype=0 if level == 0 else 1,
                resolution=(res / f, res / f),
                resolutionunit="CENTIMETER",
                description=f"her2_kedro synthetic TMA slide {spec.n_rows}x{spec.n_cols}"
                if level == 0
                else None,
                metadata=None,
            )
    return layout
