"""Macenko stain-vector estimation (HistomicsTK) and the sanity checks of estimated vectors.

Units: everything here uses HistomicsTK's optical density ("SDA") with ``I_0=None``,
``sda = -ln((v + 1) / 256) * 255 / ln(256)`` (0 for white, ~255 for black); stain vectors are
unit vectors in that space (their directions equal Beer-Lambert OD directions up to the +1
offset). Stain matrices follow the project order of columns (haematoxylin, residual, DAB), as in
:mod:`her2_kedro.imaging.stain`, so ``her2_kedro.imaging.stain.dab_channel(rgb, vectors.matrix())`` works too.

Macenko's method cannot tell which of its two vectors is which stain; vectors are assigned by
their angle to the Ruifrok-Johnston references and :func:`check_stain_vectors` documents and
repairs implausible results.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from her2_kedro.imaging._histomicstk import (
    rgb_to_sda,
    separate_stains_macenko_pca,
    stain_color_map,
)
from her2_kedro.imaging.pixels import BACKGROUND_GREY, foreground_mask

__all__ = [
    "REFERENCE_DAB",
    "REFERENCE_HAEMATOXYLIN",
    "StainEstimationError",
    "StainVectors",
    "angle_degrees",
    "check_stain_vectors",
    "estimate_stain_vectors",
]

Vector3 = tuple[float, float, float]
SCHEMA_VERSION = 1
OD_DEFINITION = "histomicstk_sda_I0_none"


def _unit(v: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).reshape(3)
    n = float(np.linalg.norm(a))
    if not math.isfinite(n) or n < 1e-12:
        raise ValueError(f"stain vector must be finite and non-zero, got {tuple(a)}")
    return a / n


def _tuple(v: np.ndarray) -> Vector3:
    return (float(v[0]), float(v[1]), float(v[2]))


#: Ruifrok-Johnston reference OD vectors (HistomicsTK ``stain_color_map``), unit length.
REFERENCE_HAEMATOXYLIN: Vector3 = _tuple(_unit(stain_color_map["hematoxylin"]))
REFERENCE_DAB: Vector3 = _tuple(_unit(stain_color_map["dab"]))


def angle_degrees(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Angle in degrees between two (non-zero) 3-vectors; used to compare stain directions."""
    cos = float(np.clip(np.dot(_unit(a), _unit(b)), -1.0, 1.0))
    return math.degrees(math.acos(cos))


class StainEstimationError(ValueError):
    """Stain vectors cannot be estimated from the given pixels (blank, too few, degenerate)."""


@dataclass(frozen=True)
class StainVectors:
    """Unit OD vectors of haematoxylin and DAB (plus the residual), with optional concentration
    percentiles (HistomicsTK SDA units) used to match intensities when normalising."""

    haematoxylin: Vector3
    dab: Vector3
    residual: Vector3 | None = None
    max_concentrations: tuple[float, float] | None = None  # (H, DAB) at `percentile`
    percentile: float = 99.0
    n_pixels: int = 0
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        h = _unit(self.haematoxylin)
        d = _unit(self.dab)
        cross = np.cross(h, d)
        if float(np.linalg.norm(cross)) < 1e-6:
            raise ValueError("haematoxylin and DAB vectors are parallel: no stain separation")
        r = _unit(cross) if self.residual is None else _unit(self.residual)
        object.__setattr__(self, "haematoxylin", _tuple(h))
        object.__setattr__(self, "dab", _tuple(d))
        object.__setattr__(self, "residual", _tuple(r))
        if self.max_concentrations is not None:
            mc = tuple(float(x) for x in self.max_concentrations)
            if len(mc) != 2 or not all(math.isfinite(x) for x in mc):
                raise ValueError(f"max_concentrations must be two finite numbers, got {mc}")
            object.__setattr__(self, "max_concentrations", mc)
        object.__setattr__(self, "notes", tuple(self.notes))

    @classmethod
    def reference(cls) -> StainVectors:
        """The Ruifrok-Johnston H-DAB vectors (HistomicsTK ``stain_color_map``) as a fallback."""
        return cls(REFERENCE_HAEMATOXYLIN, REFERENCE_DAB)

    def matrix(self) -> np.ndarray:
        """3x3 stain matrix, columns (haematoxylin, residual, DAB), unit OD vectors."""
        return np.stack(
            [np.array(self.haematoxylin), np.array(self.residual), np.array(self.dab)], axis=1
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (versioned) for storing the vectors as a catalog dataset."""
        return {
            "version": SCHEMA_VERSION,
            "od_definition": OD_DEFINITION,
            "haematoxylin": list(self.haematoxylin),
            "dab": list(self.dab),
            "residual": list(self.residual or ()),
            "max_concentrations": (
                None if self.max_concentrations is None else list(self.max_concentrations)
            ),
            "percentile": self.percentile,
            "n_pixels": self.n_pixels,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StainVectors:
        """Inverse of :meth:`to_dict`; rejects unknown schema versions."""
        version = data.get("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"unsupported StainVectors schema version {version!r}")
        mc = data.get("max_concentrations")
        return cls(
            haematoxylin=tuple(data["haematoxylin"]),  # type: ignore[arg-type]
            dab=tuple(data["dab"]),  # type: ignore[arg-type]
            residual=tuple(data["residual"]) if data.get("residual") else None,  # type: ignore[arg-type]
            max_concentrations=None if mc is None else (float(mc[0]), float(mc[1])),
            percentile=float(data.get("percentile", 99.0)),
            n_pixels=int(data.get("n_pixels", 0)),
            notes=tuple(data.get("notes", ())),
        )


# --------------------------------------------------------------------------- estimation


def _as_tile_list(rgb_tiles: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    if isinstance(rgb_tiles, np.ndarray):
        if rgb_tiles.ndim == 3:
            tiles = [rgb_tiles]
        elif rgb_tiles.ndim == 4:
            tiles = list(rgb_tiles)
        else:
            raise ValueError(
                f"expected an RGB image (H, W, 3) or a stack (N, H, W, 3), got shape {rgb_tiles.shape}"
            )
    else:
        tiles = [np.asarray(t) for t in rgb_tiles]
    if not tiles:
        raise StainEstimationError("no tiles given: cannot estimate stain vectors")
    for i, t in enumerate(tiles):
        if t.ndim != 3 or t.shape[2] != 3:
            raise ValueError(f"tile {i}: expected shape (H, W, 3), got shape {t.shape}")
        if t.dtype != np.uint8:
            raise ValueError(f"tile {i}: expected dtype uint8, got dtype {t.dtype}")
    return tiles


def _pool_foreground(
    tiles: list[np.ndarray], background_grey: float, max_pixels: int, seed: int
) -> np.ndarray:
    """Foreground pixels (N, 3) uint8 pooled over tiles, at most ~max_pixels, reproducibly."""
    rng = np.random.default_rng(seed)
    per_tile = max(1, max_pixels // len(tiles))
    pooled = []
    for t in tiles:
        px = t[foreground_mask(t, background_grey)]
        if len(px) > per_tile:
            px = px[np.sort(rng.integers(0, len(px), size=per_tile))]
        pooled.append(px)
    return np.concatenate(pooled, axis=0) if pooled else np.empty((0, 3), np.uint8)


def sda_of_pixels(pixels: np.ndarray) -> np.ndarray:
    """HistomicsTK SDA (3, N) float64 of (N, 3) uint8 pixels."""
    return rgb_to_sda(pixels.T.astype(np.float64), None)


def _order_by_reference(v0: np.ndarray, v1: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(haematoxylin, dab, swapped): assignment that minimises angles to the references."""
    keep = angle_degrees(v0, REFERENCE_HAEMATOXYLIN) + angle_degrees(v1, REFERENCE_DAB)
    swap = angle_degrees(v1, REFERENCE_HAEMATOXYLIN) + angle_degrees(v0, REFERENCE_DAB)
    return (v1, v0, True) if swap < keep else (v0, v1, False)


def concentration_percentiles(
    sda: np.ndarray, w: np.ndarray, percentile: float
) -> tuple[float, float]:
    """(H, DAB) concentration percentiles of SDA pixels (3, N) under stain matrix w (H, R, D)."""
    conc = np.linalg.pinv(w) @ sda
    return (float(np.percentile(conc[0], percentile)), float(np.percentile(conc[2], percentile)))


def estimate_stain_vectors(
    rgb_tiles: Sequence[np.ndarray] | np.ndarray,
    background_grey: float = BACKGROUND_GREY,
    min_foreground_pixels: int = 500,
    *,
    max_pixels: int = 1_000_000,
    minimum_magnitude: float = 16.0,
    min_angle_percentile: float = 0.01,
    max_angle_percentile: float = 0.99,
    percentile: float = 99.0,
    min_separation_degrees: float = 2.0,
    seed: int = 0,
) -> StainVectors:
    """Macenko H and DAB vectors from foreground pixels pooled over many uint8 RGB tiles.

    Uses HistomicsTK ``separate_stains_macenko_pca`` (its defaults: magnitude threshold 16 SDA,
    angle percentiles 1 %/99 %); raises :class:`StainEstimationError` on degenerate input.
    """
    tiles = _as_tile_list(rgb_tiles)
    pixels = _pool_foreground(tiles, background_grey, max_pixels, seed)
    if len(pixels) < min_foreground_pixels:
        raise StainEstimationError(
            f"only {len(pixels)} foreground pixels (grey <= {background_grey}) in {len(tiles)} "
            f"tile(s); need at least {min_foreground_pixels}: blank or background-only input?"
        )
    sda = sda_of_pixels(pixels)
    stained = sda[:, np.sqrt((sda**2).sum(axis=0)) > minimum_magnitude]
    if stained.shape[1] < min_foreground_pixels:
        raise StainEstimationError(
            f"only {stained.shape[1]} pixels have optical density above {minimum_magnitude} "
            f"(SDA units); need at least {min_foreground_pixels}: too faint to estimate stains"
        )
    singular = np.linalg.svd(stained, compute_uv=False)
    if singular[1] < 1e-3 * singular[0]:
        raise StainEstimationError(
            "foreground pixels all have (nearly) the same colour: one colour direction only, "
            "so two stain vectors cannot be separated"
        )
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            w = separate_stains_macenko_pca(
                stained,
                minimum_magnitude=minimum_magnitude,
                min_angle_percentile=min_angle_percentile,
                max_angle_percentile=max_angle_percentile,
            )
        except (ValueError, IndexError, np.linalg.LinAlgError) as exc:
            raise StainEstimationError(f"Macenko estimation failed: {exc}") from exc
    v0, v1 = np.asarray(w[:, 0], float), np.asarray(w[:, 1], float)
    if not (np.all(np.isfinite(v0)) and np.all(np.isfinite(v1))):
        raise StainEstimationError("Macenko returned non-finite stain vectors (degenerate pixels)")
    # PCA signs are arbitrary; optical densities of real stains are non-negative overall
    v0 = v0 if v0.sum() >= 0 else -v0
    v1 = v1 if v1.sum() >= 0 else -v1
    if angle_degrees(v0, v1) < min_separation_degrees:
        raise StainEstimationError(
            f"the two Macenko vectors are only {angle_degrees(v0, v1):.2f} degrees apart: "
            "the pixels show a single stain colour"
        )
    h, d, _ = _order_by_reference(v0, v1)
    vectors = StainVectors(_tuple(_unit(h)), _tuple(_unit(d)), n_pixels=int(len(pixels)))
    mc = concentration_percentiles(sda, vectors.matrix(), percentile)
    return StainVectors(
        vectors.haematoxylin,
        vectors.dab,
        max_concentrations=mc,
        percentile=percentile,
        n_pixels=int(len(pixels)),
    )


def check_stain_vectors(
    vectors: StainVectors, max_angle_degrees: float = 35.0, fallback: bool = True
) -> tuple[StainVectors, list[str]]:
    """Sanity-check estimated vectors; return (fixed vectors, human-readable notes).

    Swaps H and DAB if Macenko's order is reversed; reports a vector that is not bluish (H) or
    brown (DAB) or lies more than ``max_angle_degrees`` from its Ruifrok reference, and with
    ``fallback`` replaces such a vector by the reference.
    """
    notes: list[str] = []
    h = np.array(vectors.haematoxylin)
    d = np.array(vectors.dab)
    mc = vectors.max_concentrations
    h, d, swapped = _order_by_reference(h, d)
    if swapped:
        notes.append(
            "haematoxylin and DAB vectors were in the wrong order (Macenko does not know which "
            "stain is which); swapped them"
        )
        mc = None if mc is None else (mc[1], mc[0])
    replaced = False
    for name, vec, ref, colour_ok, colour in (
        ("haematoxylin", h, REFERENCE_HAEMATOXYLIN, lambda v: v[2] < max(v[0], v[1]), "bluish"),
        ("DAB", d, REFERENCE_DAB, lambda v: int(np.argmax(v)) == 2, "brown"),
    ):
        problems = []
        if not colour_ok(vec):
            problems.append(
                f"{name} vector {tuple(round(float(x), 3) for x in vec)} is not {colour} "
                "(OD pattern R, G, B unexpected)"
            )
        ang = angle_degrees(vec, ref)
        if ang > max_angle_degrees:
            problems.append(
                f"{name} vector is {ang:.1f} degrees from the Ruifrok reference "
                f"(limit {max_angle_degrees:.0f})"
            )
        notes.extend(problems)
        if problems and fallback:
            notes.append(f"{name}: fell back to the Ruifrok reference vector {ref}")
            replaced = True
            if name == "haematoxylin":
                h = np.array(ref)
            else:
                d = np.array(ref)
    sep = angle_degrees(h, d)
    if sep < 10.0:
        notes.append(f"haematoxylin and DAB are only {sep:.1f} degrees apart: separation is poor")
    if replaced:
        mc = None  # percentiles were measured with the replaced vectors
    fixed = StainVectors(
        _tuple(_unit(h)),
        _tuple(_unit(d)),
        max_concentrations=mc,
        percentile=vectors.percentile,
        n_pixels=vectors.n_pixels,
        notes=tuple(vectors.notes) + tuple(notes),
    )
    return fixed, notes
