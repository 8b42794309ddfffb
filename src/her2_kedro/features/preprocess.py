"""Preprocessing of accepted cores: reference stain estimation, normalisation, tiles and features.

Each core is decoded once; where its cohort is marked for normalisation its stains are mapped onto the
reference (Macenko estimation plus deconvolution/reconvolution, as the paper did for the external
centre), then the tile index and the intensity descriptors are computed in one pass. Tiles are not
written to disk: ``tile_index`` records where they are, and later stages cut them from the core image.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from her2_kedro.features.intensity import IntensityThresholds, core_features
from her2_kedro.imaging.normalisation import (
    StainEstimationError,
    StainVectors,
    check_stain_vectors,
    estimate_stain_vectors,
    normalise,
)
from her2_kedro.imaging.stain import dab_channel, stain_matrix
from her2_kedro.imaging.tiling import TileRule, read_tile, tile_index
from her2_kedro.schema import QCProblem

logger = logging.getLogger(__name__)

Loader = Callable[[], bytes]


def decode_rgb(data: bytes) -> np.ndarray:
    """RGB uint8 pixels of an accepted core (ingestion already verified and converted it)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _loader(cores: Mapping[str, Loader], image: str) -> Loader:
    if image not in cores:
        raise KeyError(
            f"{image} is in the core manifest but not in data/02_intermediate/cores: "
            "re-run `kedro run --pipelines=ingestion`"
        )
    return cores[image]


def _richest_tiles(rgb: np.ndarray, core_id: str, rule: TileRule, n: int) -> list[np.ndarray]:
    """Copies of the ``n`` kept tiles of a core with the most tissue."""
    index = tile_index(rgb, core_id, rule)
    best = index.sort_values("tissue_fraction", ascending=False).head(n)
    return [read_tile(rgb, int(t.x), int(t.y), rule.tile_size).copy() for t in best.itertuples()]


def reference_tiles(
    manifest: pd.DataFrame,
    cores: Mapping[str, Loader],
    rule: TileRule,
    max_cores: int,
    tiles_per_core: int,
    seed: int,
) -> list[np.ndarray]:
    """Tiles sampled from up to ``max_cores`` reference cores, the most tissue-rich of each core."""
    rng = np.random.default_rng(seed)
    chosen = manifest.iloc[rng.permutation(len(manifest))[:max_cores]]
    tiles: list[np.ndarray] = []
    for row in tqdm(chosen.itertuples(index=False), total=len(chosen), desc="reference tiles"):
        rgb = decode_rgb(_loader(cores, row.image)())
        tiles.extend(_richest_tiles(rgb, row.core_id, rule, tiles_per_core))
    return tiles


def estimate_reference(
    tiles: Sequence[np.ndarray], background_grey: float
) -> tuple[StainVectors, list[str]]:
    """Macenko reference stain vectors from pooled tiles, sanity-checked (swaps fixed, oddities noted)."""
    if not tiles:
        raise StainEstimationError(
            "no reference tiles: the reference cohort has no core with a tissue tile"
        )
    vectors = estimate_stain_vectors(tiles, background_grey=background_grey)
    return check_stain_vectors(vectors)


@dataclass
class PreprocessResult:
    """Per-core outputs of preprocessing, gathered over all cores."""

    tiles: list[pd.DataFrame] = field(default_factory=list)
    features: list[dict] = field(default_factory=list)
    problems: list[QCProblem] = field(default_factory=list)


def preprocess_cores(
    manifest: pd.DataFrame,
    cores: Mapping[str, Loader],
    rule: TileRule,
    thresholds: IntensityThresholds,
    reference: StainVectors | None,
    normalise_cohorts: Iterable[str],
    stain_matrix_name: str = "skimage_hed",
) -> PreprocessResult:
    """Tile index and intensity features of every core; normalised first where its cohort asks.

    DAB comes from colour deconvolution with ``stain_matrix_name`` (default: scikit-image's
    ``rgb2hed`` definition, so the paper's numbers carry over; HistomicsTK's matrices as options).
    """
    normalise_cohorts = set(normalise_cohorts)
    matrix = None if stain_matrix_name == "skimage_hed" else stain_matrix(stain_matrix_name)
    result = PreprocessResult()
    for row in tqdm(
        manifest.itertuples(index=False), total=len(manifest), desc="preprocessing cores"
    ):
        rgb = decode_rgb(_loader(cores, row.image)())
        if reference is not None and row.cohort in normalise_cohorts:
            try:
                rgb = normalise(rgb, None, reference, background_grey=rule.background_grey)
            except StainEstimationError as err:
                result.problems.append(
                    QCProblem("preprocessing", row.core_id, f"stain normalisation skipped: {err}")
                )
        dab = dab_channel(rgb, matrix)
        tiles, features = core_features(rgb, row.core_id, rule, thresholds, dab=dab)
        del dab
        if tiles.empty:
            result.problems.append(
                QCProblem("preprocessing", row.core_id, "no tissue tile: features undefined")
            )
        result.tiles.append(tiles)
        result.features.append({**features, "normalised": row.cohort in normalise_cohorts})
    return result


def preview_pairs(
    manifest: pd.DataFrame,
    cores: Mapping[str, Loader],
    rule: TileRule,
    reference: StainVectors,
    n_tiles: int,
    seed: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A few tissue-rich tiles before and after normalisation to the reference, for the preview."""
    rng = np.random.default_rng(seed)
    chosen = manifest.iloc[rng.permutation(len(manifest))[:n_tiles]]
    before, after = [], []
    for row in chosen.itertuples(index=False):
        richest = _richest_tiles(decode_rgb(_loader(cores, row.image)()), row.core_id, rule, 1)
        if not richest:
            continue
        tile = richest[0]
        try:
            normalised = normalise(tile, None, reference, background_grey=rule.background_grey)
        except StainEstimationError:
            continue
        before.append(tile)
        after.append(normalised)
    return before, after
