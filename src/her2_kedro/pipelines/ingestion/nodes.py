"""Thin nodes of the ingestion pipeline: parameters in, library calls, tables out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from her2_kedro.config import DearrayConfig, ImageChecks, SplitConfig, TileConfig
from her2_kedro.io.datasets import LabelTable
from her2_kedro.tma import ingest
from her2_kedro.tma.dearray import DearrayParams
from her2_kedro.tma.qc.images import ImageCheckParams
from her2_kedro.tma.qc.report import QCProblem, qc_table
from her2_kedro.tma.splits import assign_splits

logger = logging.getLogger(__name__)

PROBLEM_COLUMNS = ["source", "core_id", "reason"]


def _checks(image_checks: dict[str, Any], tiles: dict[str, Any]) -> ImageCheckParams:
    c = ImageChecks.model_validate(image_checks)
    t = TileConfig.model_validate(tiles)
    return ImageCheckParams(
        max_pixels=c.max_pixels,
        min_side=c.min_side,
        tile_size=t.tile_size,
        background_grey=t.background_grey,
        min_tile_tissue=t.min_tissue,
    )


def _problem_frame(problems: list[QCProblem]) -> pd.DataFrame:
    return pd.DataFrame(
        [(p.source, p.core_id, p.reason) for p in problems], columns=PROBLEM_COLUMNS
    )


def ingest_core_folder(
    core_files: dict[str, Path],
    labels: LabelTable,
    image_checks: dict[str, Any],
    tiles: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, ingest.Payloads]:
    """Accepted cores of the cores folder, their problems, and lazy writers of their images."""
    result = ingest.ingest_core_folder(
        core_files, labels.frame, labels.error, _checks(image_checks, tiles)
    )
    return result.records, _problem_frame(result.problems), result.payloads


def ingest_slides(
    slide_files: dict[str, Path],
    slide_map: LabelTable,
    dearray_config: dict[str, Any],
    image_checks: dict[str, Any],
    tiles: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, ingest.Payloads]:
    """Dearrayed, labelled and QC'd cores of the whole slides, their problems and their images."""
    d = DearrayConfig.model_validate(dearray_config)
    grid = d.model_dump(exclude={"jpeg_quality", "max_slide_pixels"})
    if grid["column_labels"] is not None:
        grid["column_labels"] = tuple(grid["column_labels"])
    checks = _checks(image_checks, tiles)
    dearray = DearrayParams(**grid, background_grey=checks.background_grey)
    result = ingest.ingest_slides(
        slide_files,
        slide_map.frame,
        slide_map.error,
        dearray,
        checks,
        jpeg_quality=d.jpeg_quality,
        max_slide_pixels=d.max_slide_pixels,
    )
    return result.records, _problem_frame(result.problems), result.payloads


def build_manifest(
    folder_records: pd.DataFrame, slide_records: pd.DataFrame, splits: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge both sources, drop duplicates, and split by patient (given splits honoured)."""
    p = SplitConfig.model_validate(splits)
    merged, problems = ingest.merge_sources(
        ingest.SourceResult(folder_records), ingest.SourceResult(slide_records)
    )
    if merged.empty:
        return merged, _problem_frame(problems)
    split, split_problems = assign_splits(merged, fractions=p.fractions, seed=p.seed)
    merged = merged.assign(split=split)
    rejected = merged["split"].isna()
    problems.extend(split_problems)
    return merged[~rejected].reset_index(drop=True), _problem_frame(problems)


def build_qc_report(
    manifest: pd.DataFrame,
    folder_problems: pd.DataFrame,
    slide_problems: pd.DataFrame,
    manifest_problems: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per input problem and per accepted core (the latest report and its versioned copy)."""
    problems = [
        QCProblem(r.source, r.core_id, r.reason)
        for frame in (folder_problems, slide_problems, manifest_problems)
        for r in frame.itertuples(index=False)
    ]
    accepted = [(r.source, r.core_id, "ok") for r in manifest.itertuples(index=False)]
    report = qc_table(problems, accepted)
    n_rejected = int((report["status"] == "rejected").sum())
    logger.info("QC: %d cores accepted, %d problems reported.", len(manifest), n_rejected)
    return report, report


def collect_accepted_cores(
    manifest: pd.DataFrame,
    qc_report: pd.DataFrame,
    folder_payloads: ingest.Payloads,
    slide_payloads: ingest.Payloads,
) -> ingest.Payloads:
    """Image writers of the cores that survived every check, keyed by their file name.

    Runs after the QC report is saved, so that when nothing was accepted the user has the report
    that says why before the run stops.
    """
    if manifest.empty:
        reasons = qc_report["reason"].value_counts().head(5)
        summary = "; ".join(f"{n}x {reason}" for reason, n in reasons.items()) or "no raw inputs"
        raise ValueError(
            "No core was accepted. A study needs one labelled source: data/01_raw/cores with "
            "labels.csv, or data/01_raw/slides with slide_map.csv (`kedro run --pipelines="
            "synthetic` writes a demo cohort). See data/02_intermediate/qc_report.csv; most "
            f"common problems: {summary}"
        )
    payloads = {**folder_payloads, **slide_payloads}
    return {image: payloads[image] for image in manifest["image"]}
