"""The pixel rules of imaging.pixels, and that every path into the project applies the same ones."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
import tifffile

from her2_kedro.imaging import pixels
from her2_kedro.imaging.tiling import TileRule, tile_index
from her2_kedro.tma.qc.images import check_image
from her2_kedro.tma.wsi import open_slide


def _core16(seed: int = 0, size: int = 300) -> np.ndarray:
    """A 16-bit RGB core: glass around a textured disk, with low bytes that 8-bit shifts lose."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 60000, np.uint16)
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2
    img[disk] = rng.integers(20000, 50000, size=(int(disk.sum()), 3), dtype=np.uint16)
    return img


@pytest.mark.parametrize("fmt", ["tif", "png"])
def test_a_16bit_core_gets_the_same_pixels_from_the_slide_reader_and_from_qc(tmp_path, fmt):
    core = _core16()
    path = tmp_path / f"core16.{fmt}"
    if fmt == "tif":
        tifffile.imwrite(path, core, photometric="rgb", tile=(128, 128))
    else:
        path.write_bytes(imagecodecs.png_encode(core))
    with open_slide(path) as reader:
        from_slide = reader.read_region((0, 0), 0, reader.dimensions)
    checked = check_image(path.read_bytes(), path.name)
    assert checked.ok, checked.reason
    np.testing.assert_array_equal(from_slide, checked.rgb)
    np.testing.assert_array_equal(checked.rgb, pixels.uint16_to_uint8(core))


def test_16bit_to_8bit_is_the_linear_map_rounded() -> None:
    values = np.arange(65536, dtype=np.uint16)
    got = pixels.uint16_to_uint8(values).astype(np.int64)
    assert np.array_equal(got, np.floor(values / 257 + 0.5).astype(np.int64))
    assert np.array_equal(
        pixels.to_rgb_uint8(values.reshape(256, 256))[..., 0], got.reshape(256, 256)
    )


def test_rgba_composited_on_white_the_same_everywhere() -> None:
    rgba = np.random.default_rng(1).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    out = pixels.to_rgb_uint8(rgba)
    alpha = rgba[..., 3:4].astype(float) / 255
    expected = np.floor(rgba[..., :3] * alpha + 255 * (1 - alpha) + 0.5)
    assert np.abs(out - expected).max() <= 1  # integer rounding of the same blend


@pytest.mark.parametrize("seed", range(4))
def test_blank_core_check_and_tile_index_count_tiles_alike(seed) -> None:
    rng = np.random.default_rng(seed)
    rgb = np.full((5 * 64 + 17, 4 * 64 + 9, 3), 240, np.uint8)
    for _ in range(6):  # sparse tissue specks of varied size: some tiles just over 5 %
        y, x = rng.integers(0, rgb.shape[0] - 20), rng.integers(0, rgb.shape[1] - 20)
        h, w = rng.integers(2, 20, size=2)
        rgb[y : y + h, x : x + w] = rng.integers(0, 200, 3)
    rule = TileRule(tile_size=64, stride=64, min_tissue=0.05)
    kept = tile_index(rgb, "c", rule)
    assert pixels.has_tissue_tile(rgb, 64, rule.background_grey, 0.05) == (not kept.empty)
    fractions = [
        pixels.tissue_fraction(rgb[y : y + 64, x : x + 64]) for x, y in kept[["x", "y"]].to_numpy()
    ]
    np.testing.assert_allclose(kept["tissue_fraction"], fractions, rtol=1e-6)


def test_fast_and_float_tissue_masks_agree_on_real_tissue() -> None:
    from skimage.data import immunohistochemistry

    ihc = immunohistochemistry()
    assert np.array_equal(pixels.foreground_mask(ihc), pixels.foreground_mask_fast(ihc))
