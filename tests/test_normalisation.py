"""Macenko estimation recovers known stain vectors; normalisation moves images onto a target."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from her2_kedro.imaging.normalisation import normalise
from her2_kedro.imaging.pixels import foreground_mask
from her2_kedro.imaging.stain_vectors import (
    REFERENCE_DAB,
    REFERENCE_HAEMATOXYLIN,
    StainEstimationError,
    StainVectors,
    angle_degrees,
    check_stain_vectors,
    estimate_stain_vectors,
)
from her2_kedro.reporting.plots import preview_figure

EXTERNAL_H = (0.55, 0.78, 0.30)
EXTERNAL_D = (0.20, 0.50, 0.84)
INTERNAL_H = (0.65, 0.70, 0.29)
INTERNAL_D = (0.27, 0.57, 0.78)


def render(
    h: tuple[float, float, float],
    d: tuple[float, float, float],
    shape: tuple[int, int] = (96, 96),
    seed: int = 0,
) -> np.ndarray:
    """Beer-Lambert image I = 255 exp(-(c_h h + c_d d)) with varied mixtures and glass at the top."""
    rng = np.random.default_rng(seed)
    hu = np.asarray(h) / np.linalg.norm(h)
    du = np.asarray(d) / np.linalg.norm(d)
    n = shape[0] * shape[1]
    c_h = rng.uniform(0.2, 1.4, n)
    c_d = rng.uniform(0.2, 1.4, n)
    kind = rng.uniform(size=n)
    c_d[kind < 0.25] = 0.0  # pure haematoxylin
    c_h[(kind >= 0.25) & (kind < 0.5)] = 0.0  # pure DAB
    c_h *= rng.uniform(0.0, 1.0, n) ** 0.5  # varied mixtures
    od = c_h[:, None] * hu + c_d[:, None] * du
    img = 255.0 * np.exp(-od) + rng.normal(0, 0.6, (n, 3))
    img = img.reshape(shape + (3,))
    img[: shape[0] // 5] = 246.0 + rng.normal(0, 1.5, (shape[0] // 5, shape[1], 3))  # glass
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _tiles(h, d, k: int = 4) -> list[np.ndarray]:
    return [render(h, d, seed=s) for s in range(k)]


def test_macenko_recovers_known_vectors() -> None:
    for h, d in ((INTERNAL_H, INTERNAL_D), (EXTERNAL_H, EXTERNAL_D)):
        v = estimate_stain_vectors(_tiles(h, d))
        err_h = angle_degrees(v.haematoxylin, h)
        err_d = angle_degrees(v.dab, d)
        print(f"Macenko angle errors: H {err_h:.2f} deg, DAB {err_d:.2f} deg")
        assert err_h < 5.0 and err_d < 5.0
        assert v.max_concentrations is not None and all(x > 0 for x in v.max_concentrations)
        assert np.allclose(np.linalg.norm(v.matrix(), axis=0), 1.0)
        fixed, notes = check_stain_vectors(v)
        assert notes == [] and fixed == v


def test_stack_input_and_json_round_trip() -> None:
    v = estimate_stain_vectors(np.stack(_tiles(INTERNAL_H, INTERNAL_D, 2)))
    again = StainVectors.from_dict(json.loads(json.dumps(v.to_dict())))
    assert again == v
    with pytest.raises(ValueError, match="version"):
        StainVectors.from_dict({**v.to_dict(), "version": 99})


def test_swapped_vectors_are_fixed() -> None:
    v = StainVectors(INTERNAL_D, INTERNAL_H, max_concentrations=(1.0, 2.0))
    fixed, notes = check_stain_vectors(v)
    assert angle_degrees(fixed.haematoxylin, INTERNAL_H) < 1e-6
    assert angle_degrees(fixed.dab, INTERNAL_D) < 1e-6
    assert fixed.max_concentrations == (2.0, 1.0)
    assert any("swapped" in n for n in notes)


def test_implausible_vector_reported_and_replaced() -> None:
    magenta = (0.9, 0.1, 0.9)  # absorbs red and blue equally: not a DAB brown
    v = StainVectors(INTERNAL_H, magenta)
    fixed, notes = check_stain_vectors(v)
    assert any("DAB" in n and "degrees" in n for n in notes)
    assert any("fell back" in n for n in notes)
    assert angle_degrees(fixed.dab, REFERENCE_DAB) < 1e-6
    kept, notes2 = check_stain_vectors(v, fallback=False)
    assert angle_degrees(kept.dab, magenta) < 1e-6 and notes2


@pytest.mark.parametrize(
    "image, message",
    [
        (np.full((64, 64, 3), 250, np.uint8), "foreground pixels"),  # blank glass
        (np.full((64, 64, 3), (120, 80, 60), np.uint8), "same colour"),  # one colour only
        (np.full((64, 64, 3), 215, np.uint8), "optical density"),  # too faint
    ],
)
def test_degenerate_input_raises_without_nan_warnings(image: np.ndarray, message: str) -> None:
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        with pytest.raises(StainEstimationError, match=message):
            estimate_stain_vectors([image, image])


def test_empty_tile_list_and_bad_dtype() -> None:
    with pytest.raises(StainEstimationError):
        estimate_stain_vectors([])
    with pytest.raises(ValueError, match="float32"):
        estimate_stain_vectors([np.zeros((8, 8, 3), np.float32)])


def test_normalise_moves_external_stain_to_target() -> None:
    target = estimate_stain_vectors(_tiles(INTERNAL_H, INTERNAL_D))
    img = render(EXTERNAL_H, EXTERNAL_D, shape=(128, 128), seed=11)
    for source in (None, estimate_stain_vectors(img)):
        out = normalise(img, source, target)
        assert out.dtype == np.uint8 and out.shape == img.shape
        background = ~foreground_mask(img)
        assert background.any()
        assert np.array_equal(out[background], img[background])
        v = estimate_stain_vectors(out)
        err_h = angle_degrees(v.haematoxylin, target.haematoxylin)
        err_d = angle_degrees(v.dab, target.dab)
        print(f"after normalisation: H {err_h:.2f} deg, DAB {err_d:.2f} deg from target")
        assert err_h < 3.0 and err_d < 3.0
        before_h = angle_degrees(estimate_stain_vectors(img).haematoxylin, target.haematoxylin)
        assert err_h < before_h


def test_normalise_blank_and_bad_input() -> None:
    target = StainVectors(REFERENCE_HAEMATOXYLIN, REFERENCE_DAB)
    blank = np.full((16, 16, 3), 250, np.uint8)
    assert np.array_equal(normalise(blank, target, target), blank)
    with pytest.raises(ValueError, match="uint16"):
        normalise(blank.astype(np.uint16), target, target)


def test_preview_figure() -> None:
    tiles = _tiles(INTERNAL_H, INTERNAL_D, 3)
    fig = preview_figure(tiles, tiles, "stain normalisation")
    assert len(fig.axes) == 6
    fig.canvas.draw()  # Agg canvas: renders without a display
    pixels = np.asarray(fig.canvas.buffer_rgba())
    assert pixels.shape[2] == 4 and pixels[..., :3].std() > 0  # something was drawn
    assert [ax.get_ylabel() for ax in fig.axes[::3]] == ["before", "after"]
    with pytest.raises(ValueError):
        preview_figure(tiles, tiles[:1], "x")


@pytest.mark.parametrize("match_dab", [False, True])
def test_fast_path_matches_histomicstk(match_dab: bool) -> None:
    target = estimate_stain_vectors(_tiles(INTERNAL_H, INTERNAL_D))
    img = render(EXTERNAL_H, EXTERNAL_D, shape=(80, 90), seed=5)
    source = estimate_stain_vectors(img)
    fast = normalise(img, source, target, match_dab=match_dab, chunk_rows=13)
    ref = normalise(img, source, target, match_dab=match_dab, method="histomicstk")
    diff = np.abs(fast.astype(int) - ref.astype(int))
    assert diff.max() <= 1  # HistomicsTK truncates to uint8, the fast path rounds


def test_identity_normalisation_keeps_image() -> None:
    img = render(INTERNAL_H, INTERNAL_D, shape=(64, 64), seed=3)
    v = estimate_stain_vectors(img)
    out = normalise(img, v, v, match_haematoxylin=False)
    assert np.array_equal(out, img)  # deconvolve + reconvolve with the same vectors is exact


def test_dab_scale_multiplies_the_dab_amount_only() -> None:
    from her2_kedro.imaging.normalisation import cohort_dab_scale
    from her2_kedro.imaging.stain_vectors import concentration_percentiles, sda_of_pixels

    img = render(INTERNAL_H, INTERNAL_D, shape=(64, 64), seed=3)
    v = estimate_stain_vectors(img)
    mask = foreground_mask(img)
    doubled = normalise(img, v, v, match_haematoxylin=False, dab_scale=2.0)
    h0, d0 = concentration_percentiles(sda_of_pixels(img[mask]), v.matrix(), 50.0)
    h1, d1 = concentration_percentiles(sda_of_pixels(doubled[mask]), v.matrix(), 50.0)
    assert d1 / d0 == pytest.approx(2.0, rel=0.1) and h1 / h0 == pytest.approx(1.0, rel=0.05)

    source = StainVectors(v.haematoxylin, v.dab, max_concentrations=(40.0, 60.0))
    target = StainVectors(v.haematoxylin, v.dab, max_concentrations=(40.0, 90.0))
    assert cohort_dab_scale(source, target) == pytest.approx(1.5)
    assert cohort_dab_scale(StainVectors(v.haematoxylin, v.dab), target) == 1.0
    assert cohort_dab_scale(None, target) == 1.0
