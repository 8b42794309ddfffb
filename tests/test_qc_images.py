"""Tests for her2_kedro.tma.qc.images: every rejection mode and every accepted conversion."""

from __future__ import annotations

import struct
import zlib
from io import BytesIO

import numpy as np
import pytest
from PIL import Image, ImageFile

from her2_kedro.config import ImageChecks
from her2_kedro.tma.qc.images import CheckedImage, check_image, has_tissue_tile

BACKGROUND = (236, 236, 243)
PARAMS = ImageChecks()


def make_core(size: int = 448, seed: int = 0) -> np.ndarray:
    """A light background with a darker textured disk, like a stained TMA core."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2
    texture = rng.integers(0, 60, size=(size, size, 3))
    tissue = np.array([150, 110, 90]) + texture
    img[disk] = np.clip(tissue[disk], 0, 255).astype(np.uint8)
    return img


def encode(arr: np.ndarray | Image.Image, fmt: str, **kwargs: object) -> bytes:
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def check(data: bytes, params: ImageChecks = PARAMS) -> CheckedImage:
    return check_image(data, "core.x", params)


def rejected(result: CheckedImage, *words: str) -> None:
    assert result.ok is False
    assert result.rgb is None
    for word in words:
        assert word.lower() in result.reason.lower(), result.reason


# --- accepted plain images -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_lossless_rgb_roundtrip(fmt: str) -> None:
    core = make_core()
    res = check(encode(core, fmt))
    assert res.ok, res.reason
    assert res.reason == ""
    assert res.converted is False
    assert res.format == fmt
    assert (res.width, res.height) == (448, 448)
    assert res.rgb is not None and res.rgb.dtype == np.uint8 and res.rgb.shape == (448, 448, 3)
    np.testing.assert_array_equal(res.rgb, core)


def test_jpeg_accepted() -> None:
    res = check(encode(make_core(), "JPEG", quality=90))
    assert res.ok and res.format == "JPEG" and not res.converted
    assert len(res.content_hash) == 64


def test_non_square_accepted() -> None:
    res = check(encode(make_core(448)[:230], "PNG"))
    assert res.ok and (res.width, res.height) == (448, 230)


# --- rejections ----------------------------------------------------------------------------


def test_empty_file() -> None:
    rejected(check(b""), "empty")


@pytest.mark.parametrize(
    "data", [b"hello, this is not an image", b"%PDF-1.4\n" + bytes(500), b"\x00" * 64]
)
def test_not_an_image(data: bytes) -> None:
    rejected(check(data), "not an image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_truncated(fmt: str) -> None:
    data = encode(make_core(), fmt)
    res = check(data[: len(data) * 2 // 3])
    rejected(res, "truncated")


def test_truncated_jpeg_rejected_even_if_global_flag_set() -> None:
    data = encode(make_core(), "JPEG")
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        rejected(check(data[: len(data) // 2]), "truncated")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    assert ImageFile.LOAD_TRUNCATED_IMAGES is previous


def test_corrupt_png_crc() -> None:
    data = bytearray(encode(make_core(), "PNG"))
    idat = data.find(b"IDAT")
    data[idat + 20] ^= 0xFF
    rejected(check(bytes(data)), "corrupt")


@pytest.mark.parametrize("fmt", ["GIF", "BMP"])
def test_unsupported_format(fmt: str) -> None:
    rejected(check(encode(make_core(), fmt)), "unsupported image format", fmt)


def test_too_small() -> None:
    rejected(check(encode(make_core(200), "PNG")), "too small", "200x200")
    rejected(check(encode(make_core(448)[:100], "PNG")), "too small")


def test_pixel_bomb_checked_before_decoding() -> None:
    params = ImageChecks(max_pixels=300 * 300)
    rejected(check(encode(make_core(), "PNG"), params), "pixel", "not decoded")


def forged_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_forged_header_bomb_not_decoded() -> None:
    rejected(check(forged_png_header(12000, 12000)), "pixel", "exceeds the limit of 100000000")


def test_pil_decompression_bomb_error_caught() -> None:
    # A PNG header claiming 40000 x 40000 pixels (above PIL's own hard limit) with no real data.
    res = check(forged_png_header(40000, 40000), ImageChecks(max_pixels=10**12))
    rejected(res, "pixel")


def test_blank_core() -> None:
    blank = np.empty((448, 448, 3), np.uint8)
    blank[:] = BACKGROUND
    rejected(check(encode(blank, "PNG")), "blank core", "no tissue")


def test_tiny_specks_are_blank() -> None:
    # Tissue under 5 % of every tile: still blank (paper's rule).
    img = np.empty((448, 448, 3), np.uint8)
    img[:] = BACKGROUND
    img[:10, :10] = 100  # 100 px of 50176 per tile
    rejected(check(encode(img, "PNG")), "blank")


def test_has_tissue_tile_threshold() -> None:
    img = np.full((224, 448, 3), 250, np.uint8)
    assert not has_tissue_tile(img)
    img[:, 224 : 224 + 12] = 50  # 12/224 = 5.4 % of the second tile
    assert has_tissue_tile(img)
    img[:, 224 + 11 :] = 250  # 11/224 = 4.9 %
    assert not has_tissue_tile(img)
    img2 = np.full((447, 447, 3), 250, np.uint8)
    img2[224:, 224:] = 50  # only a partial edge tile has tissue: dropped
    assert not has_tissue_tile(img2)


# --- conversions ---------------------------------------------------------------------------


def _grey_core() -> np.ndarray:
    return make_core()[..., 0].copy()


def test_grayscale_l() -> None:
    g = _grey_core()
    res = check(encode(g, "PNG"))
    assert res.ok and res.converted and "grayscale" in res.reason
    assert res.rgb is not None
    np.testing.assert_array_equal(res.rgb[..., 1], g)


def test_rgba_composited_on_white() -> None:
    core = make_core()
    rgba = np.dstack([core, np.full(core.shape[:2], 255, np.uint8)])
    rgba[:50, :50, 3] = 0  # transparent corner becomes white
    rgba[:50, :50, :3] = 0
    res = check(encode(rgba, "PNG"))
    assert res.ok and res.converted and "RGBA" in res.reason
    assert res.rgb is not None
    assert (res.rgb[:50, :50] == 255).all()
    np.testing.assert_array_equal(res.rgb[200:250, 200:250], core[200:250, 200:250])


def test_la_composited() -> None:
    g = _grey_core()
    la = Image.fromarray(np.dstack([g, np.full_like(g, 255)]), "LA")
    res = check(encode(la, "PNG"))
    assert res.ok and res.converted and "LA" in res.reason


def test_palette() -> None:
    pal = Image.fromarray(make_core()).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    res = check(encode(pal, "PNG"))
    assert res.ok and res.converted and "palette" in res.reason
    assert res.rgb is not None
    np.testing.assert_array_equal(res.rgb, np.asarray(pal.convert("RGB")))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grayscale(fmt: str) -> None:
    g16 = _grey_core().astype(np.uint16) * 257
    g16[0, 0] = 65535
    g16[0, 1] = 0
    res = check(encode(Image.fromarray(g16), fmt))
    assert res.ok, res.reason
    assert res.converted and "16-bit" in res.reason
    assert res.rgb is not None
    assert res.rgb[0, 0].tolist() == [255, 255, 255]
    assert res.rgb[0, 1].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(res.rgb[1:, :, 0], _grey_core()[1:])


def test_16bit_rgb_tiff_read_with_full_precision() -> None:
    tifffile = pytest.importorskip("tifffile")
    core16 = make_core().astype(np.uint16) * 257
    core16[0, 0] = (65535, 0, 32896)
    buf = BytesIO()
    tifffile.imwrite(buf, core16, photometric="rgb")
    res = check(buf.getvalue())
    assert res.ok, res.reason
    assert res.converted and "16-bit" in res.reason and res.format == "TIFF"
    assert res.rgb is not None
    assert res.rgb[0, 0].tolist() == [255, 0, 128]
    np.testing.assert_array_equal(res.rgb[1:], make_core()[1:])


def test_float_grayscale_tiff() -> None:
    g = _grey_core().astype(np.float32) * 10.0 - 500.0  # arbitrary range: min-max stretched
    res = check(encode(Image.fromarray(g, "F"), "TIFF"))
    assert res.ok, res.reason
    assert res.converted and "float" in res.reason and "min-max" in res.reason
    assert res.rgb is not None and res.rgb.min() == 0 and res.rgb.max() == 255


def test_cmyk_jpeg() -> None:
    cmyk = Image.fromarray(make_core()).convert("CMYK")
    res = check(encode(cmyk, "JPEG", quality=95))
    assert res.ok and res.converted and "CMYK" in res.reason
    assert res.rgb is not None
    assert np.abs(res.rgb.astype(int) - make_core().astype(int)).mean() < 10


def test_multiframe_tiff_first_frame() -> None:
    first, second = Image.fromarray(make_core(seed=1)), Image.fromarray(make_core(seed=2))
    buf = BytesIO()
    first.save(buf, "TIFF", save_all=True, append_images=[second])
    res = check(buf.getvalue())
    assert res.ok and res.converted and "first of 2 frames" in res.reason
    assert res.rgb is not None
    np.testing.assert_array_equal(res.rgb, make_core(seed=1))


# --- duplicates by content -----------------------------------------------------------------


def test_hash_by_content() -> None:
    core = make_core()
    a = check(encode(core, "PNG"))
    b = check(encode(core, "PNG", compress_level=1))
    c = check(encode(core, "TIFF"))
    d = check(encode(make_core(seed=5), "PNG"))
    assert a.content_hash == b.content_hash == c.content_hash
    assert a.content_hash != d.content_hash
    e = check(encode(core[:, :440], "PNG"))
    assert e.content_hash != a.content_hash


def test_16bit_rgb_png_flagged_converted() -> None:
    core16 = make_core().astype(">u2") * 257
    raw = b"".join(b"\x00" + row.tobytes() for row in core16)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", 448, 448, 16, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    res = check(png)
    assert res.ok and res.converted and "16-bit" in res.reason
    assert res.rgb is not None
    np.testing.assert_array_equal(res.rgb, make_core())


def test_png_missing_iend_is_truncated() -> None:
    data = encode(make_core(), "PNG")
    rejected(check(data[:-2]), "truncated")


def test_trailing_bytes_after_image_accepted() -> None:
    assert check(encode(make_core(), "JPEG") + b"trailer").ok


def test_importing_histomicstk_keeps_pillows_bomb_guard() -> None:
    # HistomicsTK and large_image switch the guard off at import; the project puts it back.
    import subprocess
    import sys

    code = (
        "from PIL import Image; before = Image.MAX_IMAGE_PIXELS; "
        "import her2_kedro.imaging.normalisation, her2_kedro.imaging.stain; "
        "her2_kedro.imaging.stain.stain_matrix('histomicstk_hdab'); "
        "assert Image.MAX_IMAGE_PIXELS == before is not None, Image.MAX_IMAGE_PIXELS"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _flip_entropy_bytes(jpeg: bytes, n: int = 8) -> bytes:
    """Flip bits of ``n`` bytes in the middle of the entropy-coded scan (no truncation)."""
    data = bytearray(jpeg)
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    end = data.rfind(b"\xff\xd9")
    flipped = 0
    for i in range(start + (end - start) // 2, end, 97):
        if data[i] != 0xFF and data[i] ^ 0x5A != 0xFF and data[i - 1] != 0xFF:
            data[i] ^= 0x5A
            flipped += 1
        if flipped == n:
            break
    assert flipped == n and len(data) == len(jpeg)
    return bytes(data)


def test_jpeg_with_bit_flips_mid_stream_is_rejected_as_corrupt() -> None:
    from skimage.data import immunohistochemistry

    ihc = immunohistochemistry()  # a real DAB-stained section, 512 x 512
    good = encode(ihc, "JPEG", quality=90)
    bad = _flip_entropy_bytes(good)
    # PIL alone decodes the corrupt scan without complaint: that was the defect
    Image.open(BytesIO(bad)).load()
    assert check(good).ok
    rejected(check(bad), "corrupt JPEG data", "decoder warning")


def test_sixteen_bit_png_keeps_full_depth() -> None:
    """Full 16-bit samples, scaled by 1/257 like every 16-bit input (not PIL's high byte)."""
    rng = np.random.default_rng(4)
    core16 = make_core().astype(np.uint16) * 257 + rng.integers(0, 257, (448, 448, 3)).astype(
        np.uint16
    )
    import imagecodecs

    res = check(imagecodecs.png_encode(core16))
    assert res.ok and res.reason == "converted from 16-bit colour PNG (scaled by 1/257)"
    expected = ((core16.astype(np.uint32) + 128) // 257).astype(np.uint8)
    np.testing.assert_array_equal(res.rgb, expected)
