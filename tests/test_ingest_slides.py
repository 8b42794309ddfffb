"""Whole slides through ingestion: slide_map lookup with custom labels, grid anchoring, bad regions."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import slide_factory as sf  # noqa: E402

from her2_kedro.config import DearrayConfig, ImageChecks, TileConfig  # noqa: E402
from her2_kedro.tma import ingest  # noqa: E402
from her2_kedro.tma.wsi import open_slide  # noqa: E402

# cores of the test scenes are ~110 px across: smaller tiles than the paper's 224 px
CHECKS = ImageChecks(min_side=64)
TILES = TileConfig(tile_size=64, stride=64)


def _slide(tmp_path: Path, scene: sf.Scene, name: str = "tma1.tif") -> dict[str, Path]:
    path = tmp_path / name
    sf.write_pyramidal_tiff(scene, path, n_levels=3)
    return {name: path}


def _map(slide: str, cores: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {"slide": slide, "core": cores, "ihc-score": "3", "her2-status": "1"}, dtype=str
    )


def _centre_colour(payload: bytes) -> np.ndarray:
    rgb = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")).astype(float)
    h, w = rgb.shape[:2]
    return rgb[h // 2 - 15 : h // 2 + 15, w // 2 - 15 : w // 2 + 15].reshape(-1, 3).mean(axis=0)


def _assert_cores_are(result: ingest.SourceResult, truth: dict[str, sf.Disk]) -> None:
    """Every accepted core id names the scene core whose pixels it holds (by its colour)."""
    assert len(result.records) == len(truth)
    for row in result.records.itertuples(index=False):
        colour = _centre_colour(result.payloads[row.image]())
        disk = truth[row.core_id]
        assert np.abs(colour - np.asarray(disk.colour)).max() < 12, (row.core_id, colour)


@pytest.mark.parametrize(
    ("column_labels", "written"),
    [
        (["01", "02", "03", "04"], lambda r, c: f"{r}-{c + 1:02d}"),  # zero-padded columns
        (["a", "b", "c", "d"], lambda r, c: f"{r.lower()}-{'abcd'[c].upper()}"),  # letters
    ],
)
def test_custom_grid_labels_work_through_the_slide_map(tmp_path, column_labels, written):
    scene = sf.make_tma(2, 4, seed=5)
    files = _slide(tmp_path, scene)
    config = DearrayConfig(thumbnail_max_side=500, column_labels=column_labels)
    rows = {f"{r}-{c + 1}": written(r, c) for r in "AB" for c in range(4)}  # truth -> map label
    result = ingest.ingest_slides(
        files, _map("tma1.tif", list(rows.values())), None, config, CHECKS, TILES
    )
    assert result.problems == []
    expected = {
        f"tma1_{r}-{column_labels[c]}": scene.cores[f"{r}-{c + 1}"] for r in "AB" for c in range(4)
    }
    assert set(result.records["core_id"]) == set(expected)
    _assert_cores_are(result, expected)


def test_slide_map_anchors_a_grid_whose_first_row_and_column_are_empty(tmp_path, caplog):
    scene = sf.make_tma(4, 6, seed=8)
    empty = {f"A-{c}" for c in range(1, 7)} | {f"{r}-1" for r in "ABCD"}
    scene.disks = [d for d in scene.disks if not (isinstance(d, sf.Disk) and d.label in empty)]
    present = sorted(scene.cores)  # B-2 .. D-6: 3 rows x 5 columns found
    files = _slide(tmp_path, scene)
    caplog.set_level(logging.INFO)
    config = DearrayConfig(thumbnail_max_side=500)
    result = ingest.ingest_slides(files, _map("tma1", present), None, config, CHECKS, TILES)
    _assert_cores_are(result, {f"tma1_{lab}": scene.cores[lab] for lab in present})
    # the grid spans the map's extent: the empty row and column are reported, not shifted into
    missing = sorted(p.core_id for p in result.problems if "missing grid position" in p.reason)
    assert missing == sorted(f"tma1_{lab}" for lab in empty)
    assert len(result.problems) == len(empty)
    assert "grid shifted by 1 row(s), 1 column(s); 15 of 15 cores agree" in caplog.text

    # without the map's labels the inferred grid starts at the first occupied row and column
    unanchored = ingest.ingest_slides(files, None, None, config, CHECKS, TILES)
    labels = {p.core_id for p in unanchored.problems if "core without label" in p.reason}
    assert "tma1_A-1" in labels and "tma1_D-6" not in labels


class _FlakyReader:
    """A slide reader whose second region read fails, as a corrupt tile would."""

    def __init__(self, reader):
        self._reader, self.reads = reader, 0

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._reader.close()

    def read_region(self, location, level, size):
        self.reads += 1
        if self.reads == 2:
            raise OSError("decoder error in tile (3, 7)")
        return self._reader.read_region(location, level, size)


def test_one_bad_core_region_rejects_that_core_and_the_others_go_on(tmp_path, monkeypatch):
    scene = sf.make_tma(2, 3, seed=2)
    files = _slide(tmp_path, scene)
    monkeypatch.setattr(
        ingest, "open_slide", lambda path, max_pixels: _FlakyReader(open_slide(path, max_pixels))
    )
    labels = sorted(scene.cores)
    result = ingest.ingest_slides(
        files, _map("tma1.tif", labels), None, DearrayConfig(thumbnail_max_side=500), CHECKS, TILES
    )
    second = f"tma1_{labels[1]}"  # rows of the map are extracted in order
    assert [(p.core_id, p.reason) for p in result.problems] == [
        (second, "core extraction failed: OSError: decoder error in tile (3, 7)")
    ]
    truth = {f"tma1_{lab}": scene.cores[lab] for lab in labels if f"tma1_{lab}" != second}
    _assert_cores_are(result, truth)
