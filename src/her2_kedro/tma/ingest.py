"""Ingestion of raw sources into accepted, labelled cores: the logic behind the ingestion nodes.

Two sources feed one manifest. A cores folder with ``labels.csv`` (the paper's format) and whole TMA
slides with ``slide_map.csv``. Every problem becomes one QC row naming the file and the reason; every
other input goes on. Core images are not held in memory: accepted cores are written later through
callables that re-read (folder) or hold the already-encoded bytes (dearrayed cores).

The per-input work (decode-checking each core file, dearraying each slide, extracting each slide's
cores) goes through :func:`her2_kedro.parallel.map_cores`: a plain loop, or one task per core or
slide when the node runs on a Dask cluster. The verdicts come back in input order and a bad input
is a QC problem either way, so the records, problems and payloads are the same.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from her2_kedro.config.ingestion import DearrayConfig, ImageChecks
from her2_kedro.config.shared import TileConfig
from her2_kedro.imaging.pixels import encode_jpeg, encode_png
from her2_kedro.parallel import map_cores
from her2_kedro.schema import DEFAULT_COHORT, MANIFEST_COLUMNS, QCProblem
from her2_kedro.tma.dearray import (
    DearrayResult,
    anchor_to_positions,
    canonical_label,
    dearray_slide,
    extract_core,
    grid_label,
    parse_grid_label,
)
from her2_kedro.tma.qc.images import CheckedImage, check_image
from her2_kedro.tma.qc.labels import check_label_table
from her2_kedro.tma.qc.slide_map import map_labels_by_slide, slide_stem, validate_slide_map
from her2_kedro.tma.wsi import SlideReadError, open_slide

logger = logging.getLogger(__name__)

#: Columns of the records a source hands to the manifest: the manifest's, plus the note (conversion,
#: split override) that the QC report shows on the core's accepted row.
NOTE_COLUMN = "qc_note"
RECORD_COLUMNS = [*MANIFEST_COLUMNS, NOTE_COLUMN]

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


def reencoded(path: Path, name: str, checks: ImageChecks, tiles: TileConfig) -> bytes:
    """Decode ``path`` again with the QC conversions and encode it as PNG (converted modes only)."""
    checked = check_image(path.read_bytes(), name, checks, tiles)
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
        "cohort": row.get("cohort", DEFAULT_COHORT),
        "width": int(checked.width),
        "height": int(checked.height),
        "content_hash": checked.content_hash,
        "image": image,
        NOTE_COLUMN: checked.reason if checked.ok else "",
    }


def _frame(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=RECORD_COLUMNS)
    return frame.astype({"split": "object", "cohort": "object", NOTE_COLUMN: "object"})


def check_file(path: Path, name: str, checks: ImageChecks, tiles: TileConfig) -> CheckedImage:
    try:
        data = path.read_bytes()
    except OSError as err:
        return CheckedImage(ok=False, reason=f"unreadable file: {err.strerror or err}")
    return check_image(data, name, checks, tiles)


def file_verdict(item: tuple[Path, str], *, checks: ImageChecks, tiles: TileConfig) -> CheckedImage:
    """:func:`check_file` of ``(path, name)`` without the decoded pixels (only the verdict, size,
    format and hash are used, and they are what travels back from a cluster's worker)."""
    path, name = item
    checked = check_file(path, name, checks, tiles)
    checked.rgb = None
    return checked


def _without_table(
    table: str, error: str | None, unlabelled: list[tuple[str, str]], what: str = "file"
) -> list[QCProblem]:
    """Problems when a label table is missing or unreadable: its error, then one per input
    (source, core id) left without a label."""
    reason = f"{what} without label: {table} is " + ("unreadable" if error else "missing")
    told = [QCProblem(table, "", error)] if error else []
    return told + [QCProblem(source, core_id, reason) for source, core_id in unlabelled]


def _with_image_verdict(
    problems: list[QCProblem], names: set[str], verdicts: Mapping[str, CheckedImage]
) -> list[QCProblem]:
    """Label problems of files rejected for their labels, each extended by its image's verdict."""
    out = []
    for problem in problems:
        checked = verdicts.get(problem.core_id)
        if problem.source != "labels.csv" or problem.core_id not in names or checked is None:
            out.append(problem)
            continue
        verdict = (
            "the image itself passed QC" if checked.ok else f"image also rejected: {checked.reason}"
        )
        out.append(dataclasses.replace(problem, reason=f"{problem.reason}; {verdict}"))
    return out


def ingest_core_folder(
    files: Mapping[str, Path],
    labels: pd.DataFrame | None,
    labels_error: str | None,
    checks: ImageChecks,
    tiles: TileConfig | None = None,
    source: str = "cores",
) -> SourceResult:
    """Validate ``labels.csv`` against the folder, decode-verify every labelled file, keep the good ones.

    A file whose rows were all rejected for their labels is decode-checked too, so its QC row says
    whether the image would also have been rejected.
    """
    tiles = tiles or TileConfig()
    problems: list[QCProblem] = []
    if labels is None:
        unlabelled = [(source, name) for name in files]
        return SourceResult(_frame([]), _without_table("labels.csv", labels_error, unlabelled))

    check = check_label_table(labels, "labels.csv", set(files))
    verdict = partial(file_verdict, checks=checks, tiles=tiles)
    rejected = sorted(check.label_rejected)
    verdicts = dict(
        zip(
            rejected,
            map_cores(verdict, [(files[n], n) for n in rejected], desc="checking rejected cores"),
            strict=True,
        )
    )
    problems.extend(_with_image_verdict(check.problems, set(check.label_rejected), verdicts))
    records: list[dict] = []
    payloads: Payloads = {}
    rows = check.clean.to_dict("records")
    checks_of_rows = map_cores(
        verdict, [(files[row["filename"]], row["filename"]) for row in rows], desc="checking cores"
    )
    for row, checked in zip(rows, checks_of_rows, strict=True):
        name = row["filename"]
        path = files[name]
        if not checked.ok:
            problems.append(QCProblem(source, name, checked.reason))
            continue
        core_id = core_id_for(name)
        if checked.converted:
            image = f"{core_id}.png"
            payloads[image] = partial(reencoded, path, name, checks, tiles)
        else:
            image = f"{core_id}.{_EXTENSIONS.get(checked.format, 'png')}"
            payloads[image] = path.read_bytes
        records.append(_record(row, core_id, source, checked, image))
    return SourceResult(_frame(records), problems, payloads)


def _map_positions(labels: list[str], dearray: DearrayConfig) -> set[tuple[int, int]]:
    parsed = (parse_grid_label(label, dearray) for label in labels)
    return {p for p in parsed if p is not None}


def _dearray_one(
    path: Path, source: str, dearray: DearrayConfig, tiles: TileConfig, map_labels: list[str]
) -> tuple[DearrayResult | None, list[QCProblem]]:
    """Dearray one slide and anchor its labels to the map; a failure is one QC problem."""
    try:
        with open_slide(path, max_pixels=dearray.max_slide_pixels) as reader:
            result = dearray_slide(reader, dearray, tiles)
    except SlideReadError as err:
        return None, [QCProblem(source, "", f"unreadable slide: {err}")]
    except Exception as err:  # a slide the dearrayer cannot handle must not stop the others
        logger.exception("Dearraying %s failed", path)
        return None, [QCProblem(source, "", f"dearraying failed: {type(err).__name__}: {err}")]
    result, anchoring = anchor_to_positions(result, _map_positions(map_labels, dearray), dearray)
    if anchoring is not None:
        log = logger.warning if anchoring.ties > 1 else logger.info
        log("%s: %s", source, anchoring.describe())
    logger.info(
        "%s: %d cores on a %dx%d grid (rotation %.1f°), %d positions empty, %d blobs rejected",
        source,
        len(result.cores),
        result.n_rows,
        result.n_cols,
        result.rotation_deg,
        len(result.missing),
        len(result.rejected),
    )
    stem = slide_stem(path.name)
    problems = [
        QCProblem(source, f"{stem}_{label}", f"missing grid position {label}: no core found")
        for label in result.missing
    ]
    problems += [
        QCProblem(source, "", f"{reason} at level-0 (x={x:.0f}, y={y:.0f})")
        for reason, x, y in result.rejected
    ]
    return result, problems


def _dearray_item(
    item: tuple[Path, str, list[str]], *, dearray: DearrayConfig, tiles: TileConfig
) -> tuple[DearrayResult | None, list[QCProblem]]:
    path, source, map_labels = item
    return _dearray_one(path, source, dearray, tiles, map_labels)


def _extract_item(
    item: tuple[str, Path, pd.DataFrame, Mapping[str, object]],
    *,
    dearray: DearrayConfig,
    checks: ImageChecks,
    tiles: TileConfig,
) -> SourceResult:
    name, path, rows, cores = item
    return _extract_slide(name, path, rows, cores, dearray, checks, tiles)


def _extract_slide(
    name: str,
    path: Path,
    rows: pd.DataFrame,
    cores: Mapping[str, object],
    dearray: DearrayConfig,
    checks: ImageChecks,
    tiles: TileConfig,
) -> SourceResult:
    """Extract, encode and QC every labelled core of one slide; a core that fails is one problem."""
    source = f"slides/{name}"
    problems: list[QCProblem] = []
    records: list[dict] = []
    payloads: Payloads = {}
    try:
        reader = open_slide(path, max_pixels=dearray.max_slide_pixels)
    except SlideReadError as err:
        reason = f"core extraction failed: slide unreadable on reopening: {err}"
        return SourceResult(_frame([]), [QCProblem(source, c, reason) for c in rows["core_id"]])
    with reader:
        for row in tqdm(rows.to_dict("records"), desc=f"extracting {name}", unit="core"):
            core_id = row["core_id"]
            try:
                encoded = encode_jpeg(
                    extract_core(reader, cores[row["core"]], dearray), dearray.jpeg_quality
                )
            except MemoryError:
                raise
            except Exception as err:  # one bad region must not cost the slide's other cores
                logger.warning("%s: extracting %s failed: %s", source, core_id, err)
                problems.append(
                    QCProblem(
                        source, core_id, f"core extraction failed: {type(err).__name__}: {err}"
                    )
                )
                continue
            checked = check_image(encoded, core_id, checks, tiles)
            if not checked.ok:
                problems.append(QCProblem(source, core_id, checked.reason))
                continue
            image = f"{core_id}.jpg"
            payloads[image] = partial(bytes, encoded)
            records.append(
                _record({**row, "filename": row["core"]}, core_id, source, checked, image)
            )
            checked.rgb = None
    return SourceResult(_frame(records), problems, payloads)


def ingest_slides(
    files: Mapping[str, Path],
    slide_map: pd.DataFrame | None,
    slide_map_error: str | None,
    dearray: DearrayConfig,
    checks: ImageChecks,
    tiles: TileConfig | None = None,
) -> SourceResult:
    """Dearray every slide, label the cores from ``slide_map.csv``, extract and QC each labelled core.

    The map's labels anchor each slide's grid (an empty first row or column no longer shifts the
    labels) and are read in the configured label scheme (``ingestion.dearray`` row and column
    labels), so custom labels match.
    """
    tiles = tiles or TileConfig()
    problems: list[QCProblem] = []
    map_labels = map_labels_by_slide(slide_map, list(files))
    found: dict[str, dict[str, object]] = {}  # slide file name → {grid label: GridCore}
    dearrayed = map_cores(
        partial(_dearray_item, dearray=dearray, tiles=tiles),
        [(path, f"slides/{name}", map_labels.get(name, [])) for name, path in files.items()],
        desc="dearraying slides",
        unit="slide",
    )
    for name, (result, slide_problems) in zip(files, dearrayed, strict=True):
        problems += slide_problems
        if result is not None:
            found[name] = {core.label: core for core in result.cores}

    if slide_map is None:
        unlabelled = [
            (f"slides/{name}", f"{slide_stem(name)}_{label}")
            for name, cores in found.items()
            for label in cores
        ]
        problems += _without_table("slide_map.csv", slide_map_error, unlabelled, what="core")
        return SourceResult(_frame([]), problems)

    example = grid_label(0, 0, dearray)
    clean, map_problems = validate_slide_map(
        slide_map,
        "slide_map.csv",
        {name: list(cores) for name, cores in found.items()},
        normalise=partial(canonical_label, params=dearray),
        expected=f"a grid label of ingestion.dearray's row and column labels, e.g. {example!r}",
    )
    problems.extend(map_problems)
    parts = map_cores(
        partial(_extract_item, dearray=dearray, checks=checks, tiles=tiles),
        [
            (name, files[name], rows, found[name])
            for name, rows in clean.groupby("slide", sort=True)
        ],
        desc="extracting slides",
        unit="slide",
    )
    records = [p.records for p in parts if not p.records.empty]
    payloads = {k: v for p in parts for k, v in p.payloads.items()}
    problems += [q for p in parts for q in p.problems]
    frame = pd.concat(records, ignore_index=True) if records else _frame([])
    return SourceResult(frame, problems, payloads)


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
