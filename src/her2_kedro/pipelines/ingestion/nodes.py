"""Thin nodes of the ingestion pipeline: parameters in, library calls, tables out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from her2_kedro.config import CohortsConfig, DearrayConfig, ImageChecks, SplitConfig, TileConfig
from her2_kedro.io.datasets import LabelTable
from her2_kedro.tma import ingest
from her2_kedro.tma.qc.report import QCProblem, accepted_reason, qc_table
from her2_kedro.tma.splits import assign_manifest_splits

logger = logging.getLogger(__name__)

PROBLEM_COLUMNS = ["source", "core_id", "reason"]
NOTE_COLUMNS = ["core_id", "note"]


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
        core_files,
        labels.frame,
        labels.error,
        ImageChecks.model_validate(image_checks),
        TileConfig.model_validate(tiles),
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
    result = ingest.ingest_slides(
        slide_files,
        slide_map.frame,
        slide_map.error,
        DearrayConfig.model_validate(dearray_config),
        ImageChecks.model_validate(image_checks),
        TileConfig.model_validate(tiles),
    )
    return result.records, _problem_frame(result.problems), result.payloads


def build_manifest(
    folder_records: pd.DataFrame,
    slide_records: pd.DataFrame,
    splits: dict[str, Any],
    cohorts: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Merge both sources, drop duplicates, split by patient; evaluation-only cohorts get ``external``.

    Returns the manifest, its problems, and the notes (conversions, split overrides) that the QC
    report shows on accepted rows.
    """
    p = SplitConfig.model_validate(splits)
    c = CohortsConfig.model_validate(cohorts)
    merged, problems = ingest.merge_sources(
        ingest.SourceResult(folder_records), ingest.SourceResult(slide_records)
    )
    if merged.empty:
        return merged.drop(columns=ingest.NOTE_COLUMN), _problem_frame(problems), _notes({})
    split, split_problems, split_notes = assign_manifest_splits(
        merged, fractions=p.fractions, seed=p.seed, evaluation_only=c.evaluation_only
    )
    merged = merged.assign(split=split)
    problems.extend(split_problems)
    kept = merged[merged["split"].notna()].reset_index(drop=True)
    notes = {
        core_id: "; ".join(filter(None, [str(note or ""), split_notes.get(core_id, "")]))
        for core_id, note in zip(kept["core_id"], kept[ingest.NOTE_COLUMN], strict=True)
    }
    return kept.drop(columns=ingest.NOTE_COLUMN), _problem_frame(problems), _notes(notes)


def _notes(notes: dict[str, str]) -> pd.DataFrame:
    rows = [(core_id, note) for core_id, note in notes.items() if note]
    return pd.DataFrame(rows, columns=NOTE_COLUMNS)


def build_qc_report(
    manifest: pd.DataFrame,
    folder_problems: pd.DataFrame,
    slide_problems: pd.DataFrame,
    manifest_problems: pd.DataFrame,
    accepted_notes: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per input problem and per accepted core (the latest report and its versioned copy).

    An accepted core's reason is ``ok``, or ``ok (<note>)`` when it was converted (grey, palette,
    RGBA, CMYK, 16-bit) or its split was overridden.
    """
    problems = [
        QCProblem(r.source, r.core_id, r.reason)
        for frame in (folder_problems, slide_problems, manifest_problems)
        for r in frame.itertuples(index=False)
    ]
    notes = dict(zip(accepted_notes["core_id"], accepted_notes["note"], strict=True))
    accepted = [
        (r.source, r.core_id, accepted_reason(notes.get(r.core_id, "")))
        for r in manifest.itertuples(index=False)
    ]
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
