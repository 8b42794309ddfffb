"""Tests of the whole-slide reader layer (her2_kedro.tma.wsi)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import slide_factory as sf  # noqa: E402

from her2_kedro.tma import wsi  # noqa: E402
from her2_kedro.tma.wsi import (  # noqa: E402
    OpenSlideReader,
    PILSlideReader,
    SlideReader,
    SlideReadError,
    SlideTooLarge,
    TiffSlideReader,
    open_slide,
    to_rgb_uint8,
)


@pytest.fixture(scope="module")
def scene() -> sf.Scene:
    return sf.make_tma(3, 4, pitch=160, diameter=110, seed=3)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory, scene: sf.Scene) -> Path:
    p = tmp_path_factory.mktemp("wsi") / "slide.tif"
    sf.write_pyramidal_tiff(scene, p, n_levels=3, compression="zlib")
    return p


@pytest.fixture(scope="module")
def png_slide(tmp_path_factory: pytest.TempPathFactory, scene: sf.Scene) -> Path:
    p = tmp_path_factory.mktemp("wsi") / "slide.png"
    sf.write_plain(scene, p)
    return p


def test_pyramidal_tiff_opens_with_tiffslide(pyramid: Path, scene: sf.Scene) -> None:
    with open_slide(pyramid) as r:
        assert isinstance(r, TiffSlideReader)
        assert isinstance(r, SlideReader)
        assert r.level_count == 3
        assert r.dimensions == (scene.width, scene.height)
        assert r.level_dimensions[1] == (scene.width // 2, scene.height // 2)
        assert r.level_downsamples[0] == 1.0 and r.level_downsamples[2] == pytest.approx(
            4, rel=0.01
        )
        reg = r.read_region((100, 50), 0, (64, 32))
        assert reg.dtype == np.uint8 and reg.shape == (32, 64, 3)
        # lossless zlib: level 0 equals the rendered scene
        np.testing.assert_array_equal(reg, sf.render(scene, 100, 50, 64, 32))


def test_read_region_level_uses_level0_location(pyramid: Path, scene: sf.Scene) -> None:
    with open_slide(pyramid) as r:
        ds = r.level_downsamples[1]
        reg = r.read_region((200, 120), 1, (50, 40))
        assert reg.shape == (40, 50, 3)
        lx, ly = int(200 // ds), int(120 // ds)  # level-0 location -> level px (floor)
        expected = sf.render(scene, lx, ly, 50, 40, ds=scene.width / (scene.width // 2))
        np.testing.assert_array_equal(reg, expected)


def test_read_region_pads_with_white_at_edges(pyramid: Path, scene: sf.Scene) -> None:
    w, h = scene.width, scene.height
    with open_slide(pyramid) as r:
        reg = r.read_region((-10, -20), 0, (30, 40))
        assert reg.shape == (40, 30, 3)
        assert np.all(reg[:20] == 255) and np.all(reg[:, :10] == 255)
        np.testing.assert_array_equal(reg[20:, 10:], sf.render(scene, 0, 0, 20, 20))
        reg = r.read_region((w - 5, h - 5), 0, (20, 20))
        assert np.all(reg[5:] == 255) and np.all(reg[:, 5:] == 255)
        assert not np.all(reg[:5, :5] == 255)
        far = r.read_region((w + 100, h + 100), 0, (8, 8))
        assert far.shape == (8, 8, 3) and np.all(far == 255)
        empty = r.read_region((0, 0), 0, (0, 5))
        assert empty.shape == (5, 0, 3)


def test_thumbnail_reads_low_level_only(pyramid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int, int, int]] = []
    orig = TiffSlideReader._read_level

    def spy(self: TiffSlideReader, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        calls.append((level, x, y, w, h))
        return orig(self, level, x, y, w, h)

    monkeypatch.setattr(TiffSlideReader, "_read_level", spy)
    with open_slide(pyramid) as r:
        calls.clear()
        thumb, ds = r.thumbnail(150)
        w0, h0 = r.dimensions
        assert max(thumb.shape[:2]) == 150 and thumb.dtype == np.uint8
        assert ds == pytest.approx(max(w0, h0) / 150, rel=0.02)
        assert calls and all(c[0] == 2 for c in calls)  # smallest level with long side >= 150
        calls.clear()
        r.thumbnail(max(r.level_dimensions[1]))  # exactly level 1's size: level 1, no level 0
        assert calls and all(c[0] == 1 for c in calls)
        calls.clear()
        big, ds_big = r.thumbnail(10 * max(w0, h0))  # larger than the slide: level 0, unscaled
        assert big.shape[:2] == (h0, w0) and ds_big == 1.0


def test_thumbnail_of_flat_tiff_is_strip_bounded(
    tmp_path: Path, scene: sf.Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "flat.tif"
    sf.write_flat_tiff(scene, p, rows_per_strip=16)
    with open_slide(p) as r:
        assert r.level_count == 1
        ref, _ = r.thumbnail(200)  # small enough for the whole-level path
    monkeypatch.setattr(wsi, "_WHOLE_LEVEL_BYTES", 10_000)
    monkeypatch.setattr(wsi, "_STRIP_BYTES", 200_000)
    sizes: list[int] = []
    orig = TiffSlideReader._read_level

    def spy(self: TiffSlideReader, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        sizes.append(w * h * 3)
        return orig(self, level, x, y, w, h)

    monkeypatch.setattr(TiffSlideReader, "_read_level", spy)
    with open_slide(p) as r:
        sizes.clear()
        thumb, ds = r.thumbnail(200)
    assert len(sizes) > 3 and max(sizes) <= 200_000
    assert thumb.shape == ref.shape
    assert np.abs(thumb.astype(int) - ref.astype(int)).mean() < 6


def test_png_slide_uses_pil(png_slide: Path, scene: sf.Scene) -> None:
    with open_slide(png_slide) as r:
        assert isinstance(r, PILSlideReader)
        assert r.level_count == 1 and r.dimensions == (scene.width, scene.height)
        np.testing.assert_array_equal(
            r.read_region((30, 40), 0, (25, 15)), sf.render(scene, 30, 40, 25, 15)
        )
        reg = r.read_region((-3, -3), 0, (6, 6))
        assert np.all(reg[:3] == 255)
        thumb, ds = r.thumbnail(100)
        assert max(thumb.shape[:2]) == 100


def test_jpeg_thumbnail_uses_draft_without_full_decode(tmp_path: Path, scene: sf.Scene) -> None:
    p = tmp_path / "slide.jpg"
    sf.write_plain(scene, p)
    with open_slide(p) as r:
        assert isinstance(r, PILSlideReader)
        thumb, _ = r.thumbnail(120)
        assert max(thumb.shape[:2]) == 120
        assert r._full is None  # the full-resolution image was never decoded
        reg = r.read_region((0, 0), 0, (10, 10))
        assert reg.shape == (10, 10, 3)


def test_plain_slide_above_the_memory_bound_is_refused_with_how_to_convert(
    png_slide: Path,
) -> None:
    w, h = Image.open(png_slide).size
    limit = w * h - 1
    with pytest.raises(SlideTooLarge) as ei:
        open_slide(png_slide, max_pixels=limit)
    message = str(ei.value)
    assert png_slide.name in message and f"{w}x{h}" in message
    assert f"ingestion.dearray.max_slide_pixels = {limit}" in message
    assert "vips tiffsave" in message and "--tile --pyramid" in message


def test_small_plain_slides_still_read_whole(png_slide: Path, scene: sf.Scene, tmp_path) -> None:
    w, h = Image.open(png_slide).size
    with open_slide(png_slide, max_pixels=w * h) as r:
        assert isinstance(r, PILSlideReader)
        np.testing.assert_array_equal(r.read_region((0, 0), 0, (w, h)), sf.render_full(scene))
        thumb, _ = r.thumbnail(200)
        assert max(thumb.shape[:2]) == 200
    jpg = tmp_path / "slide.jpg"
    sf.write_plain(scene, jpg)
    with open_slide(jpg, max_pixels=w * h) as r:  # decoded like PIL does, pixel for pixel
        np.testing.assert_array_equal(
            r.read_region((0, 0), 0, (w, h)), np.asarray(Image.open(jpg).convert("RGB"))
        )


def test_flat_tiff_in_one_huge_strip_is_refused(
    tmp_path: Path, scene: sf.Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "flat.tif"
    sf.write_flat_tiff(scene, p, rows_per_strip=scene.height)
    monkeypatch.setattr(wsi, "MAX_CHUNK_BYTES", 1024)
    with pytest.raises(SlideTooLarge, match="stored in chunks") as ei:
        open_slide(p)
    assert "flat.tif" in str(ei.value) and "vips tiffsave" in str(ei.value)


def test_pil_bomb_guard_is_scoped_not_switched_off(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    p = tmp_path / "big.png"
    Image.new("RGB", (1200, 1000), (200, 150, 180)).save(p)
    Image.MAX_IMAGE_PIXELS = 500_000  # the slide exceeds the global guard ...
    try:
        with open_slide(p, max_pixels=2_000_000) as r:  # ... but not the slide limit
            assert r.read_region((0, 0), 0, (4, 4)).shape == (4, 4, 3)
            assert Image.MAX_IMAGE_PIXELS == 500_000  # restored between reads
            with wsi.pil_pixel_limit(2_000_000):
                assert Image.MAX_IMAGE_PIXELS == 2_000_000  # raised, never None
        assert Image.MAX_IMAGE_PIXELS == 500_000
        with pytest.raises(Image.DecompressionBombError):
            Image.open(p)  # 1.2 M pixels > 2 x 500 k: the global guard still refuses it
    finally:
        Image.MAX_IMAGE_PIXELS = before


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.svs"
    with pytest.raises(SlideReadError, match="does not exist") as ei:
        open_slide(p)
    assert "nope.svs" in str(ei.value)


def test_text_file_renamed_svs(tmp_path: Path) -> None:
    p = tmp_path / "fake.svs"
    p.write_text("this is not a slide\n" * 20)
    with pytest.raises(SlideReadError) as ei:
        open_slide(p)
    assert "fake.svs" in str(ei.value) and "tiffslide" in str(ei.value)


def test_truncated_tiff(tmp_path: Path, pyramid: Path) -> None:
    data = pyramid.read_bytes()
    p = tmp_path / "truncated.tif"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError) as ei:
        with open_slide(p) as r:  # if opening succeeds, reading must fail cleanly
            r.thumbnail(64)
            r.read_region((0, 0), 0, r.dimensions)
    assert "truncated.tif" in str(ei.value)


@pytest.mark.parametrize(
    "name,content", [("empty.tif", b""), ("junk.png", b"\x89PNG garbage"), ("odd.xyz", b"hello")]
)
def test_corrupt_or_unsupported(tmp_path: Path, name: str, content: bytes) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(SlideReadError) as ei:
        open_slide(p)
    assert name in str(ei.value)


def test_openslide_fallback_when_tiffslide_rejects(
    tmp_path: Path, scene: sf.Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "generic.tif"
    tifffile.imwrite(
        p, sf.render_full(scene), tile=(256, 256), photometric="rgb", compression="zlib"
    )

    def reject(self: TiffSlideReader, path: Path) -> None:
        raise tifffile.TiffFileError("pretend tiffslide cannot read this")

    monkeypatch.setattr(TiffSlideReader, "__init__", reject)
    with open_slide(p) as r:
        assert isinstance(r, OpenSlideReader)
        np.testing.assert_array_equal(
            r.read_region((10, 10), 0, (20, 20)), sf.render(scene, 10, 10, 20, 20)
        )
        assert np.all(r.read_region((-4, 0), 0, (8, 8))[:, :4] == 255)


def test_closed_reader_raises(pyramid: Path) -> None:
    r = open_slide(pyramid)
    r.close()
    with pytest.raises(SlideReadError, match="closed"):
        r.read_region((0, 0), 0, (4, 4))


def test_to_rgb_uint8_conversions() -> None:
    grey = np.full((2, 3), 7, np.uint8)
    assert to_rgb_uint8(grey).shape == (2, 3, 3)
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 1] = (10, 20, 30, 255)
    out = to_rgb_uint8(rgba)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (10, 20, 30)
    u16 = np.full((1, 1, 3), 65535, np.uint16)
    assert to_rgb_uint8(u16).dtype == np.uint8 and to_rgb_uint8(u16)[0, 0, 0] == 255


def test_rgba_png_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((20, 30, 4), np.uint8)
    arr[5:10, 5:10] = (50, 60, 70, 255)
    p = tmp_path / "alpha.png"
    Image.fromarray(arr, "RGBA").save(p)
    with open_slide(p) as r:
        reg = r.read_region((0, 0), 0, (30, 20))
    assert np.all(reg[0, 0] == 255) and tuple(reg[7, 7]) == (50, 60, 70)
