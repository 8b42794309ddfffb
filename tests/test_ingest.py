"""Ingestion of a cores folder: accepted cores, their image writers, duplicates across files."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
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
