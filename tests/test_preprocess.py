"""Preprocessing of accepted cores: reference stains, normalisation of marked cohorts, features."""

from __future__ import annotations

import io
from functools import partial

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from her2_kedro.features import preprocess
from her2_kedro.features.intensity import IntensityThresholds
from her2_kedro.imaging.normalisation import StainEstimationError, angle_degrees
from her2_kedro.imaging.tiling import TileRule
from her2_kedro.synthetic.optics import EXTERNAL_STAINS
from her2_kedro.synthetic.render import CoreSpec, render_core


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cohort():
    """Six small cores: four internal (two of them score 3), two external-centre cores."""
    rows, cores = [], {}
    for i, (score, external) in enumerate(
        [(3, False), (0, False), (3, False), (2, False), (3, True), (1, True)]
    ):
        spec = CoreSpec(
            ihc_score=score,
            her2_status=int(score == 3),
            status_cue=False,
            size=448,
            cell_diameter_px=20,
            **({"stains": EXTERNAL_STAINS} if external else {}),
        )
        rgb = render_core(spec, np.random.default_rng(i))
        image = f"c{i}.png"
        cores[image] = partial(bytes, _png(rgb))
        rows.append(
            {
                "core_id": f"c{i}",
                "image": image,
                "split": "train",
                "cohort": "external" if external else "internal",
            }
        )
    return pd.DataFrame(rows), cores


def test_reference_from_tiles_is_close_to_the_rendering_stains(cohort):
    manifest, cores = cohort
    internal = manifest[manifest["cohort"] == "internal"]
    tiles = preprocess.reference_tiles(
        internal, cores, TileRule(), max_cores=4, tiles_per_core=4, seed=0
    )
    assert len(tiles) == 16 and tiles[0].shape == (224, 224, 3)
    vectors, _ = preprocess.estimate_reference(tiles, 220.0)
    from her2_kedro.synthetic.optics import INTERNAL_STAINS

    assert angle_degrees(vectors.dab, INTERNAL_STAINS.dab) < 10


def test_no_reference_tiles_is_a_clear_error():
    with pytest.raises(StainEstimationError, match="no reference tiles"):
        preprocess.estimate_reference([], 220.0)


def test_only_marked_cohorts_are_normalised(cohort):
    manifest, cores = cohort
    tiles = preprocess.reference_tiles(
        manifest[manifest["cohort"] == "internal"], cores, TileRule(), 4, 4, 0
    )
    reference, _ = preprocess.estimate_reference(tiles, 220.0)
    plain = preprocess.preprocess_cores(
        manifest, cores, TileRule(), IntensityThresholds(), None, ["external"]
    )
    normed = preprocess.preprocess_cores(
        manifest, cores, TileRule(), IntensityThresholds(), reference, ["external"]
    )
    before = pd.DataFrame(plain.features).set_index("core_id")["max_mean_dab"]
    after = pd.DataFrame(normed.features).set_index("core_id")
    assert after.loc[["c0", "c1", "c2", "c3"], "max_mean_dab"].equals(
        before.loc[["c0", "c1", "c2", "c3"]]
    )
    assert after.loc["c4", "normalised"] and not after.loc["c0", "normalised"]
    # external cores are measured after normalisation (stain colours mapped, DAB amount kept)
    assert after.loc["c4", "max_mean_dab"] != before.loc["c4"]
    assert np.isfinite(after["max_mean_dab"]).all()
    assert all(len(t) > 0 for t in normed.tiles)


def test_core_missing_from_the_cores_folder_names_the_file(cohort):
    manifest, cores = cohort
    broken = manifest.assign(image=manifest["image"].replace({"c0.png": "gone.png"}))
    with pytest.raises(KeyError, match="gone.png"):
        preprocess.preprocess_cores(broken, cores, TileRule(), IntensityThresholds(), None, [])


def test_stain_matrix_option_changes_the_dab_definition(cohort):
    manifest, cores = cohort
    rule, thresholds = TileRule(), IntensityThresholds()
    default = preprocess.preprocess_cores(manifest, cores, rule, thresholds, None, [])
    htk = preprocess.preprocess_cores(
        manifest, cores, rule, thresholds, None, [], "histomicstk_hdab"
    )
    a = pd.DataFrame(default.features).set_index("core_id")["max_mean_dab"]
    b = pd.DataFrame(htk.features).set_index("core_id")["max_mean_dab"]
    assert not np.allclose(a, b)
    assert (
        a.loc["c0"] > a.loc["c1"] and b.loc["c0"] > b.loc["c1"]
    )  # score 3 above score 0 either way
