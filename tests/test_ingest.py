"""Ingestion of a cores folder: accepted cores, their image writers, duplicates across files."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from her2_kedro.config import ImageChecks
from her2_kedro.tma.ingest import SourceResult, core_id_for, ingest_core_folder, merge_sources


def _core(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = np.full((448, 448, 3), (236, 236, 243), np.uint8)
    yy, xx = np.mgrid[:448, :448]
    disk = (yy - 224) ** 2 + (xx - 224) ** 2 < 200**2
    rgb[disk] = rng.integers(90, 180, size=(int(disk.sum()), 3), dtype=np.uint8)
    return rgb


def _write(path, rgb, fmt, mode="RGB"):
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())


def _labels(names):
    return pd.DataFrame(
        {"filename": names, "ihc-score": ["3"] * len(names), "her2-status": ["1"] * len(names)}
    )


def test_duplicates_by_pixels_and_by_core_id_are_rejected_later_ones_only(tmp_path):
    _write(tmp_path / "a.png", _core(0), "PNG")
    _write(tmp_path / "copy_of_a.tif", _core(0), "TIFF")  # same pixels, other file and format
    _write(tmp_path / "b.png", _core(1), "PNG")
    _write(tmp_path / "b.tif", _core(2), "TIFF")  # different pixels, same core id "b"
    files = {p.name: p for p in sorted(tmp_path.iterdir())}
    result = ingest_core_folder(files, _labels(list(files)), None, ImageChecks())
    assert len(result.records) == 4 and result.problems == []
    merged, problems = merge_sources(result)
    assert sorted(merged["filename"]) == ["a.png", "b.png"]
    reasons = {p.core_id: p.reason for p in problems}
    assert reasons["copy_of_a.tif"] == "duplicate image: same pixels as a"
    assert reasons["b.tif"] == "duplicate core id b"


def test_converted_images_are_written_as_png_and_others_byte_for_byte(tmp_path):
    _write(tmp_path / "grey.jpg", _core(3), "JPEG", mode="L")
    _write(tmp_path / "colour.jpg", _core(4), "JPEG")
    files = {p.name: p for p in sorted(tmp_path.iterdir())}
    result = ingest_core_folder(files, _labels(list(files)), None, ImageChecks())
    images = dict(zip(result.records["filename"], result.records["image"], strict=True))
    assert images == {"colour.jpg": "colour.jpg", "grey.jpg": "grey.png"}
    assert result.payloads["colour.jpg"]() == (tmp_path / "colour.jpg").read_bytes()
    converted = Image.open(io.BytesIO(result.payloads["grey.png"]()))
    assert converted.format == "PNG" and converted.mode == "RGB"


def test_missing_or_unreadable_label_table_reports_every_file(tmp_path):
    _write(tmp_path / "a.png", _core(0), "PNG")
    files = {"a.png": tmp_path / "a.png"}
    missing = ingest_core_folder(files, None, None, ImageChecks())
    assert [(p.core_id, p.reason) for p in missing.problems] == [
        ("a.png", "file without label: labels.csv is missing")
    ]
    broken = ingest_core_folder(
        files, None, "labels.csv: unreadable label table (x)", ImageChecks()
    )
    assert [p.source for p in broken.problems] == ["labels.csv", "cores"]
    assert broken.records.empty


def test_core_ids_keep_subfolders_apart():
    assert core_id_for("centre_a/x1.jpg") == "centre_a__x1"
    assert core_id_for("x1.jpeg") == "x1"


def test_merge_of_nothing_is_empty():
    merged, problems = merge_sources(SourceResult(pd.DataFrame()), SourceResult(pd.DataFrame()))
    assert merged.empty and problems == []


def test_a_broken_extra_row_costs_neither_the_good_core_nor_its_own_report(tmp_path):
    """Issue 6: the same file again with ihc-score 7 used to make both rows 'conflicting'."""
    _write(tmp_path / "good.png", _core(5), "PNG")
    _write(tmp_path / "other.png", _core(6), "PNG")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _write(tmp_path / "clean_image.png", _core(7), "PNG")
    labels = pd.DataFrame(
        {
            "filename": ["good.png", "other.png", "good.png", "broken.png", "clean_image.png"],
            "ihc-score": ["3", "0", "7", "9", "2"],
            "her2-status": ["1", "0", "1", "1", ""],
        }
    )
    files = {p.name: p for p in sorted(tmp_path.iterdir())}
    result = ingest_core_folder(files, labels, None, ImageChecks())
    assert sorted(result.records["filename"]) == ["good.png", "other.png"]
    good = result.records.set_index("filename").loc["good.png"]
    assert (good["ihc_score"], good["her2_status"]) == (3, 1)
    reasons = {(p.source, p.core_id): p.reason for p in result.problems}
    assert len(reasons) == len(result.problems) == 3
    assert reasons[("labels.csv", "good.png")] == (
        "ihc-score is not an integer 0-3: '7' (data row 3); the valid row 1 is used"
    )
    # a file rejected for its labels is still decode-checked: one row says both problems
    broken = reasons[("labels.csv", "broken.png")]
    assert broken.startswith("ihc-score is not an integer 0-3: '9'; image also rejected: ")
    assert "not an image" in broken
    assert reasons[("labels.csv", "clean_image.png")] == (
        "ihc-score 2 needs ISH status: her2-status is missing; the image itself passed QC"
    )


def _qc_of(tmp_path, labels):
    from her2_kedro.pipelines.ingestion import nodes

    files = {p.name: p for p in sorted(tmp_path.iterdir())}
    folder = ingest_core_folder(files, labels, None, ImageChecks())
    empty = ingest_core_folder({}, labels.iloc[:0], None, ImageChecks()).records
    manifest, problems, notes = nodes.build_manifest(
        folder.records, empty, {"seed": 1}, {"evaluation_only": ["external"]}
    )
    report, _ = nodes.build_qc_report(
        manifest, pd.DataFrame(columns=nodes.PROBLEM_COLUMNS), problems.iloc[:0], problems, notes
    )
    return manifest, report.set_index("core_id")


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("L", "converted from 8-bit grayscale (L)"),
        ("P", "converted from palette (P)"),
        ("RGBA", "converted from RGBA (alpha composited on white)"),
        ("I;16", "converted from I;16 grayscale (16-bit scaled by 1/257)"),
    ],
)
def test_converted_images_carry_their_note_into_the_qc_report(tmp_path, mode, words):
    rgb = _core(8)
    image = Image.fromarray(rgb)
    if mode == "I;16":
        grey16 = (np.asarray(image.convert("L")).astype(np.uint16) * 257).astype(np.uint16)
        image = Image.fromarray(grey16)
    else:
        image = image.convert(mode)
    image.save(tmp_path / "converted.png")
    _write(tmp_path / "plain.png", _core(9), "PNG")
    manifest, report = _qc_of(tmp_path, _labels(["converted.png", "plain.png"]))
    assert report.loc["converted", "status"] == "accepted"
    assert report.loc["converted", "reason"] == f"ok ({words})"
    assert report.loc["plain", "reason"] == "ok"
    assert len(manifest) == 2 and "qc_note" not in manifest.columns


def test_cmyk_jpeg_note_reaches_the_report(tmp_path):
    Image.fromarray(_core(10)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    _, report = _qc_of(tmp_path, _labels(["cmyk.jpg"]))
    assert report.loc["cmyk", "reason"] == "ok (converted from CMYK)"


def test_evaluation_only_split_override_is_noted_on_the_accepted_row(tmp_path):
    _write(tmp_path / "ext.png", _core(11), "PNG")
    _write(tmp_path / "int.png", _core(12), "PNG")
    labels = _labels(["ext.png", "int.png"]).assign(
        cohort=["external", "internal"], split=["train", "val"]
    )
    manifest, report = _qc_of(tmp_path, labels)
    assert manifest.set_index("core_id")["split"].to_dict() == {"ext": "external", "int": "val"}
    assert report.loc["ext", "reason"] == (
        "ok (split 'train' from the label table overridden to 'external': "
        "cohort 'external' is evaluation-only (cohorts.evaluation_only))"
    )
    assert report.loc["int", "reason"] == "ok"
