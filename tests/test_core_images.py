"""Whole cores downscaled for the ResNet core classifier: draft-mode JPEG decoding, format
fallbacks, and the batch dataset (labels, eval order, five-class training draws, flips, transform,
cache). Tiny images only."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, JpegImagePlugin

from her2_kedro.modelling.core_images import (
    CoreBatch,
    CoreImageDataset,
    CoreImageError,
    decode_downscaled,
)
from her2_kedro.modelling.sampling import FiveClassSampler
from her2_kedro.schema import FIVE_CLASSES, SCORE_OF_CLASS

SIZE = 16


def _encode(rgb: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return buf.getvalue()


def _red_blue(width: int = 800, height: int = 600) -> np.ndarray:
    """Left half red, right half blue."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, : width // 2, 0] = 255
    rgb[:, width // 2 :, 2] = 255
    return rgb


@pytest.fixture
def draft_calls(monkeypatch):
    """Spy on JPEG draft mode: records (requested size, image size after the call)."""
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        calls.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


def test_jpeg_decodes_to_square_size_and_keeps_layout(draft_calls) -> None:
    out = decode_downscaled(_encode(_red_blue(), "JPEG", quality=95), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    left, right = out[:, :24].astype(int), out[:, 40:].astype(int)
    assert (left[..., 0] > 200).all() and (left[..., 2] < 60).all()
    assert (right[..., 2] > 200).all() and (right[..., 0] < 60).all()
    # draft mode asked libjpeg for 1/8 scale: 800x600 -> 100x75, still >= 64 on both sides
    assert draft_calls == [((64, 64), (100, 75))]


def test_draft_never_goes_below_the_requested_size(draft_calls) -> None:
    out = decode_downscaled(_encode(_red_blue(300, 300), "JPEG"), 100)
    assert out.shape == (100, 100, 3)
    assert draft_calls == [((100, 100), (150, 150))]  # 1/2 scale; 1/4 (75 px) would be too small


@pytest.mark.parametrize(
    ("fmt", "pixels"),
    [
        ("PNG", _red_blue(120, 90)),
        ("PNG", np.dstack([_red_blue(120, 90), np.full((90, 120), 255, np.uint8)])),  # RGBA
        ("PNG", _red_blue(120, 90)[..., 0]),  # greyscale
        ("TIFF", (_red_blue(120, 90)[..., 0].astype(np.uint16) * 200)),  # 16-bit
    ],
    ids=["png", "rgba", "grey", "tiff16"],
)
def test_other_formats_fall_back_to_a_full_decode(draft_calls, fmt, pixels) -> None:
    out = decode_downscaled(_encode(pixels, fmt), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert draft_calls == []
    assert out[:, :12, 0].mean() > 200 > 50 > out[:, 20:, 0].mean()  # bright red half on the left


def test_corrupt_bytes_raise_a_clear_error() -> None:
    with pytest.raises(CoreImageError, match="cannot decode core image"):
        decode_downscaled(b"not an image at all", 32)
    truncated = _encode(_red_blue(), "JPEG")[:2000]
    with pytest.raises(ValueError, match="cannot decode core image"):
        decode_downscaled(truncated, 32)


# --- the dataset -------------------------------------------------------------------------------


def _core(i: int) -> np.ndarray:
    """Core i: a grey level of its own, with a bright top-left quadrant (so flips show)."""
    rgb = np.full((2 * SIZE, 2 * SIZE, 3), 10 + 12 * i, np.uint8)
    rgb[:SIZE, :SIZE] = 250
    return rgb


def _cohort(n: int = 10):
    """n cores cycling over the five classes; image names that lie about the label."""
    five = [FIVE_CLASSES[i % 5] for i in range(n)]
    rows = pd.DataFrame(
        {
            "core_id": [f"c{i}" for i in range(n)],
            "image": [f"score3_core{i}.png" for i in range(n)],
            "five_class": five,
            "ihc_score": [SCORE_OF_CLASS[c] for c in five],
        }
    )
    data = {f"score3_core{i}.png": _encode(_core(i), "PNG") for i in range(n)}
    calls: dict[str, int] = {name: 0 for name in data}

    def loader(name):
        def load() -> bytes:
            calls[name] += 1
            return data[name]

        return load

    return rows, {name: loader(name) for name in data}, calls


def _dataset(rows, cores, *, train: bool, **kw) -> CoreImageDataset:
    base = {"target": "ihc_score", "input_size": SIZE, "seed": 3, "batch_size": 4}
    return CoreImageDataset(rows, cores, train=train, **{**base, **kw})


def _expected(i: int) -> torch.Tensor:
    return (
        torch.from_numpy(decode_downscaled(_encode(_core(i), "PNG"), SIZE)).permute(2, 0, 1) / 255
    )


def test_eval_batches_are_rows_in_order_without_flips_and_labels_from_the_target() -> None:
    rows, cores, _ = _cohort(10)
    ds = _dataset(rows, cores, train=False)
    batches = [ds[i] for i in range(len(ds))]
    assert len(ds) == 3 and [len(b.core_ids) for b in batches] == [4, 4, 2]
    b = batches[0]
    assert isinstance(b, CoreBatch) and b.tiles.shape == (4, 3, SIZE, SIZE)
    assert b.tiles.dtype == torch.float32 and b.label.dtype == torch.long
    assert 0.0 <= float(b.tiles.min()) and float(b.tiles.max()) <= 1.0
    ids = [c for b in batches for c in b.core_ids]
    assert ids == rows["core_id"].tolist()
    labels = torch.cat([b.label for b in batches]).tolist()
    assert labels == rows["ihc_score"].tolist()  # not the "score3" in every file name
    for b in batches:
        for tile, core_id in zip(b.tiles, b.core_ids, strict=True):
            assert torch.equal(tile, _expected(int(core_id[1:])))
    ds.set_epoch(5)
    again = [ds[i] for i in range(len(ds))]
    assert all(torch.equal(x.tiles, y.tiles) for x, y in zip(batches, again, strict=True))


def test_unlabelled_cores_get_minus_one() -> None:
    rows, cores, _ = _cohort(3)
    ds = _dataset(rows.drop(columns="ihc_score"), cores, train=False, target=None)
    assert ds[0].label.tolist() == [-1, -1, -1]


def test_training_batches_follow_the_five_class_sampler_each_epoch() -> None:
    rows, cores, _ = _cohort(10)
    ds = _dataset(rows, cores, train=True)
    sampler = FiveClassSampler(rows["five_class"].tolist(), seed=3)
    orders = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        ids = [c for i in range(len(ds)) for c in ds[i].core_ids]
        assert ids == [f"c{i}" for i in sampler]
        labels = [int(lab) for i in range(len(ds)) for lab in ds[i].label]
        assert labels == [SCORE_OF_CLASS[rows["five_class"][int(c[1:])]] for c in ids]
        orders.append(ids)
    assert orders[0] != orders[1]
    twin = _dataset(rows, cores, train=True)
    twin.set_epoch(1)
    assert [c for i in range(len(twin)) for c in twin[i].core_ids] == orders[1]
    assert all(torch.equal(twin[i].tiles, ds[i].tiles) for i in range(len(ds)))


def test_no_training_batch_of_one_core() -> None:
    rows, cores, _ = _cohort(9)
    train = _dataset(rows, cores, train=True)
    assert len(train) == 2 and [len(train[i].core_ids) for i in range(2)] == [4, 5]
    evaluation = _dataset(rows, cores, train=False)
    assert [len(evaluation[i].core_ids) for i in range(len(evaluation))] == [4, 4, 1]
    with pytest.raises(ValueError, match="batch_size"):
        _dataset(rows, cores, train=True, batch_size=1)
    with pytest.raises(ValueError, match="at least 2"):
        _dataset(rows.iloc[:1], cores, train=True)


def test_flips_in_training_only() -> None:
    rows, cores, _ = _cohort(10)
    seen = set()
    for flips in (True, False):
        ds = _dataset(rows, cores, train=True, flips=flips)
        for epoch in range(3):
            ds.set_epoch(epoch)
            position = 0
            for i in range(len(ds)):
                for tile, core_id in zip(ds[i].tiles, ds[i].core_ids, strict=True):
                    h, v = ds.flips_of(position)
                    want = _expected(int(core_id[1:]))
                    want = want.flip(-1) if h else want
                    want = want.flip(-2) if v else want
                    assert torch.equal(tile, want)
                    if flips:
                        seen.add((h, v))
                    else:
                        assert (h, v) == (False, False)
                    position += 1
    assert seen == {(False, False), (True, False), (False, True), (True, True)}


def test_transform_is_applied_to_the_downscaled_core() -> None:
    rows, cores, _ = _cohort(4)
    got = []

    def invert(row: dict, rgb: np.ndarray) -> np.ndarray:
        got.append((row["core_id"], rgb.shape))
        return 255 - rgb

    ds = _dataset(rows, cores, train=False, transform=invert)
    tiles = ds[0].tiles
    assert sorted(got) == [(f"c{i}", (SIZE, SIZE, 3)) for i in range(4)]
    for i in range(4):
        assert torch.allclose(tiles[i], 1 - _expected(i), atol=1e-6)
    bad = _dataset(rows, cores, train=False, transform=lambda row, rgb: rgb[:4].astype(float))
    with pytest.raises(ValueError, match="transform returned"):
        bad[0]


def test_cache_decodes_each_core_once() -> None:
    rows, cores, calls = _cohort(10)
    ds = _dataset(rows, cores, train=True)
    seen = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            seen.update(ds[i].core_ids)
    assert len(seen) > 5
    assert calls == {f"score3_core{i}.png": int(f"c{i}" in seen) for i in range(10)}

    rows, cores, calls = _cohort(4)
    uncached = _dataset(rows, cores, train=False, cache=False)
    uncached[0], uncached[0]
    assert set(calls.values()) == {2}


def test_missing_columns_and_images_are_named() -> None:
    rows, cores, _ = _cohort(4)
    with pytest.raises(KeyError, match="five_class"):
        _dataset(rows.drop(columns="five_class"), cores, train=True)
    with pytest.raises(KeyError, match="score3_core3.png"):
        _dataset(rows, {k: v for k, v in cores.items() if not k.endswith("3.png")}, train=False)
    broken = {**cores, "score3_core0.png": lambda: b"junk"}
    with pytest.raises(CoreImageError, match="'c0'"):
        _dataset(rows, broken, train=False)[0]
