"""Tile bags: shapes, evaluation bag = tile index, seeded per-epoch augmentation, caps, blank cores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from her2_kedro.config.mil import BagConfig
from her2_kedro.config.shared import TileConfig
from her2_kedro.imaging.pixels import encode_png
from her2_kedro.imaging.tiling import as_rule, read_tile, tile_index
from her2_kedro.modelling.bags import BagDataset, EmptyBagError, cap_tiles
from tests.conftest import fake_core

TILE = 32
RULE = TileConfig(tile_size=TILE, stride=TILE)
FULL = BagConfig(input_size=None)  # tiles at full size: comparable with the core's pixels


def make_dataset(cores: dict[str, np.ndarray], **kwargs) -> BagDataset:
    blobs = {name: encode_png(rgb) for name, rgb in cores.items()}
    loaders = {name: (lambda b=b: b) for name, b in blobs.items()}
    rows = pd.DataFrame(
        {
            "core_id": [name.split(".")[0] for name in cores],
            "image": list(cores),
            "ihc_score": [i % 4 for i in range(len(cores))],
        }
    )
    kwargs.setdefault("target", "ihc_score")
    kwargs.setdefault("rule", RULE)
    return BagDataset(rows, loaders, **kwargs)


def flips_of(tile: torch.Tensor) -> list[torch.Tensor]:
    return [tile, tile.flip(-1), tile.flip(-2), tile.flip(-1).flip(-2)]


def as_tensor(tile: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1).float() / 255.0


@pytest.mark.parametrize("train", [False, True])
def test_shapes_and_range(cohort, train):
    ds = make_dataset(cohort, config=BagConfig(input_size=16), train=train)
    assert len(ds) == 3
    for i in range(len(ds)):
        tiles, coords, label, core_id = ds[i]
        assert tiles.dtype == torch.float32 and tiles.shape[1:] == (3, 16, 16)
        assert len(tiles) > 0 and tiles.min() >= 0.0 and tiles.max() <= 1.0
        assert coords.dtype == torch.int64 and coords.shape == (len(tiles), 2)
        assert isinstance(label, int) and label == i % 4
        assert core_id == list(cohort)[i].split(".")[0]


def test_paper_tile_size_resized(cohort):
    core = {"big.png": fake_core(600, 512, 40)}
    ds = make_dataset(core, rule=TileConfig(), config=BagConfig(input_size=64), train=True)
    tiles, coords, _, _ = ds[0]
    assert tiles.shape[1:] == (3, 64, 64)
    assert int(coords.max()) + 224 <= 600


def test_evaluation_bag_is_the_tile_index(cohort):
    ds = make_dataset(cohort, config=FULL, train=False)
    for i, (name, rgb) in enumerate(cohort.items()):
        index = tile_index(rgb, name, RULE)
        tiles, coords, _, _ = ds[i]
        np.testing.assert_array_equal(coords.numpy(), index[["x", "y"]].to_numpy())
        expected = torch.stack([as_tensor(read_tile(rgb, x, y, TILE)) for x, y in coords.tolist()])
        assert torch.equal(tiles, expected)  # offset 0 and no flips
        ds.set_epoch(5)
        again = ds[i]
        ds.set_epoch(0)
        assert torch.equal(again.tiles, tiles) and torch.equal(again.coords, coords)


def test_training_offsets_vary_by_epoch_and_reproduce(cohort):
    ds = make_dataset(cohort, config=FULL, train=True, seed=7)
    per_epoch = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        offsets = [ds.item_offset(i) for i in range(len(ds))]
        assert all(0 <= v < TILE for o in offsets for v in o)
        per_epoch.append(offsets)
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]

    ds.set_epoch(1)
    twin = make_dataset(cohort, config=FULL, train=True, seed=7)
    twin.set_epoch(1)
    other_seed = make_dataset(cohort, config=FULL, train=True, seed=8)
    other_seed.set_epoch(1)
    assert [other_seed.item_offset(i) for i in range(3)] != per_epoch[1]
    for i in range(len(ds)):
        bag, same = ds[i], twin[i]
        assert torch.equal(bag.tiles, same.tiles) and torch.equal(bag.coords, same.coords)
        # the bag's grid is the drawn offset's grid, and its tiles are the rule's kept tiles there
        x0, y0 = per_epoch[1][i]
        assert (bag.coords[:, 0] % TILE == x0).all() and (bag.coords[:, 1] % TILE == y0).all()
        rgb = cohort[ds.images[i]]
        expected = tile_index(rgb, "", as_rule(RULE, (x0, y0)))[["x", "y"]].to_numpy()
        np.testing.assert_array_equal(bag.coords.numpy(), expected)


def test_flips_only_in_training(cohort):
    flipped = 0
    for train in (False, True):
        ds = make_dataset(cohort, config=FULL, train=train, seed=3)
        for i, rgb in enumerate(cohort.values()):
            bag = ds[i]
            for tile, (x, y) in zip(bag.tiles, bag.coords.tolist(), strict=True):
                raw = as_tensor(read_tile(rgb, x, y, TILE))
                matches = [torch.equal(tile, f) for f in flips_of(raw)]
                assert any(matches), "a bag tile is not (a flip of) the core's tile at its coords"
                if not train:
                    assert matches[0]
                elif not matches[0]:
                    flipped += 1
    assert flipped > 0


def test_no_flips_when_switched_off(cohort):
    ds = make_dataset(cohort, config=BagConfig(input_size=None, flips=False), train=True, seed=3)
    rgb = cohort["a.png"]
    bag = ds[0]
    for tile, (x, y) in zip(bag.tiles, bag.coords.tolist(), strict=True):
        assert torch.equal(tile, as_tensor(read_tile(rgb, x, y, TILE)))


def test_bag_cap(cohort):
    full = make_dataset(cohort, config=FULL, train=False)[0]
    assert len(full.tiles) > 4
    train = make_dataset(cohort, config=BagConfig(input_size=None, max_tiles=4), train=True)
    bag = train[0]
    assert len(bag.tiles) == 4 == len(bag.coords)
    assert len(set(map(tuple, bag.coords.tolist()))) == 4
    evaluated = make_dataset(cohort, config=BagConfig(input_size=None, max_tiles=4), train=False)
    assert torch.equal(evaluated[0].coords, full.coords)  # the training cap leaves evaluation whole
    capped = make_dataset(cohort, config=BagConfig(input_size=None, eval_max_tiles=4))
    bag = capped[0]
    index = tile_index(cohort["a.png"], "a", RULE)
    richest = index["tissue_fraction"].nlargest(4, keep="first").min()
    kept = index.set_index(["x", "y"]).loc[list(map(tuple, bag.coords.tolist()))]
    assert len(bag.tiles) == 4 and (kept["tissue_fraction"] >= richest).all()


def test_cap_tiles_random_subset_keeps_raster_order():
    index = pd.DataFrame({"x": np.arange(10) * 8, "y": 0, "tissue_fraction": np.linspace(0, 1, 10)})
    subset = cap_tiles(index, 5, np.random.default_rng(0))
    assert len(subset) == 5 and subset["x"].is_monotonic_increasing
    assert cap_tiles(index, 20, np.random.default_rng(0)) is index
    assert cap_tiles(index, 3, None)["x"].tolist() == index["x"].tolist()[-3:]


def test_offset_missing_the_tissue_falls_back_to_zero():
    small = {"s.png": fake_core(40, 40, 0)}  # one full 32 px tile, only on the (0, 0) grid
    ds = make_dataset(small, config=FULL, train=True, seed=1)
    epoch = next(e for e in range(100) if (ds.set_epoch(e), ds.item_offset(0)[0] > 8)[1])
    ds.set_epoch(epoch)
    assert ds[0].coords.tolist() == [[0, 0]]


@pytest.mark.parametrize("train", [False, True])
def test_blank_core_names_itself(cohort, train):
    cores = {**cohort, "blank-core.png": np.full((128, 128, 3), 250, dtype=np.uint8)}
    ds = make_dataset(cores, config=FULL, train=train)
    with pytest.raises(EmptyBagError, match="blank-core"):
        ds[3]


def test_rows_and_cores_checked(cohort):
    with pytest.raises(KeyError, match="her2_status"):
        make_dataset(cohort, target="her2_status")
    rows = pd.DataFrame({"core_id": ["x"], "image": ["missing.png"], "ihc_score": [0]})
    with pytest.raises(KeyError, match="missing.png"):
        BagDataset(rows, {}, target="ihc_score")


def test_unlabelled_and_dataloader(cohort):
    ds = make_dataset(cohort, config=BagConfig(input_size=8), train=True, target=None)
    ds.set_epoch(2)
    bags = list(DataLoader(ds, batch_size=None, shuffle=False))
    assert [b.core_id for b in bags] == ["a", "b", "c"]
    assert all(b.label == -1 and b.tiles.shape[1:] == (3, 8, 8) for b in bags)
    assert torch.equal(bags[1].coords, ds[1].coords)


def test_stain_jitter_is_exact_at_zero_and_changes_stain_amounts():
    from skimage.color import hed2rgb, rgb2hed

    from her2_kedro.modelling.bags import random_stain_jitter

    rng = np.random.default_rng(0)
    # stain mixtures (positive H, E, DAB amounts that stay positive under the largest shift)
    rgb = hed2rgb(rng.uniform(0.06, 0.12, (4, 8, 8, 3))).astype(np.float32)
    tiles = torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous()
    assert random_stain_jitter(tiles, rng, 0.0) is tiles
    # the round trip through H, E, DAB is exact when nothing is scaled or shifted
    tiny = random_stain_jitter(tiles, np.random.default_rng(1), 1e-7)
    assert torch.allclose(tiny, tiles, atol=1e-4)
    out = random_stain_jitter(tiles, np.random.default_rng(1), 0.05)
    again = random_stain_jitter(tiles, np.random.default_rng(1), 0.05)
    assert torch.equal(out, again) and out.shape == tiles.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # each tile's DAB changes by one affine map: the fit of after on before is (near) exact
    before = rgb2hed(rgb[0])[..., 2].ravel()
    after = rgb2hed(out[0].permute(1, 2, 0).numpy())[..., 2].ravel()
    slope, intercept = np.polyfit(before, after, 1)
    assert abs(slope - 1) <= 0.05 + 1e-3 and abs(intercept) <= 0.05 + 1e-3
    assert not np.allclose(after, before, atol=1e-3)
    assert np.allclose(after, slope * before + intercept, atol=2e-3)


def test_stain_jitter_only_in_training(cohort):
    config = BagConfig(input_size=None, flips=False, stain_jitter=0.1)
    rgb = cohort["a.png"]
    for train in (False, True):
        bag = make_dataset(cohort, config=config, train=train, seed=3)[0]
        raw = [as_tensor(read_tile(rgb, x, y, TILE)) for x, y in bag.coords.tolist()]
        same = all(torch.equal(t, r) for t, r in zip(bag.tiles, raw, strict=True))
        assert same != train
