"""Preprocessing of accepted cores: stain normalisation where asked, tile index and intensity features.

Every core is decoded once and measured in the same pass (tile index, DAB, intensity features),
on ``workers`` threads (decoding, hashing and the numpy work release the GIL) or, when the node
runs on a Dask cluster (``her2_kedro.runners.DaskRunner``), as one task per core on the cluster's
workers (:func:`her2_kedro.parallel.map_cores`: the same results, in the same order). Its pixels
are hashed on the way and compared with the manifest's ``content_hash``, so a manifest loaded
from an old version never silently meets core files that changed since.

Stain normalisation runs only where some cohort of the manifest is marked for it: the reference
(Macenko vectors pooled over the most tissue-rich tiles of training cores of the other cohorts) is
collected while those cores are measured anyway, and each marked cohort's own stain vectors are
pooled over its cores in the same way (steadier than one core's, whose DAB may be too faint to
estimate). Then the marked cores are normalised and measured. Tiles are not written to disk:
``tile_index`` records where they are, and later stages cut them from the core image.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from her2_kedro.config.preprocessing import PreprocessingParams, StainNormalisationConfig
from her2_kedro.config.shared import TileConfig
from her2_kedro.features.intensity import core_features
from her2_kedro.imaging.normalisation import cohort_dab_scale, normalise
from her2_kedro.imaging.pixels import content_hash
from her2_kedro.imaging.stain import dab_channel, stain_matrix
from her2_kedro.imaging.stain_vectors import (
    StainEstimationError,
    StainVectors,
    check_stain_vectors,
    estimate_stain_vectors,
)
from her2_kedro.imaging.tiling import read_tile, tile_index
from her2_kedro.parallel import map_cores
from her2_kedro.schema import QCProblem

logger = logging.getLogger(__name__)

Loader = Callable[[], bytes]


class CoreContentError(ValueError):
    """Core files no longer hold the pixels the manifest recorded (``content_hash``)."""


def decode_rgb(data: bytes) -> np.ndarray:
    """RGB uint8 pixels of an accepted core (ingestion already verified and converted it)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def check_images(manifest: pd.DataFrame, cores: Mapping[str, Loader]) -> None:
    """Every manifest image must be in the accepted-cores folder; name the missing ones."""
    missing = sorted(set(manifest["image"]) - set(cores))
    if missing:
        raise KeyError(
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} in the core manifest "
            "but not in data/02_intermediate/cores: re-run `kedro run --pipelines=ingestion`"
        )


def richest_tiles(rgb: np.ndarray, rule: TileConfig, n: int) -> list[np.ndarray]:
    """Copies of the ``n`` kept tiles of a core with the most tissue."""
    index = tile_index(rgb, "", rule)
    best = index.sort_values("tissue_fraction", ascending=False, kind="stable").head(n)
    return [read_tile(rgb, int(t.x), int(t.y), rule.tile_size).copy() for t in best.itertuples()]


def sample_rows(
    manifest: pd.DataFrame, s: StainNormalisationConfig, splits: Iterable[str] | None
) -> pd.DataFrame:
    """Up to ``max_reference_cores`` rows (of ``splits``, or any split when None), seeded."""
    rows = manifest if splits is None else manifest[manifest["split"].isin(list(splits))]
    rng = np.random.default_rng(s.seed)
    return rows.iloc[rng.permutation(len(rows))[: s.max_reference_cores]]


def reference_rows(
    manifest: pd.DataFrame, s: StainNormalisationConfig, normalised: Iterable[str]
) -> pd.DataFrame:
    """Cores the reference stains come from: ``reference_splits`` of cohorts not normalised."""
    return sample_rows(manifest[~manifest["cohort"].isin(list(normalised))], s, s.reference_splits)


def estimate_reference(
    tiles: Sequence[np.ndarray], background_grey: float
) -> tuple[StainVectors, list[str]]:
    """Macenko stain vectors from pooled tiles, sanity-checked (swaps fixed, oddities noted)."""
    if not tiles:
        raise StainEstimationError("no reference tiles: no chosen core has a tissue tile")
    vectors = estimate_stain_vectors(tiles, background_grey=background_grey)
    return check_stain_vectors(vectors)


@dataclass
class CoreOutcome:
    """What one pass over one core gives."""

    core_id: str
    tiles: pd.DataFrame | None = None
    features: dict[str, Any] | None = None
    problems: list[QCProblem] = field(default_factory=list)
    sample: list[np.ndarray] = field(default_factory=list)  # tiles for stain estimation
    preview: tuple[np.ndarray, np.ndarray] | None = None
    changed: bool = False  # pixels differ from the manifest's content_hash


@dataclass
class PreprocessResult:
    """Per-core outputs of preprocessing in manifest order, plus the stain reference's record."""

    tiles: list[pd.DataFrame] = field(default_factory=list)
    features: list[dict] = field(default_factory=list)
    problems: list[QCProblem] = field(default_factory=list)
    reference: dict[str, Any] = field(default_factory=dict)
    previews: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


@dataclass(frozen=True)
class _Job:
    """How to treat one core: measure it, keep tiles for stain estimation, normalise it, preview."""

    measure: bool = True
    sample_tiles: int = 0
    source: StainVectors | None = None
    target: StainVectors | None = None
    dab_scale: float = 1.0
    preview: bool = False


class _Runner:
    """Decodes, checks and measures cores on a thread pool (``workers`` = 1: in this thread), or
    one task per core on the Dask cluster the node runs on (see :func:`map_cores`)."""

    def __init__(self, cores, rule: TileConfig, params: PreprocessingParams, workers: int):
        self.cores, self.rule, self.params, self.workers = cores, rule, params, workers
        name = params.stain_matrix
        self.matrix = None if name == "skimage_hed" else stain_matrix(name)

    def run(self, rows: pd.DataFrame, jobs: Sequence[_Job], desc: str) -> list[CoreOutcome]:
        # each item carries its core's loader (a catalog dataset's load: picklable, read where
        # the item runs) rather than the whole mapping of cores
        items = [
            (row, job, self.cores[row["image"]])
            for row, job in zip(rows.to_dict("records"), jobs, strict=True)
        ]
        measure = partial(measure_core, rule=self.rule, params=self.params, matrix=self.matrix)
        return map_cores(measure, items, desc=desc, threads=self.workers)


def measure_core(
    item: tuple[dict, _Job, Loader],
    *,
    rule: TileConfig,
    params: PreprocessingParams,
    matrix: np.ndarray | None,
) -> CoreOutcome:
    """One pass over one core: decode, sample tiles, check its hash, normalise, measure.

    ``item`` is the manifest row, what to do with the core, and the loader of its bytes;
    ``matrix`` is the stain matrix of ``params.stain_matrix`` (None: scikit-image's rgb2hed).
    A module-level function of plain data, so that it runs on any worker of a cluster.
    """
    row, job, load = item
    out = CoreOutcome(row["core_id"])
    rgb = decode_rgb(load())
    if job.sample_tiles:
        out.sample = richest_tiles(rgb, rule, job.sample_tiles)
    if not job.measure:
        return out
    expected = row.get("content_hash")
    out.changed = bool(expected) and content_hash(rgb) != expected
    normalised = False
    if job.target is not None:
        try:
            after = normalise(
                rgb,
                job.source,
                job.target,
                rule.background_grey,
                dab_scale=job.dab_scale,
            )
        except StainEstimationError as err:
            out.problems.append(_problem(row, f"stain normalisation skipped: {err}"))
        else:
            if job.preview:
                out.preview = _preview_pair(rgb, after, rule)
            rgb, normalised = after, True
    dab = dab_channel(rgb, matrix)
    thresholds = params.intensity_thresholds
    out.tiles, features = core_features(rgb, out.core_id, rule, thresholds, dab=dab)
    if out.tiles.empty:
        out.problems.append(_problem(row, "no tissue tile: features undefined"))
    out.features = {**features, "normalised": normalised}
    return out


def _problem(row: dict, reason: str) -> QCProblem:
    return QCProblem("preprocessing", row["core_id"], reason)


def _preview_pair(before: np.ndarray, after: np.ndarray, rule: TileConfig):
    """The most tissue-rich tile of a core, before and after normalisation."""
    index = tile_index(before, "", rule)
    if index.empty:
        return None
    best = index.sort_values("tissue_fraction", ascending=False, kind="stable").iloc[0]
    x, y, size = int(best.x), int(best.y), rule.tile_size
    return read_tile(before, x, y, size).copy(), read_tile(after, x, y, size).copy()


def _pooled(outcomes: Iterable[CoreOutcome], grey: float, what: str, record: dict) -> StainVectors:
    """Stain vectors from the sampled tiles of ``outcomes``; ``record`` gets cores, tiles, notes."""
    chosen = [o for o in outcomes if o.sample]
    tiles = [t for o in chosen for t in o.sample]
    record.update(cores=[o.core_id for o in chosen], n_tiles=len(tiles))
    try:
        vectors, notes = estimate_reference(tiles, grey)
    except StainEstimationError as err:
        record.update(vectors=None, notes=[f"{what}: {err}"])
        raise
    record.update(vectors=vectors.to_dict(), notes=notes)
    return vectors


def preprocess_cores(
    manifest: pd.DataFrame,
    cores: Mapping[str, Loader],
    rule: TileConfig,
    params: PreprocessingParams,
    normalise_cohorts: Iterable[str],
    manifest_version: str = "",
) -> PreprocessResult:
    """Tile index and intensity features of every core; cohorts in ``normalise_cohorts`` normalised.

    DAB comes from colour deconvolution with ``params.stain_matrix`` (default scikit-image's
    ``rgb2hed``, so the paper's numbers carry over). Raises :class:`CoreContentError` naming the
    cores whose pixels differ from the manifest's ``content_hash`` (and ``manifest_version``).
    """
    check_images(manifest, cores)
    s = params.stain_normalisation
    runner = _Runner(cores, rule, params, params.workers)
    marked = manifest["cohort"].isin(list(normalise_cohorts)).to_numpy()
    plain, normed = manifest[~marked], manifest[marked]
    result = PreprocessResult(reference={"status": "not needed", "vectors": None, "notes": []})
    sampled = set(reference_rows(manifest, s, normalise_cohorts)["core_id"]) if len(normed) else ()
    jobs = [_Job(sample_tiles=s.tiles_per_core * (c in sampled)) for c in plain["core_id"]]
    outcomes = dict(zip(plain["core_id"], runner.run(plain, jobs, "measuring cores"), strict=True))
    _stop_if_changed(outcomes.values(), manifest_version)
    if len(normed):
        ref = result.reference
        try:
            reference = _pooled(outcomes.values(), rule.background_grey, "reference", ref)
            ref["status"] = "estimated"
        except StainEstimationError as err:
            logger.error("No reference stain vectors (%s): nothing is normalised.", err)
            reference, ref["status"] = None, "failed"
        ref["sources"] = {}
        sources = _cohort_sources(normed, runner, reference, rule, s, ref["sources"])
        previews = set(normed["core_id"].iloc[: s.preview_tiles]) if reference else set()
        scales = {c: float(entry.get("dab_scale", 1.0)) for c, entry in ref["sources"].items()}
        jobs = [
            _Job(
                source=sources.get(c),
                target=reference,
                dab_scale=scales.get(c, 1.0),
                preview=i in previews,
            )
            for c, i in zip(normed["cohort"], normed["core_id"], strict=True)
        ]
        done = runner.run(normed, jobs, "normalising and measuring cores")
        _stop_if_changed(done, manifest_version)
        for o in done:
            if reference is None:
                o.problems.append(
                    QCProblem(
                        "preprocessing",
                        o.core_id,
                        "stain normalisation skipped: no "
                        f"reference stain vectors ({'; '.join(ref['notes'])})",
                    )
                )
            outcomes[o.core_id] = o
    for core_id in manifest["core_id"]:
        o = outcomes[core_id]
        result.tiles.append(o.tiles)
        result.features.append(o.features)
        result.problems.extend(o.problems)
        if o.preview is not None:
            result.previews.append(o.preview)
    return result


def _cohort_sources(normed, runner, reference, rule, s, record) -> dict[str, StainVectors]:
    """Each marked cohort's own stain vectors, pooled over its cores (per-core when that fails),
    and, with ``dab_scaling: cohort``, its DAB factor in ``record[cohort]["dab_scale"]``."""
    sources: dict[str, StainVectors] = {}
    if reference is None:
        return sources
    for cohort, rows in normed.groupby("cohort", sort=True):
        chosen = sample_rows(rows, s, None)
        jobs = [_Job(measure=False, sample_tiles=s.tiles_per_core)] * len(chosen)
        record[cohort] = entry = {}
        try:
            sources[cohort] = _pooled(
                runner.run(chosen, jobs, f"stain vectors of {cohort}"),
                rule.background_grey,
                f"cohort {cohort}",
                entry,
            )
        except StainEstimationError as err:
            logger.warning("Cohort %s: %s; each core's own stain vectors are used.", cohort, err)
            continue
        if s.dab_scaling != "cohort":
            continue
        if sources[cohort].max_concentrations is None or reference.max_concentrations is None:
            # e.g. a stain vector fell back to Ruifrok's: no percentile was measured with it
            note = "dab_scaling: no pooled DAB percentile to calibrate with; DAB left unscaled"
            logger.warning("Cohort %s: %s (see its notes in reference_stains)", cohort, note)
            entry["notes"] = [*entry.get("notes", []), note]
            entry["dab_scale"] = 1.0
            continue
        entry["dab_scale"] = _bounded_dab_scale(sources[cohort], reference, cohort, s)
    return sources


def _bounded_dab_scale(
    source: StainVectors, reference: StainVectors, cohort: str, s: StainNormalisationConfig
) -> float:
    """The cohort's DAB factor, limited to [1 / max_dab_scale, max_dab_scale] with a warning."""
    factor = cohort_dab_scale(source, reference)
    bounded = float(np.clip(factor, 1.0 / s.max_dab_scale, s.max_dab_scale))
    if bounded != factor:
        logger.warning(
            "Cohort %s: DAB factor %.2f limited to %.2f: its pooled DAB differs too much from the "
            "reference's for one factor to be trusted (another score mix, or other stains?)",
            cohort,
            factor,
            bounded,
        )
    logger.info("Cohort %s: DAB amounts x %.3f (pooled 99th percentiles)", cohort, bounded)
    return bounded


def _stop_if_changed(outcomes: Iterable[CoreOutcome], manifest_version: str) -> None:
    changed = sorted(o.core_id for o in outcomes if o.changed)
    if changed:
        which = f"version {manifest_version}" if manifest_version else "the loaded version"
        raise CoreContentError(
            f"{len(changed)} core(s) in data/02_intermediate/cores no longer match the content_hash "
            f"recorded in core_manifest ({which}): {', '.join(changed[:20])}"
            f"{' ...' if len(changed) > 20 else ''}. The files changed since that manifest was "
            "written; re-run `kedro run --pipelines=ingestion` (a new manifest version) or restore "
            "the cores of that version, rather than mixing the two."
        )
