"""Tests for her2_kedro.tma.qc.labels: each label problem is reported and every other row goes on."""

from __future__ import annotations

import pandas as pd
import pytest

from her2_kedro.schema import FIVE_CLASSES
from her2_kedro.tma.qc.labels import five_class, validate_labels
from her2_kedro.tma.qc.report import (
    ACCEPTED,
    QC_COLUMNS,
    REJECTED,
    QCProblem,
    accepted_reason,
    qc_table,
)
from her2_kedro.tma.qc.slide_map import validate_slide_map

GOOD = [
    ("a.jpg", "0", "0"),
    ("b.jpg", "1", "0"),
    ("c.jpg", "2", "0"),
    ("d.jpg", "2", "1"),
    ("e.jpg", "3", "1"),
]
GOOD_FILES = [r[0] for r in GOOD]


def table(
    rows: list[tuple[str, ...]], columns: tuple[str, ...] = ("filename", "ihc-score", "her2-status")
) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns), dtype=str)


def run(extra: list[tuple[str, ...]], available: list[str] | None = None, **kw: object):
    avail = GOOD_FILES + [r[0] for r in extra if r[0]] if available is None else available
    return validate_labels(table(GOOD + extra, **kw), "labels.csv", avail)


def assert_good_rows_untouched(clean: pd.DataFrame) -> None:
    good = clean[clean["filename"].isin(GOOD_FILES)].set_index("filename").sort_index()
    assert list(good.index) == GOOD_FILES
    assert good["ihc_score"].tolist() == [0, 1, 2, 2, 3]
    assert good["her2_status"].tolist() == [0, 0, 0, 1, 1]
    assert good["five_class"].tolist() == list(FIVE_CLASSES)


def only_problem(problems: list[QCProblem], core_id: str) -> QCProblem:
    mine = [p for p in problems if p.core_id == core_id]
    assert len(mine) == 1, problems
    return mine[0]


# --- five classes ---------------------------------------------------------------------------


def test_five_class() -> None:
    assert [five_class(s, h) for s, h in [(0, 0), (1, 0), (2, 0), (2, 1), (3, 1)]] == list(
        FIVE_CLASSES
    )
    for bad in [(0, 1), (1, 1), (3, 0), (4, 1), (2, 2)]:
        with pytest.raises(ValueError):
            five_class(*bad)


# --- clean table ----------------------------------------------------------------------------


def test_clean_table_defaults() -> None:
    clean, problems = run([])
    assert problems == []
    assert list(clean.columns) == [
        "filename",
        "ihc_score",
        "her2_status",
        "five_class",
        "patient_id",
        "split",
        "cohort",
    ]
    assert clean["ihc_score"].dtype == "int64" and clean["her2_status"].dtype == "int64"
    assert clean["patient_id"].tolist() == ["a", "b", "c", "d", "e"]  # each core its own patient
    assert clean["split"].isna().all()
    assert (clean["cohort"] == "internal").all()
    assert_good_rows_untouched(clean)


def test_headers_whitespace_and_case_and_values_stripped() -> None:
    t = pd.DataFrame(
        [[" a.jpg ", " 3 ", "", " P1 ", " TRAIN ", " ext "]],
        columns=[" Filename", "IHC-Score ", "HER2-status", "Patient_ID", " Split", "COHORT"],
        dtype=str,
    )
    clean, problems = validate_labels(t, "labels.csv", ["a.jpg"])
    assert problems == []
    row = clean.iloc[0]
    assert (row["filename"], row["ihc_score"], row["her2_status"]) == ("a.jpg", 3, 1)
    assert (row["patient_id"], row["split"], row["cohort"]) == ("P1", "train", "ext")


def test_status_implied_for_0_1_3() -> None:
    t = table([("a.jpg", "0", ""), ("b.jpg", "1", None), ("e.jpg", "3", "")])  # type: ignore[list-item]
    clean, problems = validate_labels(t, "labels.csv", ["a.jpg", "b.jpg", "e.jpg"])
    assert problems == []
    assert clean["her2_status"].tolist() == [0, 0, 1]


def test_status_column_absent_is_implied() -> None:
    t = table([("a.jpg", "0"), ("e.jpg", "3"), ("c.jpg", "2")], columns=("filename", "ihc-score"))
    clean, problems = validate_labels(t, "labels.csv", ["a.jpg", "e.jpg", "c.jpg"])
    assert clean["filename"].tolist() == ["a.jpg", "e.jpg"]
    assert "needs ISH status" in only_problem(problems, "c.jpg").reason


@pytest.mark.parametrize("missing", ["filename", "ihc-score"])
def test_missing_required_column(missing: str) -> None:
    t = table(GOOD).drop(columns=[missing])
    clean, problems = validate_labels(t, "labels.csv", GOOD_FILES)
    assert clean.empty
    assert len(problems) == 1
    assert "missing required column" in problems[0].reason and repr(missing) in problems[0].reason
    assert problems[0].source == "labels.csv"


# --- filename problems ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../x.jpg",
        "sub/../../x.jpg",
        "/etc/passwd",
        "C:\\x.jpg",
        "c:x.jpg",
        "..\\x.jpg",
        "sub\\x.jpg",
        "~/x.jpg",
        "a/../b.jpg",
    ],
)
def test_filename_escapes(name: str) -> None:
    clean, problems = run([(name, "0", "0")], available=GOOD_FILES)
    p = only_problem(problems, name)
    assert p.reason.startswith("filename escapes the cores folder") and "never opened" in p.reason
    assert_good_rows_untouched(clean)
    assert len(clean) == 5


def test_filename_empty() -> None:
    clean, problems = run([("", "0", "0")], available=GOOD_FILES)
    assert "filename is empty" in only_problem(problems, "").reason
    assert_good_rows_untouched(clean)


def test_filename_normalised_and_subfolders() -> None:
    clean, problems = run([("./sub//f.jpg", "0", "0")], available=GOOD_FILES + ["sub/f.jpg"])
    assert problems == []
    assert "sub/f.jpg" in clean["filename"].tolist()
    assert clean.set_index("filename").loc["sub/f.jpg", "patient_id"] == "sub/f"


def test_label_without_file() -> None:
    clean, problems = run([("ghost.jpg", "0", "0"), ("A.JPG", "3", "1")], available=GOOD_FILES)
    assert "label without file" in only_problem(problems, "ghost.jpg").reason
    assert "did you mean 'a.jpg'" in only_problem(problems, "A.JPG").reason
    assert_good_rows_untouched(clean)
    assert len(clean) == 5


def test_file_without_label() -> None:
    clean, problems = run([], available=GOOD_FILES + ["orphan.png"])
    p = only_problem(problems, "orphan.png")
    assert p.source == "cores" and "file without label" in p.reason
    assert_good_rows_untouched(clean)


# --- label value problems -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "status", "words"),
    [
        ("4", "1", "not an integer 0-3"),
        ("-1", "0", "not an integer 0-3"),
        ("two", "1", "not an integer 0-3"),
        ("2.5", "1", "not an integer 0-3"),
        ("", "0", "ihc-score is missing"),
        ("2", "2", "not 0 or 1"),
        ("0", "yes", "not 0 or 1"),
        ("0", "1", "inconsistent"),
        ("1", "1", "inconsistent"),
        ("3", "0", "inconsistent"),
        ("2", "", "needs ISH status"),
    ],
)
def test_bad_label_values(score: str, status: str, words: str) -> None:
    clean, problems = run([("bad.jpg", score, status)])
    p = only_problem(problems, "bad.jpg")
    assert words in p.reason and p.source == "labels.csv"
    assert_good_rows_untouched(clean)
    assert "bad.jpg" not in clean["filename"].tolist()


def test_integral_float_and_word_status_accepted() -> None:
    clean, problems = run([("f.jpg", "2.0", "positive")])
    assert problems == []
    assert clean.set_index("filename").loc["f.jpg", "five_class"] == "2+"


def test_invalid_split() -> None:
    cols = ("filename", "ihc-score", "her2-status", "split")
    rows = [(*r, "train") for r in GOOD] + [
        ("s.jpg", "0", "0", "training"),
        ("t.jpg", "0", "0", " Val "),
    ]
    clean, problems = validate_labels(
        table(rows, cols), "labels.csv", GOOD_FILES + ["s.jpg", "t.jpg"]
    )
    assert "invalid split 'training'" in only_problem(problems, "s.jpg").reason
    assert clean.set_index("filename").loc["t.jpg", "split"] == "val"
    assert_good_rows_untouched(clean)


# --- duplicates and conflicts ---------------------------------------------------------------


def test_exact_duplicate_kept_once() -> None:
    clean, problems = run([("a.jpg", "0", "0"), ("a.jpg", " 0", "0 ")])
    dupes = [p for p in problems if p.core_id == "a.jpg"]
    assert len(dupes) == 2 and all("duplicate row" in p.reason for p in dupes)
    assert clean["filename"].tolist().count("a.jpg") == 1
    assert_good_rows_untouched(clean)


def test_implied_status_counts_as_duplicate() -> None:
    clean, problems = run([("e.jpg", "3", "")])
    assert "duplicate row" in only_problem(problems, "e.jpg").reason
    assert clean["filename"].tolist().count("e.jpg") == 1


def test_conflicting_rows_all_rejected() -> None:
    clean, problems = run([("x.jpg", "0", "0"), ("x.jpg", "3", "1"), ("x.jpg", "0", "0")])
    p = only_problem(problems, "x.jpg")
    assert "conflicting rows" in p.reason
    assert "x.jpg" not in clean["filename"].tolist()
    assert_good_rows_untouched(clean)


def test_different_given_splits_for_one_patient_not_decided_here() -> None:
    cols = ("filename", "ihc-score", "her2-status", "patient_id", "split")
    rows = [("a.jpg", "0", "0", "P", "train"), ("b.jpg", "1", "0", "P", "test")]
    clean, problems = validate_labels(table(rows, cols), "labels.csv", ["a.jpg", "b.jpg"])
    assert problems == [] and len(clean) == 2


# --- slide map ------------------------------------------------------------------------------

SLIDE_COLS = ("slide", "core", "ihc-score", "her2-status")
FOUND = {"s1.tif": ["A-1", "A-2", "B-1"], "s2.ome.tiff": ["A-1"]}


def slide_rows(extra: list[tuple[str, ...]] = []) -> list[tuple[str, ...]]:  # noqa: B006
    return [
        ("s1.tif", "A-1", "0", "0"),
        ("s1", "a-2", "2", "1"),
        ("s1.tif", "B-01", "3", ""),
        ("s2", "A-1", "1", "0"),
        *extra,
    ]


def test_slide_map_clean() -> None:
    clean, problems = validate_slide_map(table(slide_rows(), SLIDE_COLS), "slide_map.csv", FOUND)
    assert problems == []
    assert clean["core_id"].tolist() == ["s1_A-1", "s1_A-2", "s1_B-1", "s2_A-1"]
    assert clean["slide"].tolist() == ["s1.tif", "s1.tif", "s1.tif", "s2.ome.tiff"]
    assert clean["five_class"].tolist() == ["0", "2+", "3", "1"]
    assert clean["patient_id"].tolist() == clean["core_id"].tolist()


@pytest.mark.parametrize(
    ("row", "core_id", "words"),
    [
        (("s9.tif", "A-1", "0", "0"), "s9_A-1", "label without core: slide 's9.tif' not found"),
        (
            ("s1.tif", "C-7", "0", "0"),
            "s1_C-7",
            "label without core: core C-7 not found on slide 's1.tif'",
        ),
        (("s1.tif", "7A", "0", "0"), "s1_7A", "invalid core label"),
        (("s1.tif", "A1", "0", "0"), "s1_A1", "invalid core label"),
        (("../s1.tif", "A-1", "0", "0"), "../s1.tif_A-1", "escapes the slides folder"),
        (("s1.tif", "A-1", "3", "1"), "s1_A-1", "conflicting rows"),
        # an invalid extra row is rejected on its own; the core keeps its valid row
        (("s1.tif", "A-1", "3", "0"), "s1_A-1", "(data row 5); the valid row 1 is used"),
    ],
)
def test_slide_map_problems(row: tuple[str, ...], core_id: str, words: str) -> None:
    clean, problems = validate_slide_map(
        table(slide_rows([row]), SLIDE_COLS), "slide_map.csv", FOUND
    )
    p = only_problem(problems, core_id)
    assert words in p.reason and p.source == "slide_map.csv"
    expected = {"s1_A-1", "s1_A-2", "s1_B-1", "s2_A-1"} - (
        {core_id} if "conflicting" in words else set()
    )
    assert set(clean["core_id"]) == expected


def test_slide_map_label_checks_shared() -> None:
    rows = slide_rows([("s1.tif", "A-2", "2", "1")])[:1] + [
        ("s1.tif", "A-2", "2", ""),
        ("s1.tif", "B-1", "3", "1"),
        ("s2", "A-1", "0", "1"),
    ]
    clean, problems = validate_slide_map(table(rows, SLIDE_COLS), "slide_map.csv", FOUND)
    assert "needs ISH status" in only_problem(problems, "s1_A-2").reason
    assert "inconsistent" in only_problem(problems, "s2_A-1").reason
    assert clean["core_id"].tolist() == ["s1_A-1", "s1_B-1"]


def test_slide_map_core_without_label_and_duplicate() -> None:
    rows = [("s1.tif", "A-1", "0", "0"), ("s1.tif", "a-1", "0", "0")]
    clean, problems = validate_slide_map(table(rows, SLIDE_COLS), "slide_map.csv", FOUND)
    assert "duplicate row" in only_problem(problems, "s1_A-1").reason
    unlabelled = {(p.source, p.core_id) for p in problems if "core without label" in p.reason}
    assert unlabelled == {
        ("slides/s1.tif", "s1_A-2"),
        ("slides/s1.tif", "s1_B-1"),
        ("slides/s2.ome.tiff", "s2_A-1"),
    }
    assert clean["core_id"].tolist() == ["s1_A-1"]


def test_slide_map_missing_column() -> None:
    t = table(slide_rows(), SLIDE_COLS).drop(columns=["core"])
    clean, problems = validate_slide_map(t, "slide_map.csv", FOUND)
    assert clean.empty and len(problems) == 1 and "'core'" in problems[0].reason


# --- QC table -------------------------------------------------------------------------------


def test_qc_table() -> None:
    problems = [
        QCProblem("labels.csv", "z.jpg", "label without file: 'z.jpg'"),
        QCProblem("cores", "b.jpg", "empty file (0 bytes)"),
    ]
    accepted = [
        ("cores", "a.jpg", accepted_reason()),
        ("cores", "c.png", accepted_reason("converted from RGBA")),
    ]
    qc = qc_table(problems, accepted)
    assert list(qc.columns) == QC_COLUMNS
    assert qc["core_id"].tolist() == ["a.jpg", "b.jpg", "c.png", "z.jpg"]
    assert qc["status"].tolist() == [ACCEPTED, REJECTED, ACCEPTED, REJECTED]
    assert qc.loc[2, "reason"] == "ok (converted from RGBA)"
    assert list(qc_table([], []).columns) == QC_COLUMNS
