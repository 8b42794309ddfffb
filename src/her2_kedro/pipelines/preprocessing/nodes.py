"""Thin nodes of the preprocessing pipeline."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from her2_kedro.config import CohortsConfig, StainNormalisationConfig, ThresholdConfig, TileConfig
from her2_kedro.features import preprocess
from her2_kedro.features.intensity import (
    INTENSITY_PLUS_FEATURES,
    PAPER_FEATURES,
    IntensityThresholds,
)
from her2_kedro.imaging.normalisation import StainEstimationError, StainVectors, preview_figure
from her2_kedro.imaging.tiling import TileRule
from her2_kedro.schema import TILE_COLUMNS

logger = logging.getLogger(__name__)

Cores = dict[str, Callable[[], bytes]]


def _rule(tiles: dict[str, Any]) -> TileRule:
    t = TileConfig.model_validate(tiles)
    return TileRule(t.tile_size, t.stride, t.background_grey, t.min_tissue)


def _normalised_cohorts(cohorts: dict[str, Any]) -> list[str]:
    return CohortsConfig.model_validate(cohorts).stain_normalised


def _reference_cores(
    manifest: pd.DataFrame, s: StainNormalisationConfig, normalised: list[str]
) -> pd.DataFrame:
    keep = manifest["split"].isin(s.reference_splits) & ~manifest["cohort"].isin(normalised)
    return manifest[keep]


def estimate_reference_stains(
    core_manifest: pd.DataFrame,
    accepted_cores: Cores,
    stain_normalisation: dict[str, Any],
    tiles: dict[str, Any],
    cohorts: dict[str, Any],
) -> dict[str, Any]:
    """Macenko stain vectors pooled over training tiles: the target every normalised cohort is mapped to.

    Stored as a versioned JSON dataset with the sanity-check notes. ``{"vectors": None}`` when no
    reference can be estimated (then nothing is normalised, and the log and QC say why).
    """
    s = StainNormalisationConfig.model_validate(stain_normalisation)
    rule = _rule(tiles)
    reference = _reference_cores(core_manifest, s, _normalised_cohorts(cohorts))
    tiles = preprocess.reference_tiles(
        reference, accepted_cores, rule, s.max_reference_cores, s.tiles_per_core, s.seed
    )
    try:
        vectors, notes = preprocess.estimate_reference(tiles, rule.background_grey)
    except StainEstimationError as err:
        logger.error("No reference stain vectors: %s. Stain normalisation is skipped.", err)
        return {"vectors": None, "notes": [str(err)], "n_tiles": len(tiles)}
    for note in notes:
        logger.warning("Reference stain vectors: %s", note)
    return {
        "vectors": vectors.to_dict(),
        "notes": notes,
        "n_tiles": len(tiles),
        "n_cores": int(min(len(reference), s.max_reference_cores)),
    }


def _vectors(reference_stains: dict[str, Any]) -> StainVectors | None:
    data = reference_stains.get("vectors")
    return StainVectors.from_dict(data) if data else None


def compute_features(
    core_manifest: pd.DataFrame,
    accepted_cores: Cores,
    reference_stains: dict[str, Any],
    stain_matrix: str,
    intensity_thresholds: dict[str, Any],
    tiles: dict[str, Any],
    cohorts: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Tile index, the paper's intensity feature, intensity+ features, and preprocessing problems."""
    t = ThresholdConfig.model_validate(intensity_thresholds)
    result = preprocess.preprocess_cores(
        core_manifest,
        accepted_cores,
        _rule(tiles),
        IntensityThresholds(t.weak, t.moderate, t.strong),
        _vectors(reference_stains),
        _normalised_cohorts(cohorts),
        stain_matrix,
    )
    tiles = (
        pd.concat(result.tiles, ignore_index=True)
        if result.tiles
        else pd.DataFrame(columns=TILE_COLUMNS)
    )
    features = pd.DataFrame(result.features)
    if features.empty:
        features = pd.DataFrame(columns=["core_id", *INTENSITY_PLUS_FEATURES, "normalised"])
    paper = features[["core_id", *PAPER_FEATURES]]
    plus = features[
        ["core_id", *INTENSITY_PLUS_FEATURES, "n_tiles", "tissue_fraction", "normalised"]
    ]
    problems = pd.DataFrame(
        [(q.source, q.core_id, q.reason) for q in result.problems],
        columns=["source", "core_id", "reason"],
    )
    logger.info(
        "Preprocessed %d cores: %d tiles kept, %d problems.",
        len(features),
        len(tiles),
        len(problems),
    )
    return tiles, paper, plus, problems


def normalisation_preview(
    core_manifest: pd.DataFrame,
    accepted_cores: Cores,
    reference_stains: dict[str, Any],
    stain_normalisation: dict[str, Any],
    tiles: dict[str, Any],
    cohorts: dict[str, Any],
) -> dict[str, Figure]:
    """Before/after tiles of the normalised cohorts (or of any cohort when none is marked)."""
    s = StainNormalisationConfig.model_validate(stain_normalisation)
    normalised = _normalised_cohorts(cohorts)
    vectors = _vectors(reference_stains)
    if vectors is None or s.preview_tiles == 0:
        return {}
    marked = core_manifest[core_manifest["cohort"].isin(normalised)]
    shown = marked if len(marked) else core_manifest
    before, after = preprocess.preview_pairs(
        shown, accepted_cores, _rule(tiles), vectors, s.preview_tiles, s.seed
    )
    if not before:
        return {}
    which = "cohorts " + ", ".join(normalised) if len(marked) else "all cohorts (none marked)"
    return {
        "stain_normalisation_preview": preview_figure(
            before, after, f"Macenko normalisation: {which}"
        )
    }
