"""Deconvolution-based stain normalisation onto reference Macenko vectors (HistomicsTK units).

Stain vectors, their estimation and checks live in :mod:`her2_kedro.imaging.stain_vectors`. Units: HistomicsTK's optical density ("SDA") with ``I_0=None``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from her2_kedro.imaging._histomicstk import color_convolution, color_deconvolution
from her2_kedro.imaging.pixels import BACKGROUND_GREY, foreground_mask
from her2_kedro.imaging.stain import lookup_channel_tables
from her2_kedro.imaging.stain_vectors import (
    StainEstimationError,
    StainVectors,
    check_stain_vectors,
    concentration_percentiles,
    estimate_stain_vectors,
    sda_of_pixels,
)

__all__ = ["cohort_dab_scale", "cohort_normaliser", "normalisation_matrix", "normalise"]

logger = logging.getLogger(__name__)


def _sda_lut() -> np.ndarray:
    """HistomicsTK SDA (``rgb_to_sda`` with ``I_0=None``) of each uint8 value, float64."""
    v = np.arange(256, dtype=np.float64)
    return -np.log((v + 1.0) / 256.0) * 255.0 / np.log(256.0)


def normalisation_matrix(
    source: StainVectors, target: StainVectors, scale: Sequence[float] = (1.0, 1.0, 1.0)
) -> np.ndarray:
    """3x3 map of SDA column vectors: deconvolve with source, scale stains, reconvolve with target.

    Equals HistomicsTK ``color_deconvolution`` (pseudo-inverse of the unit-column source matrix)
    followed by ``color_convolution`` with the target matrix, both with ``I_0=None``.
    """
    return (
        target.matrix()
        @ np.diag(np.asarray(scale, dtype=np.float64))
        @ np.linalg.pinv(source.matrix())
    )


def _stain_scale(
    px: np.ndarray,
    w_src: np.ndarray,
    target: StainVectors,
    match_haematoxylin: bool,
    match_dab: bool,
    max_pixels: int,
    seed: int,
) -> np.ndarray:
    """Per-stain factors that bring the image's concentration percentile to the target's."""
    scale = np.ones(3)
    if target.max_concentrations is None or not (match_haematoxylin or match_dab):
        return scale
    if len(px) > max_pixels:
        px = px[np.random.default_rng(seed).integers(0, len(px), size=max_pixels)]
    src_h, src_d = concentration_percentiles(sda_of_pixels(px), w_src, target.percentile)
    tgt_h, tgt_d = target.max_concentrations
    if match_haematoxylin and src_h > 1e-6:
        scale[0] = tgt_h / src_h
    if match_dab and src_d > 1e-6:
        scale[2] = tgt_d / src_d
    return scale


def normalise(
    rgb: np.ndarray,
    source: StainVectors | None,
    target: StainVectors,
    background_grey: float = BACKGROUND_GREY,
    *,
    match_haematoxylin: bool = True,
    match_dab: bool = False,
    dab_scale: float = 1.0,
    method: str = "fast",
    chunk_rows: int = 512,
    max_percentile_pixels: int = 500_000,
    seed: int = 0,
) -> np.ndarray:
    """Deconvolution-based normalisation of a uint8 RGB image to the target stain vectors.

    Deconvolves with ``source`` (estimated from the image itself when None) and reconvolves with
    ``target``; background pixels (grey > ``background_grey``) are returned unchanged. When
    ``target.max_concentrations`` is known, the haematoxylin (and, only if ``match_dab``) DAB
    concentration percentile is scaled to the target's. DAB matching is off by default: DAB
    intensity *is* the HER2 signal, and per-image scaling would make a faint 1+ core look 3+.
    ``dab_scale`` multiplies the DAB concentration by a fixed factor (a whole cohort's
    calibration, see :func:`cohort_dab_scale`).
    ``method="histomicstk"`` runs HistomicsTK's ``color_deconvolution``/``color_convolution``
    (float64, truncates to uint8); ``"fast"`` (default) evaluates the same linear map in SDA space
    with look-up tables in float32 and rounds -- results agree to within one grey level.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB image of dtype uint8, got dtype {rgb.dtype}")
    if method not in ("fast", "histomicstk"):
        raise ValueError(f"method must be 'fast' or 'histomicstk', got {method!r}")
    mask = foreground_mask(rgb, background_grey)
    out = rgb.copy()
    if not mask.any():
        return out
    if source is None:
        source, _ = check_stain_vectors(estimate_stain_vectors(rgb, background_grey))
    w_src = source.matrix()
    w_tgt = target.matrix()

    scale = _stain_scale(
        rgb[mask], w_src, target, match_haematoxylin, match_dab, max_percentile_pixels, seed
    )
    scale[2] *= float(dab_scale)

    if method == "fast":
        m = normalisation_matrix(source, target, scale)
        # rgb_j = 256 exp(-k sum_c m[j, c] sda(v_c)) - 1 = 256 prod_c exp(-k m[j, c] sda(v_c)) - 1,
        # so the back-conversion is a product of per-channel tables: no exp per pixel
        k = np.log(256.0) / 255.0
        tables = np.exp(-k * _sda_lut()[None, :, None] * m.T[:, None, :])
        tables[0] *= 256.0

    h = rgb.shape[0]
    step = max(1, chunk_rows)
    for y in range(0, h, step):
        chunk = rgb[y : y + step]
        fg = mask[y : y + step]
        if not fg.any():
            continue
        if method == "fast":
            val = lookup_channel_tables(chunk, tables, combine="product", chunk_rows=step)
            val -= np.float32(0.5)  # -1 from the SDA definition, +0.5 so truncation rounds
            np.clip(val, 0, 255, out=val)
            converted = val.astype(np.uint8)
        else:
            stains = color_deconvolution(chunk, w_src, I_0=None).StainsFloat
            for j in range(3):
                if scale[j] != 1.0:
                    # StainsFloat = 256 ** (1 - c / 255) - 1, so scaling c by s is a power law
                    base = np.clip((stains[..., j] + 1.0) / 256.0, 1e-12, None)
                    stains[..., j] = 256.0 * base ** scale[j] - 1.0
            converted = color_convolution(stains, w_tgt, I_0=None)
        np.copyto(out[y : y + step], converted, where=fg[..., None])
    return out


def cohort_dab_scale(source: StainVectors | None, target: StainVectors | None) -> float:
    """One DAB factor for a whole cohort: the target's pooled DAB percentile over the source's.

    1.0 where either lacks pooled concentrations (or the source has no DAB to speak of).
    """
    if source is None or target is None:
        return 1.0
    if source.max_concentrations is None or target.max_concentrations is None:
        return 1.0
    source_dab, target_dab = source.max_concentrations[1], target.max_concentrations[1]
    return float(target_dab / source_dab) if source_dab > 1e-6 else 1.0


def cohort_normaliser(
    reference: Mapping[str, Any] | None,
    cohorts: Iterable[str],
    background_grey: float = BACKGROUND_GREY,
) -> Callable[[Mapping[str, Any], np.ndarray], np.ndarray] | None:
    """``transform(row, rgb)`` that normalises cores of ``cohorts`` as preprocessing did, else None.

    ``reference`` is preprocessing's ``reference_stains`` record: the training reference
    (``vectors``) and each normalised cohort's pooled source vectors (``sources``; a cohort
    without them is deconvolved with each core's own estimate) and DAB factor (``dab_scale``,
    1 when absent). Rows of other cohorts, and every row when there is no reference, pass through
    unchanged, so models see the pixels the intensity features were measured on.
    """
    cohorts = set(cohorts)
    if not cohorts or not reference or not reference.get("vectors"):
        return None
    target = StainVectors.from_dict(reference["vectors"])
    entries = (reference.get("sources") or {}).items()
    sources = {
        cohort: StainVectors.from_dict(entry["vectors"])
        for cohort, entry in entries
        if entry.get("vectors")
    }
    dab_scales = {cohort: float(entry.get("dab_scale", 1.0)) for cohort, entry in entries}

    def transform(row: Mapping[str, Any], rgb: np.ndarray) -> np.ndarray:
        cohort = row.get("cohort")
        if cohort not in cohorts:
            return rgb
        try:
            scale = dab_scales.get(cohort, 1.0)
            return normalise(rgb, sources.get(cohort), target, background_grey, dab_scale=scale)
        except StainEstimationError as err:  # preprocessing reported the same core unnormalised
            logger.warning("Core %s left unnormalised: %s", row.get("core_id"), err)
            return rgb

    return transform
