"""Validate the paper's label table (labels.csv); the row checks shared with slide_map.csv.

Every bad row becomes one `QCProblem` naming the file/core and the problem; every other row goes
on. File names are checked purely lexically: a name that could resolve outside the cores folder is
rejected without ever being opened or stat-ed.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import astuple, dataclass

import pandas as pd

from her2_kedro.schema import DEFAULT_COHORT, SPLITS, QCProblem

LABEL_COLUMNS = ["ihc_score", "her2_status", "five_class", "patient_id", "split", "cohort"]
LABELS_OUTPUT_COLUMNS = ["filename", *LABEL_COLUMNS]

# Header spellings accepted (after strip + lower) for the paper's column names.
_HEADER_ALIASES = {
    "ihc_score": "ihc-score",
    "ihc score": "ihc-score",
    "her2_status": "her2-status",
    "her2 status": "her2-status",
    "patient-id": "patient_id",
    "patient id": "patient_id",
    "patient": "patient_id",
}
_SCORE_RE = re.compile(r"^\+?(\d+)(\.0*)?$")
_STATUS_WORDS = {
    "0": 0,
    "0.0": 0,
    "neg": 0,
    "negative": 0,
    "1": 1,
    "1.0": 1,
    "pos": 1,
    "positive": 1,
}
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def five_class(score: int, status: int) -> str:
    """The paper's five training classes 0, 1, 2-, 2+, 3 from IHC score and HER2 status."""
    if score in (0, 1) and status == 0:
        return str(score)
    if score == 2 and status in (0, 1):
        return "2+" if status == 1 else "2-"
    if score == 3 and status == 1:
        return "3"
    raise ValueError(
        f"invalid or inconsistent label: ihc-score {score!r} with her2-status {status!r}"
    )


@dataclass(frozen=True)
class _Label:
    ihc_score: int
    her2_status: int
    five_class: str
    patient_id: str
    split: str | None
    cohort: str


@dataclass(frozen=True)
class _Row:
    key: str  # normalised file name or core id: identifies the core and groups duplicates
    position: int  # 1-based data row number in the table
    parsed: _Label | str  # the label, or why it is invalid
    signature: tuple[object, ...]
    extra: tuple[str, ...] = ()  # slide map: (slide key, core label)


def _cell(value: object) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):  # type: ignore[arg-type]
        return ""
    return str(value).strip()


def _normalise_headers(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Strip/lower the headers and map known aliases; returns the table and duplicate headers."""
    names = []
    for col in table.columns:
        name = str(col).strip().lower()
        names.append(_HEADER_ALIASES.get(name, name))
    dupes = sorted({n for n in names if names.count(n) > 1})
    out = table.copy()
    out.columns = names
    return out, dupes


def _missing_columns(
    table: pd.DataFrame, required: tuple[str, ...], source: str
) -> list[QCProblem]:
    found = ", ".join(map(str, table.columns)) or "none"
    return [
        QCProblem(
            source,
            "",
            f"missing required column {col!r} (columns found: {found}); no rows accepted",
        )
        for col in required
        if col not in table.columns
    ]


def safe_relative_path(name: str, folder: str = "cores") -> tuple[str | None, str | None]:
    """Lexically normalise a path relative to `folder`; returns (path, None) or (None, reason).

    Rejects empty names, absolute paths, drive letters, backslashes, `~` and any `..` component
    without touching the file system, so nothing outside the folder is ever opened.
    """
    if name == "":
        return None, "filename is empty"

    def escape(why: str) -> tuple[None, str]:
        return None, f"filename escapes the {folder} folder: {name!r} ({why}; never opened)"

    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return escape("control character in name")
    if "\\" in name:
        return escape("backslash in path")
    if name.startswith("/") or _DRIVE_RE.match(name):
        return escape("absolute path")
    if name.startswith("~"):
        return escape("home-directory path")
    if ".." in name.split("/"):
        return escape("parent-directory component '..'")
    norm = posixpath.normpath(name)
    if norm in (".", "") or name.endswith("/"):
        return None, f"filename does not name a file: {name!r}"
    return norm, None


def _parse_label(
    score_raw: str,
    status_raw: str,
    patient_raw: str,
    split_raw: str,
    cohort_raw: str,
    default_patient: str,
) -> _Label | str:
    """The shared label checks for labels.csv and slide_map.csv: a `_Label` or the reason it is invalid."""
    if score_raw == "":
        return "ihc-score is missing"
    match = _SCORE_RE.match(score_raw)
    score = int(match.group(1)) if match else -1
    if not 0 <= score <= 3:
        return f"ihc-score is not an integer 0-3: {score_raw!r}"
    if status_raw == "":
        if score == 2:
            return "ihc-score 2 needs ISH status: her2-status is missing"
        status = 1 if score == 3 else 0
    elif status_raw.lower() in _STATUS_WORDS:
        status = _STATUS_WORDS[status_raw.lower()]
    else:
        return f"her2-status is not 0 or 1: {status_raw!r}"
    if (score in (0, 1) and status == 1) or (score == 3 and status == 0):
        expected = "positive (1)" if score == 3 else "negative (0)"
        return (
            f"inconsistent labels: ihc-score {score} with her2-status {status} "
            f"(score {score} must be {expected})"
        )
    split = split_raw.lower() or None
    if split is not None and split not in SPLITS:
        hint = (
            "; cores that only evaluate are marked by their cohort (cohorts.evaluation_only)"
            if split == "external"
            else ""
        )
        return f"invalid split {split_raw!r} (expected train, val or test{hint})"
    return _Label(
        ihc_score=score,
        her2_status=status,
        five_class=five_class(score, status),
        patient_id=patient_raw or default_patient,
        split=split,
        cohort=cohort_raw or DEFAULT_COHORT,
    )


def _label_cells(record: Mapping[str, object]) -> tuple[str, str, str, str, str]:
    return (
        _cell(record.get("ihc-score")),
        _cell(record.get("her2-status")),
        _cell(record.get("patient_id")),
        _cell(record.get("split")),
        _cell(record.get("cohort")),
    )


def _make_row(
    key: str,
    position: int,
    cells: tuple[str, str, str, str, str],
    default_patient: str,
    extra: tuple[str, ...] = (),
) -> _Row:
    parsed = _parse_label(*cells, default_patient=default_patient)
    signature: tuple[object, ...] = (
        ("ok", *astuple(parsed)) if isinstance(parsed, _Label) else ("raw", *cells)
    )
    return _Row(key=key, position=position, parsed=parsed, signature=signature, extra=extra)


def _resolve(
    rows: list[_Row],
    source: str,
    locate: Callable[[_Row], str | None],
) -> tuple[list[tuple[_Row, _Label]], list[QCProblem], set[str]]:
    """Per core: availability (`locate`), then each row's own validity, then conflicts among valid rows.

    An invalid row is rejected with its own reason and does not make the core's valid rows
    "conflicting", so a broken extra row never costs a good core. Returns the kept rows, the
    problems, and the keys left without a label because of their rows (invalid or conflicting).
    """
    groups: dict[str, list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.key, []).append(row)
    kept: list[tuple[_Row, _Label]] = []
    problems: list[QCProblem] = []
    label_rejected: set[str] = set()
    for key, group in groups.items():
        missing = locate(group[0])
        if missing is not None:
            problems.append(QCProblem(source, key, missing))
            continue
        valid = [row for row in group if isinstance(row.parsed, _Label)]
        for row in group:
            if isinstance(row.parsed, str):
                where = f" (data row {row.position})" if len(group) > 1 else ""
                also = f"; the valid row {valid[0].position} is used" if valid else ""
                problems.append(QCProblem(source, key, f"{row.parsed}{where}{also}"))
        if not valid:
            label_rejected.add(key)
            continue
        if len({row.signature for row in valid}) > 1:
            where = ", ".join(str(r.position) for r in valid)
            problems.append(
                QCProblem(
                    source,
                    key,
                    f"conflicting rows for {key!r} (data rows {where} give different labels); all rejected",
                )
            )
            label_rejected.add(key)
            continue
        first = valid[0]
        for dup in valid[1:]:
            problems.append(
                QCProblem(
                    source,
                    key,
                    f"duplicate row for {key!r} (data row {dup.position} repeats data row {first.position}); kept one",
                )
            )
        kept.append((first, first.parsed))  # type: ignore[arg-type]
    return kept, problems, label_rejected


def _label_records(kept: list[tuple[_Row, _Label]]) -> list[dict[str, object]]:
    return [
        {
            "ihc_score": lab.ihc_score,
            "her2_status": lab.her2_status,
            "five_class": lab.five_class,
            "patient_id": lab.patient_id,
            "split": lab.split if lab.split is not None else pd.NA,
            "cohort": lab.cohort,
        }
        for _, lab in kept
    ]


def _frame(records: list[dict[str, object]], columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(records, columns=columns)
    for col in ("ihc_score", "her2_status"):
        frame[col] = frame[col].astype("int64")
    frame["split"] = frame["split"].astype(object).where(frame["split"].notna(), pd.NA)
    return frame.reset_index(drop=True)


@dataclass(frozen=True)
class LabelCheck:
    """Outcome of checking labels.csv: clean rows, problems, and files left unlabelled by bad rows.

    `label_rejected` names files in the cores folder whose every row was invalid or conflicting:
    the caller still decode-checks them so that their QC row can report an image problem too.
    """

    clean: pd.DataFrame
    problems: list[QCProblem]
    label_rejected: frozenset[str] = frozenset()


def validate_labels(
    table: pd.DataFrame, source: str, available: Collection[str]
) -> tuple[pd.DataFrame, list[QCProblem]]:
    """Clean rows and problems of labels.csv (see `check_label_table`)."""
    check = check_label_table(table, source, available)
    return check.clean, check.problems


def check_label_table(table: pd.DataFrame, source: str, available: Collection[str]) -> LabelCheck:
    """Check labels.csv (read with dtype=str) against the files found in the cores folder.

    `available` holds relative POSIX paths. Returns the clean rows (`filename`, `ihc_score`,
    `her2_status`, `five_class`, `patient_id`, `split`, `cohort`) and one problem per bad input.
    Without a `patient_id`, each core is its own patient (patient_id = filename without extension);
    `cohort` defaults to "internal"; `split` is NA when not given.
    """
    table, dupes = _normalise_headers(table)
    empty = _frame([], LABELS_OUTPUT_COLUMNS)
    if dupes:
        return LabelCheck(empty, [_duplicate_columns(source, dupes)])
    missing = _missing_columns(table, ("filename", "ihc-score"), source)
    if missing:
        return LabelCheck(empty, missing)

    available_set = {posixpath.normpath(a) for a in available}
    by_lower: dict[str, str] = {}
    for name in available_set:
        by_lower.setdefault(name.lower(), name)

    problems: list[QCProblem] = []
    rows: list[_Row] = []
    for position, record in enumerate(table.to_dict("records"), start=1):
        raw_name = _cell(record.get("filename"))
        name, why = safe_relative_path(raw_name, "cores")
        if name is None:
            problems.append(QCProblem(source, raw_name, f"{why} (data row {position})"))
            continue
        stem = posixpath.splitext(name)[0]
        rows.append(_make_row(name, position, _label_cells(record), default_patient=stem))

    def locate(row: _Row) -> str | None:
        if row.key in available_set:
            return None
        hint = by_lower.get(row.key.lower())
        suffix = f" (did you mean {hint!r}? names are case-sensitive)" if hint else ""
        return f"label without file: {row.key!r} is not in the cores folder{suffix}"

    kept, found, label_rejected = _resolve(rows, source, locate)
    problems += found
    named = {row.key for row in rows}
    problems += [
        QCProblem("cores", name, f"file without label: not listed in {source}")
        for name in sorted(available_set - named)
    ]
    records = [
        {"filename": row.key, **rec}
        for (row, _), rec in zip(kept, _label_records(kept), strict=True)
    ]
    return LabelCheck(_frame(records, LABELS_OUTPUT_COLUMNS), problems, frozenset(label_rejected))


def _duplicate_columns(source: str, dupes: list[str]) -> QCProblem:
    return QCProblem(
        source, "", f"duplicate column(s) {', '.join(map(repr, dupes))}; no rows accepted"
    )
