"""Synthetic TMA slides for tests and benchmarks.

A scene is a list of textured disks (level-0 coordinates) on a light glass background. It is
rendered analytically tile by tile at any downsample, so pyramidal TIFFs of any size can be
written with bounded memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

BACKGROUND = (236, 236, 243)
ROWS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Disk:
    cx: float
    cy: float
    r: float
    colour: tuple[int, int, int]
    label: str = ""  # "" for debris / unlabelled blobs
    noise: float | None = None  # texture amplitude; None: the scene's

    def bbox(self) -> tuple[float, float, float, float]:
        return self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r

    def inside(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        return (px - self.cx) ** 2 + (py - self.cy) ** 2 <= self.r**2


@dataclass(frozen=True)
class Band:
    """A thick segment (capsule) from (x0, y0) to (x1, y1), painted over what is below it.

    With the glass colour and ``noise=0`` it carves glass into cores: lumens that open onto the
    glass, tears, a chord cut off a torn rim.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    half_width: float
    colour: tuple[int, int, int] = BACKGROUND
    noise: float | None = 0.0
    label: str = ""

    def bbox(self) -> tuple[float, float, float, float]:
        w = self.half_width
        return (
            min(self.x0, self.x1) - w,
            min(self.y0, self.y1) - w,
            max(self.x0, self.x1) + w,
            max(self.y0, self.y1) + w,
        )

    def inside(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        dx, dy = self.x1 - self.x0, self.y1 - self.y0
        t = np.clip(
            ((px - self.x0) * dx + (py - self.y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0
        )
        return (px - self.x0 - t * dx) ** 2 + (py - self.y0 - t * dy) ** 2 <= self.half_width**2


@dataclass
class Scene:
    width: int
    height: int
    disks: list[Disk | Band] = field(default_factory=list)  # painted in order
    noise: float = 18.0
    seed: int = 0

    @property
    def cores(self) -> dict[str, Disk]:
        return {d.label: d for d in self.disks if d.label and isinstance(d, Disk)}


def palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct dark-ish colours (grey well below 220)."""
    vals = (30, 85, 140, 190)
    cols = [(r, g, b) for r in vals for g in vals for b in vals]
    cols = [c for c in cols if 0.2989 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 165]
    rng = np.random.default_rng(1234)
    rng.shuffle(cols)
    if n > len(cols):
        cols = cols * (n // len(cols) + 1)
    return cols[:n]


def make_tma(
    n_rows: int,
    n_cols: int,
    *,
    pitch: float = 160.0,
    diameter: float = 110.0,
    rotation_deg: float = 0.0,
    jitter: float = 0.0,
    missing: set[str] | frozenset[str] = frozenset(),
    debris: int = 0,
    debris_radius: float = 6.0,
    touching: tuple[str, str] | None = None,
    border: float = 150.0,
    seed: int = 0,
    noise: float = 18.0,
) -> Scene:
    """Scene of an n_rows x n_cols TMA; labels 'A-1'... (row letter, column number).

    ``touching=(a, b)`` moves cores a and b towards each other until they overlap by 8% of d.
    """
    rng = np.random.default_rng(seed)
    th = math.radians(rotation_deg)
    c, s = math.cos(th), math.sin(th)
    gw, gh = (n_cols - 1) * pitch, (n_rows - 1) * pitch
    # rotated grid's bounding box
    corners = [(-gw / 2, -gh / 2), (gw / 2, -gh / 2), (-gw / 2, gh / 2), (gw / 2, gh / 2)]
    xs = [x * c - y * s for x, y in corners]
    ys = [x * s + y * c for x, y in corners]
    width = int(max(xs) - min(xs) + diameter + 2 * border)
    height = int(max(ys) - min(ys) + diameter + 2 * border)
    ox, oy = width / 2, height / 2
    cols = palette(n_rows * n_cols)
    pos: dict[str, tuple[float, float]] = {}
    disks: list[Disk] = []
    for i in range(n_rows):
        for j in range(n_cols):
            lab = f"{ROWS[i]}-{j + 1}"
            u = j * pitch - gw / 2 + rng.uniform(-jitter, jitter)
            v = i * pitch - gh / 2 + rng.uniform(-jitter, jitter)
            pos[lab] = (ox + u * c - v * s, oy + u * s + v * c)
    if touching is not None:
        a, b = touching
        ax, ay = pos[a]
        bx, by = pos[b]
        d = math.hypot(bx - ax, by - ay)
        want = diameter * 0.92  # move both towards their midpoint
        mx, my = (ax + bx) / 2, (ay + by) / 2
        f = want / d / 2
        pos[a] = (mx - (bx - ax) * f, my - (by - ay) * f)
        pos[b] = (mx + (bx - ax) * f, my + (by - ay) * f)
    for k, (lab, (x, y)) in enumerate(pos.items()):
        if lab in missing:
            continue
        disks.append(Disk(x, y, diameter / 2, cols[k], lab))
    # debris: small specks placed between cores, away from any core
    placed = 0
    tries = 0
    while placed < debris and tries < 10_000:
        tries += 1
        x, y = (
            rng.uniform(border / 2, width - border / 2),
            rng.uniform(border / 2, height - border / 2),
        )
        if all(math.hypot(x - d.cx, y - d.cy) > d.r + 4 * debris_radius for d in disks):
            disks.append(Disk(x, y, debris_radius, (90, 60, 40), ""))
            placed += 1
    return Scene(width, height, disks, noise=noise, seed=seed)


def _pixel_noise(gx: np.ndarray, gy: np.ndarray, seed: int) -> np.ndarray:
    """Zero-mean, unit-variance noise that depends only on the pixel position (and seed)."""
    h = (gx.astype(np.uint64) * np.uint64(73856093)) ^ (gy.astype(np.uint64) * np.uint64(19349663))
    h ^= np.uint64(seed * 83492791 + 12345)
    h = (h * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(2246822519)) & np.uint64(0xFFFFFFFF)
    u = (h & np.uint64(0xFFFF)).astype(np.float32) / 65535.0
    return (u - 0.5) * 3.4641  # uniform with std 1


def render(scene: Scene, x: int, y: int, w: int, h: int, ds: float = 1.0) -> np.ndarray:
    """Render the box (x, y, w, h) in coordinates of a level with downsample ``ds``."""
    out = np.empty((h, w, 3), dtype=np.uint8)
    out[:] = BACKGROUND
    x0, y0, x1, y1 = x * ds, y * ds, (x + w) * ds, (y + h) * ds
    for d in scene.disks:
        bx0, by0, bx1, by1 = d.bbox()
        if bx1 < x0 or bx0 > x1 or by1 < y0 or by0 > y1:
            continue
        # level pixel range covering the shape
        c0 = max(0, int(bx0 / ds) - x)
        c1 = min(w, int(bx1 / ds) - x + 2)
        r0 = max(0, int(by0 / ds) - y)
        r1 = min(h, int(by1 / ds) - y + 2)
        if c1 <= c0 or r1 <= r0:
            continue
        px = (np.arange(c0, c1) + x + 0.5) * ds
        py = (np.arange(r0, r1) + y + 0.5) * ds
        inside = d.inside(px[None, :], py[:, None])
        if not inside.any():
            continue
        gx, gy = np.meshgrid(np.arange(c0, c1) + x, np.arange(r0, r1) + y)
        tex = _pixel_noise(gx[inside], gy[inside], scene.seed + int(ds * 1000))[:, None]
        tex = tex * (scene.noise if d.noise is None else d.noise)  # brightness texture, per pixel
        col = np.clip(np.asarray(d.colour, np.float32)[None, :] + tex, 0, 255).astype(np.uint8)
        sub = out[r0:r1, c0:c1]
        sub[inside] = col
    return out


def render_full(scene: Scene, ds: float = 1.0) -> np.ndarray:
    """Render the whole scene at downsample ``ds``."""
    w, h = math.ceil(scene.width / ds), math.ceil(scene.height / ds)
    return render(scene, 0, 0, w, h, ds)


def _tiles(scene: Scene, w: int, h: int, ds: float, tile: int) -> Iterator[np.ndarray]:
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            t = render(scene, tx, ty, tile, tile, ds)
            # outside the level: background (tifffile wants full tiles)
            if tx + tile > w:
                t[:, w - tx :] = BACKGROUND
            if ty + tile > h:
                t[h - ty :, :] = BACKGROUND
            yield t


def write_pyramidal_tiff(
    scene: Scene,
    path: Path,
    *,
    n_levels: int = 4,
    tile: int = 256,
    compression: str = "jpeg",
) -> list[tuple[int, int]]:
    """Write the scene as a tiled pyramidal BigTIFF (levels as SubIFDs, downsample 2**k)."""
    dims = [(scene.width, scene.height)]
    for k in range(1, n_levels):
        dims.append((max(1, scene.width // 2**k), max(1, scene.height // 2**k)))
    kw: dict = dict(tile=(tile, tile), photometric="rgb", compression=compression)
    if compression == "jpeg":
        kw["compressionargs"] = {"level": 90}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, (w, h) in enumerate(dims):
            ds = scene.width / w
            extra = {"subifds": n_levels - 1} if k == 0 else {"subfiletype": 1}
            tw.write(
                _tiles(scene, w, h, ds, tile),
                shape=(h, w, 3),
                dtype=np.uint8,
                **extra,
                **kw,
            )
    return dims


def write_flat_tiff(scene: Scene, path: Path, *, rows_per_strip: int = 64) -> None:
    """Write the scene as a single-level stripped TIFF (no pyramid)."""
    img = render_full(scene)
    tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=rows_per_strip, compression="zlib")


def write_plain(scene: Scene, path: Path, quality: int = 92) -> None:
    """Write the scene as a plain JPEG or PNG (by suffix)."""
    img = Image.fromarray(render_full(scene))
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=quality)
    else:
        img.save(path)


def glass_cross(
    scene: Scene, label: str, width: float = 0.22, angle_deg: float = 20.0, lumen: float = 0.0
) -> None:
    """Break core ``label`` into four pieces with two crossing glass bands (lumens opening onto
    the glass), each band ``width`` x the diameter wide and running past the rim; ``lumen`` > 0
    also clears a central glass disk of that fraction of the diameter."""
    d = scene.cores[label]
    hw = width * d.r
    for a in (angle_deg, angle_deg + 90.0):
        ca, sa = math.cos(math.radians(a)), math.sin(math.radians(a))
        L = 1.3 * d.r
        scene.disks.append(Band(d.cx - L * ca, d.cy - L * sa, d.cx + L * ca, d.cy + L * sa, hw))
    if lumen > 0:
        scene.disks.append(Disk(d.cx, d.cy, lumen * d.r, BACKGROUND, "", noise=0.0))


def glass_chord(scene: Scene, label: str, offset: float = 0.3, angle_deg: float = 0.0) -> None:
    """Cut off the part of core ``label`` beyond a chord ``offset`` x the radius from its centre,
    in direction ``angle_deg`` (a torn rim); the core's centre stays the punch centre."""
    d = scene.cores[label]
    ca, sa = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    hw = 0.5 * d.r  # band from the chord outwards, longer than the chord
    mx, my = d.cx + (offset * d.r + hw) * ca, d.cy + (offset * d.r + hw) * sa
    L = 1.2 * d.r
    scene.disks.append(Band(mx + L * sa, my - L * ca, mx - L * sa, my + L * ca, hw))


def make_pale(
    scene: Scene, label: str, colour: tuple[int, int, int] = (226, 226, 233), noise: float = 2.0
) -> None:
    """Repaint core ``label`` in a faint colour just below the glass (a pale, score-0 core),
    above the dearrayer's default grey threshold of 220."""
    i = next(k for k, d in enumerate(scene.disks) if isinstance(d, Disk) and d.label == label)
    d = scene.disks[i]
    scene.disks[i] = Disk(d.cx, d.cy, d.r, colour, label, noise=noise)
