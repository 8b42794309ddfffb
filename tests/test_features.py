"""Intensity descriptors: hand-computed values, the real scikit-image DAB image, units, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from skimage import data
from skimage.color import rgb2hed, rgb_from_hed

from her2_kedro.config import ThresholdConfig
from her2_kedro.features.intensity import (
    INTENSITY_PLUS_FEATURES,
    OD_TO_SKIMAGE_DAB,
    PAPER_FEATURES,
    PERCENTILE_BIN,
    core_features,
    histogram_percentiles,
    intensity_plus,
    max_mean_dab,
    thresholds_from_od,
    tile_mean_dab,
)
from her2_kedro.imaging.pixels import foreground_mask
from her2_kedro.imaging.stain import dab_channel
from her2_kedro.imaging.tiling import TileRule, tile_index


def _dab(rgb: np.ndarray) -> np.ndarray:
    return dab_channel(rgb)


@pytest.fixture(scope="module")
def ihc() -> np.ndarray:
    return data.immunohistochemistry()


def test_max_mean_dab_hand_computed() -> None:
    dab = np.zeros((448, 672), dtype=np.float32)
    dab[0:112, 224:336] = 0.5  # a quarter of tile (224, 0) at 0.5 -> mean 0.125
    dab[224:448, 448:672] = 0.1  # tile (448, 224) uniform 0.1
    dab[224:448, 0:224] = 0.3  # tile (0, 224): strongest, but not listed below
    tiles = pd.DataFrame({"x": [224, 448], "y": [0, 224]})
    assert max_mean_dab(dab, tiles) == pytest.approx(0.125, abs=1e-12)
    np.testing.assert_allclose(tile_mean_dab(dab, tiles), [0.125, 0.1], atol=1e-7)
    # tiles=None: every full tile, as the authors' script does.
    assert max_mean_dab(dab, None) == pytest.approx(0.3, abs=1e-7)
    assert max_mean_dab(dab, np.array([[448, 224]])) == pytest.approx(0.1, abs=1e-7)


def test_max_mean_dab_nan_without_tiles() -> None:
    dab = np.ones((300, 300), dtype=np.float32)
    empty = pd.DataFrame({"x": pd.Series([], dtype=np.int32), "y": pd.Series([], dtype=np.int32)})
    assert math.isnan(max_mean_dab(dab, empty))
    assert math.isnan(max_mean_dab(np.ones((100, 100), np.float32), None))


def test_tile_outside_map_raises() -> None:
    with pytest.raises(ValueError):
        tile_mean_dab(np.zeros((300, 300), np.float32), pd.DataFrame({"x": [100], "y": [0]}))


def test_dab_units_are_decimal_od_over_six() -> None:
    """A pure-DAB pixel of decimal optical density OD reads OD / 6 in rgb2hed's DAB channel."""
    dab_vector = rgb_from_hed[2]
    for od in (0.2, 0.4, 0.6, 1.0):
        pixel = 10.0 ** (-od * dab_vector)  # transmitted light, I / I0
        value = rgb2hed(pixel[None, None, :])[0, 0, 2]
        assert value == pytest.approx(od * OD_TO_SKIMAGE_DAB, rel=1e-9)
    t = ThresholdConfig()
    assert (t.weak, t.moderate, t.strong) == pytest.approx((0.2 / 6, 0.4 / 6, 0.6 / 6))
    from_od = thresholds_from_od(0.2, 0.4, 0.6)
    assert (from_od.weak, from_od.moderate, from_od.strong) == pytest.approx(
        (0.2 / 6, 0.4 / 6, 0.1)
    )
    with pytest.raises(ValueError):
        ThresholdConfig(weak=0.1, moderate=0.05, strong=0.2)


def test_paper_descriptor_on_real_ihc_image(ihc: np.ndarray) -> None:
    """max_mean_dab on skimage's real DAB image matches a straightforward rgb2hed reference."""
    reference_dab = rgb2hed(ihc)[..., 2]  # float64, as in the authors' script
    n = ihc.shape[0] // 224
    means = [
        reference_dab[j * 224 : (j + 1) * 224, i * 224 : (i + 1) * 224].mean()
        for j in range(n)
        for i in range(ihc.shape[1] // 224)
    ]
    dab = _dab(ihc)
    assert max_mean_dab(dab, None) == pytest.approx(max(means), rel=1e-5)
    tiles, feats = core_features(ihc, "ihc")
    kept = [
        reference_dab[y : y + 224, x : x + 224].mean()
        for x, y in zip(tiles["x"], tiles["y"], strict=True)
        if foreground_mask(ihc[y : y + 224, x : x + 224]).mean() > 0.05
    ]
    assert len(kept) == len(tiles) == feats["n_tiles"] > 0
    assert feats["max_mean_dab"] == pytest.approx(max(kept), rel=1e-5)
    # This image is strongly DAB stained: the tile maximum is well inside the moderate range.
    assert 0.05 < feats["max_mean_dab"] < 0.2


def test_intensity_plus_on_real_image(ihc: np.ndarray) -> None:
    dab = _dab(ihc)
    mask = foreground_mask(ihc)
    tiles = tile_index(ihc, "ihc")
    feats = intensity_plus(dab, mask, tiles)
    tissue = rgb2hed(ihc)[..., 2][mask]
    assert feats["dab_mean"] == pytest.approx(tissue.mean(), rel=1e-5)
    for q in (50, 75, 90, 99):
        assert feats[f"dab_p{q}"] == pytest.approx(np.percentile(tissue, q), abs=PERCENTILE_BIN)
    assert feats["pos_frac_weak"] == pytest.approx(np.mean(tissue > 0.2 / 6), abs=1e-4)
    assert feats["dab_p50"] <= feats["dab_p75"] <= feats["dab_p90"] <= feats["dab_p99"]
    assert (
        1.0 >= feats["pos_frac_weak"] >= feats["pos_frac_moderate"] >= feats["pos_frac_strong"] >= 0
    )
    assert set(INTENSITY_PLUS_FEATURES) == set(feats)


def test_positive_fractions_monotone_in_thresholds(ihc: np.ndarray) -> None:
    dab = _dab(ihc)
    mask = foreground_mask(ihc)
    tiles = tile_index(ihc, "ihc")
    previous = 1.0
    for od in np.linspace(0.01, 1.5, 8):
        t = thresholds_from_od(od, od + 0.01, od + 0.02)
        frac = intensity_plus(dab, mask, tiles, t)["pos_frac_weak"]
        assert frac <= previous
        previous = frac
    assert previous < 0.05


def test_core_features_keys_and_no_tissue() -> None:
    white = np.full((500, 470, 3), 255, dtype=np.uint8)
    tiles, feats = core_features(white, "blank")
    assert tiles.empty and list(tiles.columns) == ["core_id", "x", "y", "tissue_fraction"]
    assert feats["core_id"] == "blank" and feats["n_tiles"] == 0
    assert math.isnan(feats["max_mean_dab"]) and math.isnan(feats["dab_p50"])
    assert PAPER_FEATURES == ["max_mean_dab"]
    assert set(PAPER_FEATURES) <= set(INTENSITY_PLUS_FEATURES) <= set(feats)


def test_core_features_reuses_dab_and_rule(ihc: np.ndarray) -> None:
    dab = _dab(ihc)
    rule = TileRule(tile_size=128, stride=128, offset=(10, 20))
    tiles, feats = core_features(ihc, "ihc", rule, dab=dab)
    pd.testing.assert_frame_equal(tiles, tile_index(ihc, "ihc", rule))
    assert feats["max_mean_dab"] == pytest.approx(max_mean_dab(dab, tiles, 128))
    with pytest.raises(ValueError):
        core_features(ihc, "ihc", dab=dab[:10])


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 250_001])
def test_histogram_percentiles_match_numpy_to_the_bin_width(n: int) -> None:
    """The fast percentiles equal np.percentile on the same DAB values to half a histogram bin."""
    rng = np.random.default_rng(n)
    rgb = rng.integers(0, 256, size=(1, n, 3), dtype=np.uint8)
    values = dab_channel(rgb).ravel()  # exact rgb2hed DAB values from the look-up table
    qs = (0, 1, 50, 75, 90, 99, 100)
    got = histogram_percentiles(values, qs)
    np.testing.assert_allclose(got, np.percentile(values, qs), rtol=0, atol=PERCENTILE_BIN / 2)


def test_histogram_percentiles_on_real_tissue(ihc: np.ndarray) -> None:
    tissue = _dab(ihc)[foreground_mask(ihc)]
    qs = (50, 75, 90, 99)
    got = histogram_percentiles(tissue, qs)
    np.testing.assert_allclose(got, np.percentile(tissue, qs), rtol=0, atol=PERCENTILE_BIN / 2)
    with pytest.raises(ValueError, match="no values"):
        histogram_percentiles(np.zeros(0, np.float32), qs)
