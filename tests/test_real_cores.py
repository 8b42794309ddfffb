"""Smoke check on the five real HER2 IHC cores in ../shared (skipped where that folder is absent)."""

from __future__ import annotations

import pandas as pd
import pytest

from her2_kedro.config import ImageChecks
from her2_kedro.tma.ingest import ingest_core_folder
from tests.conftest import REAL_CORES

pytestmark = pytest.mark.skipif(
    not (REAL_CORES / "labels.csv").is_file(), reason="../shared/data/real_cores not available"
)


def test_real_cores_are_accepted_with_labels_from_the_table_only(tmp_path):
    files = {p.name: p for p in sorted(REAL_CORES.glob("*.jpg"))}
    labels = pd.read_csv(REAL_CORES / "labels.csv", dtype=str)
    # rename in the table view only: labels must follow the table, never the file name prefix
    result = ingest_core_folder(files, labels, None, ImageChecks())
    assert result.problems == []
    assert len(result.records) == len(files) == 5
    truth = labels.set_index("filename")
    for row in result.records.itertuples(index=False):
        assert row.ihc_score == int(truth.loc[row.filename, "ihc-score"])
        assert row.her2_status == int(truth.loc[row.filename, "her2-status"])
        assert (row.width, row.height) == (5468, 5468)
    assert result.records["content_hash"].nunique() == 5
    # the accepted JPEG is copied byte for byte, not re-encoded
    image = result.records.iloc[0]["image"]
    assert result.payloads[image]() == files[result.records.iloc[0]["filename"]].read_bytes()


def test_labels_come_from_the_table_not_the_file_name():
    files = {p.name: p for p in sorted(REAL_CORES.glob("*.jpg"))}
    labels = pd.read_csv(REAL_CORES / "labels.csv", dtype=str)
    swapped = labels.copy()
    swapped["ihc-score"] = "0"
    swapped["her2-status"] = "0"
    result = ingest_core_folder(files, swapped.head(2), None, ImageChecks())
    assert set(result.records["ihc_score"]) == {0}
    unlabelled = [p for p in result.problems if p.reason.startswith("file without label")]
    assert len(unlabelled) == 3


def test_fast_deconvolution_equals_rgb2hed_on_a_real_core():
    import numpy as np
    from PIL import Image
    from skimage.color import rgb2hed

    from her2_kedro.imaging.stain import dab_channel, rgb_to_hed

    path = next(p for p in sorted(REAL_CORES.glob("3_*.jpg")))
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))[2000:3000, 2000:3000]
    expected = rgb2hed(rgb).astype(np.float32)
    np.testing.assert_allclose(dab_channel(rgb), expected[..., 2], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(rgb_to_hed(rgb), expected, rtol=1e-3, atol=1e-6)
