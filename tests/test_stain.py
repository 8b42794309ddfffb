"""Colour deconvolution equals scikit-image's rgb2hed, only faster; bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data
from skimage.color import rgb2hed, separate_stains

from her2_kedro.imaging.stain import (
    STAIN_MATRIX_NAMES,
    dab_channel,
    deconvolve,
    rgb_to_hed,
    separation_matrix,
    stain_channel,
    stain_matrix,
)


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.shape == want.shape
    # 1e-3 relative, or 1e-4 absolute where values are ~0
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def ihc() -> np.ndarray:
    return data.immunohistochemistry()


@pytest.fixture(scope="module")
def random_rgb() -> np.ndarray:
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, size=(97, 131, 3), dtype=np.uint8)
    img[0, :, :] = np.arange(131, dtype=np.uint8)[:, None]
    img[1, :, :] = (np.arange(131) + 125).astype(np.uint8)[:, None]  # every value 0..255 appears
    for c in range(3):
        assert len(np.unique(img[..., c])) == 256
    return img


@pytest.mark.parametrize("use_rgb24", [True, False])
def test_dab_channel_matches_rgb2hed(
    ihc: np.ndarray, random_rgb: np.ndarray, use_rgb24: bool
) -> None:
    for img in (ihc, random_rgb):
        _assert_close(dab_channel(img, use_rgb24=use_rgb24), rgb2hed(img)[..., 2])


def test_rgb_to_hed_matches_rgb2hed(ihc: np.ndarray, random_rgb: np.ndarray) -> None:
    for img in (ihc, random_rgb):
        _assert_close(rgb_to_hed(img), rgb2hed(img).astype(np.float64))


def test_views_small_chunks_and_haematoxylin(ihc: np.ndarray) -> None:
    view = ihc[3::2, 7:301]  # non-contiguous input, last chunk shorter than the others
    want = rgb2hed(np.ascontiguousarray(view))
    _assert_close(dab_channel(view, chunk_rows=17, use_rgb24=True), want[..., 2])
    contiguous = np.ascontiguousarray(view)  # exercises the copy-free path of the big table
    _assert_close(dab_channel(contiguous, chunk_rows=17, use_rgb24=True), want[..., 2])
    _assert_close(rgb_to_hed(view, chunk_rows=17), want)
    _assert_close(stain_channel(view, 0), want[..., 0])


@pytest.mark.parametrize("name", STAIN_MATRIX_NAMES)
def test_named_matrices_match_separate_stains(random_rgb: np.ndarray, name: str) -> None:
    w = stain_matrix(name)
    assert w.shape == (3, 3)
    want = separate_stains(random_rgb, np.linalg.inv(w).T)
    _assert_close(deconvolve(random_rgb, w), want)
    _assert_close(dab_channel(random_rgb, w), want[..., 2])


def test_default_separation_is_skimage_constant() -> None:
    from skimage.color.colorconv import hed_from_rgb

    assert np.array_equal(separation_matrix(None), hed_from_rgb)
    np.testing.assert_allclose(
        separation_matrix(stain_matrix("skimage_hed")), hed_from_rgb, atol=1e-12
    )


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        dab_channel(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="float64"):
        rgb_to_hed(np.zeros((4, 4, 3), np.float64))
    with pytest.raises(ValueError, match=r"\(4, 4, 4\)"):
        rgb_to_hed(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="singular"):
        deconvolve(np.zeros((4, 4, 3), np.uint8), np.ones((3, 3)))
    with pytest.raises(ValueError, match="unknown stain matrix"):
        stain_matrix("nope")


def test_empty_image() -> None:
    assert dab_channel(np.zeros((0, 5, 3), np.uint8)).shape == (0, 5)
    assert rgb_to_hed(np.zeros((5, 0, 3), np.uint8)).shape == (5, 0, 3)


def test_matches_rgb2hed_on_synthetic_cores_of_every_score() -> None:
    from her2_kedro.synthetic.optics import EXTERNAL_STAINS
    from her2_kedro.synthetic.render import CoreSpec, render_core

    for score in range(4):
        for stains in ({}, {"stains": EXTERNAL_STAINS}):
            spec = CoreSpec(
                ihc_score=score,
                her2_status=int(score == 3),
                status_cue=False,
                size=336,
                cell_diameter_px=18,
                **stains,
            )
            rgb = render_core(spec, np.random.default_rng(score))
            expected = rgb2hed(rgb).astype(np.float32)
            np.testing.assert_allclose(dab_channel(rgb), expected[..., 2], rtol=1e-3, atol=1e-6)
            np.testing.assert_allclose(rgb_to_hed(rgb), expected, rtol=1e-3, atol=1e-6)
