"""Validate the slide map (slide_map.csv) against the cores found by dearraying each slide.

The label columns are checked exactly as in labels.csv (`tma.qc.labels`); the core labels are read
in the grid's label scheme, so the map and the dearrayer agree on what "A-1" is.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Collection, Mapping

import pandas as pd

from her2_kedro.schema import QCProblem
from her2_kedro.tma.qc.labels import (
    LABEL_COLUMNS,
    _cell,
    _duplicate_columns,
    _frame,
    _label_cells,
    _label_records,
    _make_row,
    _missing_columns,
    _normalise_headers,
    _resolve,
    _Row,
    safe_relative_path,
)

__all__ = [
    "SLIDE_MAP_OUTPUT_COLUMNS",
    "map_labels_by_slide",
    "normalise_core_label",
    "slide_stem",
    "validate_slide_map",
]

SLIDE_MAP_OUTPUT_COLUMNS = ["core_id", "slide", "core", *LABEL_COLUMNS]
_CORE_RE = re.compile(r"^([A-Z]+)-(\d+)$")
_SLIDE_SUFFIXES = (".ome.tiff", ".ome.tif")


def slide_stem(name: str) -> str:
    """A slide's id stem: its file name without folder and extension (also `.ome.tif[f]`)."""
    base = posixpath.basename(name)
    lower = base.lower()
    for suffix in _SLIDE_SUFFIXES:
        if lower.endswith(suffix):
            return base[: -len(suffix)]
    return posixpath.splitext(base)[0]


def normalise_core_label(label: str) -> str | None:
    """Grid label like 'a-01' -> 'A-1' (row letters, '-', column number); None when malformed."""
    match = _CORE_RE.match(label.strip().upper())
    if not match:
        return None
    return f"{match.group(1)}-{int(match.group(2))}"


def _slide_lookup(slides: Collection[str]) -> dict[str, set[str]]:
    """Every name a slide map may use for a slide (path, file name, stem) -> the slide files."""
    lookup: dict[str, set[str]] = {}
    for slide in slides:
        for alias in {slide, posixpath.basename(slide), slide_stem(slide)}:
            lookup.setdefault(alias, set()).add(slide)
    return lookup


def map_labels_by_slide(
    table: pd.DataFrame | None, slides: Collection[str]
) -> dict[str, list[str]]:
    """Core labels that slide_map.csv names for each slide file (unambiguous slide names only).

    Used before validation to anchor each slide's grid to the labels its map uses.
    """
    if table is None:
        return {}
    table, dupes = _normalise_headers(table)
    if dupes or "slide" not in table.columns or "core" not in table.columns:
        return {}
    lookup = _slide_lookup(slides)
    out: dict[str, list[str]] = {}
    for raw_slide, raw_core in zip(table["slide"], table["core"], strict=True):
        name, _ = safe_relative_path(_cell(raw_slide), "slides")
        matches = lookup.get(name or "", set())
        if len(matches) == 1 and _cell(raw_core):
            out.setdefault(next(iter(matches)), []).append(_cell(raw_core))
    return out


def validate_slide_map(
    table: pd.DataFrame,
    source: str,
    found_core_labels: Mapping[str, Collection[str]],
    normalise: Callable[[str], str | None] = normalise_core_label,
    expected: str = "row letters, '-', column number, e.g. 'A-1'",
) -> tuple[pd.DataFrame, list[QCProblem]]:
    """Check slide_map.csv (dtype=str) against the cores found by dearraying each slide.

    `found_core_labels` maps slide file name (relative to the slides folder) to its grid labels.
    `normalise` spells a map's core label as the dearrayer does (None when malformed, `expected`
    then says what a label looks like), so custom grid labels (zero-padded or letter columns)
    match.
    Returns clean rows with `core_id = f"{slide_stem}_{core}"`, `slide`, `core` and the label columns
    (patient_id defaults to the core id: each core its own patient) plus one problem per bad input.
    """
    table, dupes = _normalise_headers(table)
    empty = _frame([], SLIDE_MAP_OUTPUT_COLUMNS)
    if dupes:
        return empty, [_duplicate_columns(source, dupes)]
    missing = _missing_columns(table, ("slide", "core", "ihc-score"), source)
    if missing:
        return empty, missing

    found: dict[str, set[str]] = {}
    for slide, labels in found_core_labels.items():
        found[slide] = {n for n in (normalise(str(lab)) for lab in labels) if n is not None}
    lookup = _slide_lookup(found)

    problems: list[QCProblem] = []
    rows: list[_Row] = []
    for position, record in enumerate(table.to_dict("records"), start=1):
        raw_slide, raw_core = _cell(record.get("slide")), _cell(record.get("core"))
        slide_name, why = safe_relative_path(raw_slide, "slides")
        core = normalise(raw_core)
        if slide_name is None:
            reason = (
                "slide is empty" if raw_slide == "" else str(why).replace("filename", "slide name")
            )
            problems.append(
                QCProblem(source, f"{raw_slide}_{raw_core}", f"{reason} (data row {position})")
            )
            continue
        if core is None:
            problems.append(
                QCProblem(
                    source,
                    f"{slide_stem(slide_name)}_{raw_core}",
                    f"invalid core label {raw_core!r} (expected {expected}; data row {position})",
                )
            )
            continue
        matches = lookup.get(slide_name, set())
        slide_key = next(iter(matches)) if len(matches) == 1 else slide_name
        if len(matches) > 1:
            slide_key = f"?{slide_name}"  # ambiguous; reported by locate()
        core_id = f"{slide_stem(slide_key.lstrip('?'))}_{core}"
        rows.append(
            _make_row(
                core_id,
                position,
                _label_cells(record),
                default_patient=core_id,
                extra=(slide_key, core),
            )
        )

    def locate(row: _Row) -> str | None:
        slide_key, core = row.extra
        if slide_key.startswith("?"):
            options = ", ".join(sorted(lookup[slide_key[1:]]))
            return f"label without core: slide name {slide_key[1:]!r} is ambiguous ({options})"
        if slide_key not in found:
            return f"label without core: slide {slide_key!r} not found in the slides folder"
        if core not in found[slide_key]:
            return f"label without core: core {core} not found on slide {slide_key!r}"
        return None

    kept, found_problems, _ = _resolve(rows, source, locate)
    problems += found_problems
    labelled = {(row.extra[0], row.extra[1]) for row in rows}
    for slide in sorted(found):
        for core in sorted(found[slide], key=_core_sort_key):
            if (slide, core) not in labelled:
                problems.append(
                    QCProblem(
                        f"slides/{slide}",
                        f"{slide_stem(slide)}_{core}",
                        f"core without label: not listed in {source}",
                    )
                )
    records = [
        {"core_id": row.key, "slide": row.extra[0], "core": row.extra[1], **rec}
        for (row, _), rec in zip(kept, _label_records(kept), strict=True)
    ]
    return _frame(records, SLIDE_MAP_OUTPUT_COLUMNS), problems


def _core_sort_key(label: str) -> tuple[int, str, int, str]:
    letters, _, column = label.partition("-")
    number = int(column) if column.isdigit() else -1
    return (len(letters), letters, number, column)
