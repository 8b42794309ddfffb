"""Thin nodes of the preprocessing pipeline."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from her2_kedro.config import CohortsConfig, PreprocessingParams, TileConfig
from her2_kedro.features import preprocess
from her2_kedro.features.intensity import INTENSITY_PLUS_FEATURES, PAPER_FEATURES
from her2_kedro.hooks import manifest_version
from her2_kedro.schema import TILE_COLUMNS

logger = logging.getLogger(__name__)

Cores = dict[str, Callable[[], bytes]]
PreviewPairs = list[tuple[np.ndarray, np.ndarray]]


def preprocess_cores(
    core_manifest: pd.DataFrame,
    accepted_cores: Cores,
    preprocessing: dict[str, Any],
    tiles: dict[str, Any],
    cohorts: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any], PreviewPairs]:
    """Tile index, the paper's feature, intensity+ features, problems, stain reference, preview tiles.

    Each core is decoded once; stain normalisation (and its reference) only runs where the manifest
    holds a core of a ``cohorts.stain_normalised`` cohort.
    """
    normalised = CohortsConfig.model_validate(cohorts).stain_normalised
    result = preprocess.preprocess_cores(
        core_manifest,
        accepted_cores,
        TileConfig.model_validate(tiles),
        PreprocessingParams.model_validate(preprocessing),
        normalised,
        manifest_version(core_manifest),
    )
    tile_index = (
        pd.concat(result.tiles, ignore_index=True)
        if result.tiles
        else pd.DataFrame(columns=TILE_COLUMNS)
    )
    features = pd.DataFrame(result.features)
    if features.empty:
        features = pd.DataFrame(
            columns=[
                "core_id",
                *INTENSITY_PLUS_FEATURES,
                "n_tiles",
                "tissue_fraction",
                "normalised",
            ]
        )
    paper = features[["core_id", *PAPER_FEATURES]]
    plus = features[
        ["core_id", *INTENSITY_PLUS_FEATURES, "n_tiles", "tissue_fraction", "normalised"]
    ]
    problems = pd.DataFrame(
        [(q.source, q.core_id, q.reason) for q in result.problems],
        columns=["source", "core_id", "reason"],
    )
    for note in result.reference.get("notes", []):
        logger.warning("Reference stain vectors: %s", note)
    logger.info(
        "Preprocessed %d cores (%d normalised): %d tiles kept, %d problems; stain reference: %s.",
        len(features),
        int(features["normalised"].sum()),
        len(tile_index),
        len(problems),
        result.reference.get("status"),
    )
    return tile_index, paper, plus, problems, result.reference, result.previews


def normalisation_preview(preview_pairs: PreviewPairs, cohorts: dict[str, Any]) -> dict[str, Any]:
    """Before/after tiles of normalised cores (matplotlib figures); none when nothing was normalised."""
    if not preview_pairs:
        return {}
    from her2_kedro.reporting.plots import preview_figure  # matplotlib only when there is a figure

    before, after = zip(*preview_pairs, strict=True)
    which = ", ".join(CohortsConfig.model_validate(cohorts).stain_normalised)
    return {
        "stain_normalisation_preview": preview_figure(
            list(before), list(after), f"Macenko normalisation: cohorts {which}"
        )
    }
