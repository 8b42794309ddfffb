"""Staining-intensity descriptors of a core: the paper's max-mean-DAB and a conventional set.

DAB units. Every DAB value here is in the units of ``skimage.color.rgb2hed``'s third channel.
skimage computes ``(ln(max(I/255, 1e-6)) / ln(1e-6)) @ hed_from_rgb``; since ln(1e-6) = -6 ln(10),
that is the decimal optical density (OD, the unit of QuPath / ImageJ colour deconvolution) of the
DAB stain divided by exactly 6. A pure-DAB pixel of OD 0.4 therefore reads 0.0667 (checked in
tests/test_features.py by synthesising pure-DAB pixels from ``rgb_from_hed``).

Feature sets:
- ``PAPER_FEATURES``: the paper's single descriptor (Methods, "staining intensity"): mean DAB per
  224 px tile, maximum over the core's tiles, fed alone to a balanced logistic regression.
- ``INTENSITY_PLUS_FEATURES``: what a conventional IHC image-analysis tool reports for a core
  (DAB percentiles and mean over tissue pixels, positive-area fractions at weak / moderate /
  strong thresholds) plus the paper's descriptor; an honest, stronger intensity-only baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from her2_kedro.imaging.tiling import (
    PAPER_RULE,
    TileRule,
    all_tiles,
    foreground_mask_fast,
    tile_index_from_fractions,
)

#: Decimal optical density -> rgb2hed DAB channel units (ln(1e-6) = -6 ln 10).
OD_TO_SKIMAGE_DAB = 1.0 / 6.0

PERCENTILES = (50, 75, 90, 99)

PAPER_FEATURES: list[str] = ["max_mean_dab"]
INTENSITY_PLUS_FEATURES: list[str] = [
    "max_mean_dab",
    "dab_mean",
    "dab_p50",
    "dab_p75",
    "dab_p90",
    "dab_p99",
    "pos_frac_weak",
    "pos_frac_moderate",
    "pos_frac_strong",
]
#: Descriptive keys of the feature dict that are not model inputs.
META_KEYS: list[str] = ["core_id", "n_tiles", "tissue_fraction"]


@dataclass(frozen=True)
class IntensityThresholds:
    """Positive-area DAB thresholds in rgb2hed units: QuPath-like OD 0.2 / 0.4 / 0.6, divided by 6."""

    weak: float = 0.2 * OD_TO_SKIMAGE_DAB  # 0.0333
    moderate: float = 0.4 * OD_TO_SKIMAGE_DAB  # 0.0667
    strong: float = 0.6 * OD_TO_SKIMAGE_DAB  # 0.1000

    def __post_init__(self) -> None:
        if not self.weak <= self.moderate <= self.strong:
            raise ValueError(f"thresholds must be non-decreasing, got {self}")

    @classmethod
    def from_od(cls, weak: float, moderate: float, strong: float) -> IntensityThresholds:
        """Thresholds given in decimal optical density (QuPath / ImageJ units)."""
        return cls(
            weak * OD_TO_SKIMAGE_DAB, moderate * OD_TO_SKIMAGE_DAB, strong * OD_TO_SKIMAGE_DAB
        )


def _tile_xy(tiles: pd.DataFrame | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(tiles, pd.DataFrame):
        return tiles["x"].to_numpy(dtype=np.int64), tiles["y"].to_numpy(dtype=np.int64)
    arr = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def tile_mean_dab(
    dab: np.ndarray, tiles: pd.DataFrame | np.ndarray, tile_size: int = 224
) -> np.ndarray:
    """Mean DAB (float64) of each tile listed by (x, y) top-left corners; the paper's instance feature."""
    if dab.ndim != 2:
        raise ValueError(f"expected a 2-D DAB map, got shape {dab.shape}")
    xs, ys = _tile_xy(tiles)
    height, width = dab.shape
    if len(xs) and (
        xs.min() < 0
        or ys.min() < 0
        or xs.max() + tile_size > width
        or ys.max() + tile_size > height
    ):
        raise ValueError(f"a tile of size {tile_size} leaves the DAB map of shape {dab.shape}")
    out = np.empty(len(xs), dtype=np.float64)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        out[i] = dab[y : y + tile_size, x : x + tile_size].mean(dtype=np.float64)
    return out


def max_mean_dab(
    dab: np.ndarray, tiles: pd.DataFrame | np.ndarray | None = None, tile_size: int = 224
) -> float:
    """The paper's descriptor: maximum over tiles of the per-tile mean DAB; NaN when no tile.

    ``tiles`` lists the tiles to use (normally the kept tiles of ``tile_index``). ``None`` uses every
    full tile of the grid from (0, 0) without the tissue filter, which is what the authors'
    ``staining_intensity_classifier.py`` does; as background tiles have near-zero DAB the two
    agree on any core whose most stained tile holds tissue.
    """
    if tiles is None:
        height, width = dab.shape
        ny, nx = height // tile_size, width // tile_size
        if nx == 0 or ny == 0:
            return float("nan")
        grid = dab[: ny * tile_size, : nx * tile_size].reshape(ny, tile_size, nx, tile_size)
        return float(grid.mean(axis=(1, 3), dtype=np.float64).max())
    means = tile_mean_dab(dab, tiles, tile_size)
    return float(means.max()) if means.size else float("nan")


def intensity_plus(
    dab: np.ndarray,
    foreground_mask: np.ndarray,
    tiles: pd.DataFrame | np.ndarray,
    thresholds: IntensityThresholds = IntensityThresholds(),
    tile_size: int = 224,
) -> dict[str, float]:
    """Conventional intensity descriptors over the core's tissue pixels, plus max-mean-DAB.

    Percentiles, mean and positive-area fractions (share of tissue pixels with DAB strictly above
    each threshold) use every tissue pixel of the core, as an IHC analysis tool would; the
    max-mean-DAB uses ``tiles``. All values are NaN when the core has no tissue pixel.
    """
    if dab.shape != foreground_mask.shape:
        raise ValueError(f"DAB map {dab.shape} and mask {foreground_mask.shape} differ in shape")
    values = dab[foreground_mask]
    out: dict[str, float] = {"max_mean_dab": max_mean_dab(dab, tiles, tile_size)}
    if values.size == 0:
        nan = float("nan")
        out.update({"dab_mean": nan, **{f"dab_p{q}": nan for q in PERCENTILES}})
        out.update({"pos_frac_weak": nan, "pos_frac_moderate": nan, "pos_frac_strong": nan})
        return out
    out["dab_mean"] = float(values.mean(dtype=np.float64))
    for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True):
        out[f"dab_p{q}"] = float(v)
    n = float(values.size)
    out["pos_frac_weak"] = float(np.count_nonzero(values > thresholds.weak)) / n
    out["pos_frac_moderate"] = float(np.count_nonzero(values > thresholds.moderate)) / n
    out["pos_frac_strong"] = float(np.count_nonzero(values > thresholds.strong)) / n
    return out


def _dab_of(rgb: np.ndarray) -> np.ndarray:
    """DAB channel via her2_kedro.imaging.stain (imported lazily); skimage's rgb2hed if it is absent."""
    try:
        from her2_kedro.imaging.stain import dab_channel
    except ImportError:  # stain.py not written yet: same definition, straight from skimage
        from skimage.color import rgb2hed

        return rgb2hed(rgb)[..., 2].astype(np.float32)
    return dab_channel(rgb)


def core_features(
    rgb: np.ndarray,
    core_id: str,
    rule: TileRule = PAPER_RULE,
    thresholds: IntensityThresholds = IntensityThresholds(),
    dab: np.ndarray | None = None,
) -> tuple[pd.DataFrame, dict[str, float | int | str]]:
    """One pass over a core: its kept-tile index and its intensity features (see module doc).

    The image is deconvolved once (or ``dab`` is reused) and the tissue mask computed once. The
    dict holds ``core_id``, ``n_tiles`` (kept tiles), ``tissue_fraction`` (whole image) and every
    key of ``INTENSITY_PLUS_FEATURES``; ``max_mean_dab`` is NaN when no tile is kept.
    """
    mask = foreground_mask_fast(rgb, rule.background_grey)
    origins, fractions = all_tiles(rgb, rule, mask=mask)
    tiles = tile_index_from_fractions(core_id, origins, fractions, rule)
    if dab is None:
        dab = _dab_of(rgb)
    elif dab.shape != rgb.shape[:2]:
        raise ValueError(f"DAB map {dab.shape} does not match the image {rgb.shape[:2]}")
    features: dict[str, float | int | str] = {
        "core_id": core_id,
        "n_tiles": int(len(tiles)),
        "tissue_fraction": float(mask.mean()) if mask.size else 0.0,
    }
    features.update(intensity_plus(dab, mask, tiles, thresholds, rule.tile_size))
    return tiles, features
