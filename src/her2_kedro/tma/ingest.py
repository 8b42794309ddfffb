"""Ingestion of raw sources into accepted, labelled cores: the logic behind the ingestion nodes.

Two sources feed one manifest. A cores folder with ``labels.csv`` (the paper's format) and whole TMA
slides with ``slide_map.csv``. Every problem becomes one QC row naming the file and the reason; every
other input goes on. Core images are not held in memory: accepted cores are written later through
callables that re-read (folder) or hold the already-encoded bytes (dearrayed cores).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from her2_kedro.imaging.pixels import encode_jpeg, encode_png
from her2_kedro.schema import MANIFEST_COLUMNS, QCProblem
from her2_kedro.tma.dearray import DearrayParams, dearray_slide, extract_core
from her2_kedro.tma.qc.images import CheckedImage, ImageCheckParams, check_image
from her2_kedro.tma.qc.labels import slide_stem, validate_labels, validate_slide_map
from her2_kedro.tma.wsi import SlideReadError, open_slide

logger = logging.getLogger(__name__)

RECORD_COLUMNS = MANIFEST_COLUMNS

Payloads = dict[str, Callable[[], bytes]]

_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif"}


@dataclass
class SourceResult:
    """What one source contributes: accepted core records, problems, and lazy image writers."""

    records: pd.DataFrame
    problems: list[QCProblem] = field(default_factory=list)
    payloads: Payloads = field(default_factory=dict)


def core_id_for(filename: str) -> str:
    """Core id of a file in the cores folder: its relative path without suffix, '/' → '__'."""
    return "__".join(PurePosixPath(filename).with_suffix("").parts)


def _reencoded(path: Path, name: str, checks: ImageCheckParams) -> bytes:
    """Decode ``path`` again with the QC conversions and encode it as PNG (converted modes only)."""
    checked = check_image(path.read_bytes(), name, checks)
    if not checked.ok or checked.rgb is None:
        raise RuntimeError(f"{path}: changed on disk during the run ({checked.reason})")
    return encode_png(checked.rgb)


def _record(row: Mapping, core_id: str, source: str, checked: CheckedImage, image: str) -> dict:
    return {
        "core_id": core_id,
        "source": source,
        "filename": row.get("filename", ""),
        "patient_id": row["patient_id"],
        "ihc_score": int(row["ihc_score"]),
        "her2_status": int(row["her2_status"]),
        "five_class": row["five_class"],
        "split": row.get("split"),
        "cohort": row.get("cohort", "internal"),
        "width": int(checked.width),
        "height": int(checked.height),
        "content_hash": checked.content_hash,
        "image": image,
    }


def _frame(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=RECORD_COLUMNS)
    return frame.astype({"split": "object", "cohort": "object"})


def ingest_core_folder(
    files: Mapping[str, Path],
    labels: pd.DataFrame | None,
    labels_error: str | None,
    checks: ImageCheckParams,
    source: str = "cores",
) -> SourceResult:
    """Validate ``labels.csv`` against the folder, decode-verify every labelled file, keep the good ones."""
    problems: list[QCProblem] = []
    if labels is None:
        if labels_error:
            problems.append(QCProblem("labels.csv", "", labels_error))
        reason = "file without label: labels.csv is " + (
            "unreadable" if labels_error else "missing"
        )
        problems.extend(QCProblem(source, name, reason) for name in files)
        return SourceResult(_frame([]), problems)

    clean, label_problems = validate_labels(labels, "labels.csv", set(files))
    problems.extend(label_problems)
    records: list[dict] = []
    payloads: Payloads = {}
    for row in tqdm(clean.to_dict("records"), desc="checking cores", unit="core"):
        name = row["filename"]
        path = files[name]
        try:
            data = path.read_bytes()
        except OSError as err:
            problems.append(QCProblem(source, name, f"unreadable file: {err.strerror or err}"))
            continue
        checked = check_image(data, name, checks)
        del data
        if not checked.ok:
            problems.append(QCProblem(source, name, checked.reason))
            continue
        core_id = core_id_for(name)
        if checked.converted:
            image = f"{core_id}.png"
            payloads[image] = partial(_reencoded, path, name, checks)
        else:
            image = f"{core_id}.{_EXTENSIONS.get(checked.format, 'png')}"
            payloads[image] = path.read_bytes
        records.append(_record(row, core_id, source, checked, image))
        checked.rgb = None
    return SourceResult(_frame(records), problems, payloads)


def ingest_slides(
    files: Mapping[str, Path],
    slide_map: pd.DataFrame | None,
    slide_map_error: str | None,
    dearray: DearrayParams,
    checks: ImageCheckParams,
    jpeg_quality: int = 95,
    max_slide_pixels: int = 20_000_000_000,
) -> SourceResult:
    """Dearray every slide, label the cores from ``slide_map.csv``, extract and QC each labelled core."""
    problems: list[QCProblem] = []
    found: dict[str, dict[str, object]] = {}  # slide file name → {grid label: GridCore}
    for name, path in tqdm(files.items(), desc="dearraying slides", unit="slide"):
        source = f"slides/{name}"
        stem = slide_stem(name)
        try:
            with open_slide(path, max_pixels=max_slide_pixels) as reader:
                result = dearray_slide(reader, dearray)
        except SlideReadError as err:
            problems.append(QCProblem(source, "", f"unreadable slide: {err}"))
            continue
        except Exception as err:  # a slide the dearrayer cannot handle must not stop the others
            logger.exception("Dearraying %s failed", path)
            problems.append(
                QCProblem(source, "", f"dearraying failed: {type(err).__name__}: {err}")
            )
            continue
        logger.info(
            "%s: %d cores on a %dx%d grid (rotation %.1f°), %d positions empty, %d blobs rejected",
            name,
            len(result.cores),
            result.n_rows,
            result.n_cols,
            result.rotation_deg,
            len(result.missing),
            len(result.rejected),
        )
        for label in result.missing:
            problems.append(
                QCProblem(
                    source, f"{stem}_{label}", f"missing grid position {label}: no core found"
                )
            )
        for reason, x, y in result.rejected:
            problems.append(QCProblem(source, "", f"{reason} at level-0 (x={x:.0f}, y={y:.0f})"))
        found[name] = {core.label: core for core in result.cores}

    if slide_map is None:
        if slide_map_error:
            problems.append(QCProblem("slide_map.csv", "", slide_map_error))
        reason = "core without label: slide_map.csv is " + (
            "unreadable" if slide_map_error else "missing"
        )
        for name, cores in found.items():
            stem = slide_stem(name)
            problems.extend(QCProblem(f"slides/{name}", f"{stem}_{lab}", reason) for lab in cores)
        return SourceResult(_frame([]), problems)

    clean, map_problems = validate_slide_map(
        slide_map, "slide_map.csv", {name: list(cores) for name, cores in found.items()}
    )
    problems.extend(map_problems)
    records: list[dict] = []
    payloads: Payloads = {}
    for name, rows in clean.groupby("slide", sort=True):
        source = f"slides/{name}"
        with open_slide(files[name], max_pixels=max_slide_pixels) as reader:
            for row in tqdm(rows.to_dict("records"), desc=f"extracting {name}", unit="core"):
                core = found[name][row["core"]]
                core_id = row["core_id"]
                rgb = extract_core(reader, core, dearray)
                encoded = encode_jpeg(rgb, jpeg_quality)
                del rgb
                checked = check_image(encoded, core_id, checks)
                if not checked.ok:
                    problems.append(QCProblem(source, core_id, checked.reason))
                    continue
                image = f"{core_id}.jpg"
                payloads[image] = partial(bytes, encoded)
                row = {**row, "filename": row["core"]}
                records.append(_record(row, core_id, source, checked, image))
                checked.rgb = None
    return SourceResult(_frame(records), problems, payloads)


def merge_sources(*results: SourceResult) -> tuple[pd.DataFrame, list[QCProblem]]:
    """One table of accepted cores; later duplicates (same pixels, or same core id) are rejected."""
    frames = [r.records for r in results if not r.records.empty]
    if not frames:
        return _frame([]), []
    merged = pd.concat(frames, ignore_index=True)
    problems: list[QCProblem] = []
    keep = np.ones(len(merged), dtype=bool)
    first_by_hash: dict[str, str] = {}
    first_by_id: set[str] = set()
    for i, row in enumerate(merged.itertuples(index=False)):
        if row.content_hash in first_by_hash:
            original = first_by_hash[row.content_hash]
            problems.append(
                QCProblem(
                    row.source,
                    row.filename or row.core_id,
                    f"duplicate image: same pixels as {original}",
                )
            )
            keep[i] = False
        elif row.core_id in first_by_id:
            problems.append(
                QCProblem(
                    row.source, row.filename or row.core_id, f"duplicate core id {row.core_id}"
                )
            )
            keep[i] = False
        else:
            first_by_hash[row.content_hash] = row.core_id
            first_by_id.add(row.core_id)
    return merged[keep].reset_index(drop=True), problems
