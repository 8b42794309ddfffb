"""The paper's tile rule on crafted images, checked against a slow, obvious reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from her2_kedro.imaging.pixels import foreground_mask
from her2_kedro.imaging.tiling import (
    TileRule,
    foreground_mask_fast,
    iter_tiles,
    read_tile,
    tile_index,
    tile_origins,
)
from her2_kedro.schema import TILE_COLUMNS

WHITE = 255
TISSUE = 120  # grey 120 < 220: foreground


def _white(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), WHITE, dtype=np.uint8)


def _reference_index(rgb: np.ndarray, rule: TileRule) -> pd.DataFrame:
    """Slow reference: loop over the grid, imaging.foreground_mask per tile, strict > min_tissue."""
    rows = []
    s = rule.tile_size
    y = rule.offset[1]
    while y + s <= rgb.shape[0]:
        x = rule.offset[0]
        while x + s <= rgb.shape[1]:
            frac = foreground_mask(rgb[y : y + s, x : x + s], rule.background_grey).mean()
            if frac > rule.min_tissue:
                rows.append((x, y, frac))
            x += rule.stride
        y += rule.stride
    return pd.DataFrame(rows, columns=["x", "y", "tissue_fraction"])


def test_columns_and_dtypes() -> None:
    rgb = _white(448, 448)
    rgb[:100, :100] = TISSUE
    index = tile_index(rgb, "core_a")
    assert list(index.columns) == TILE_COLUMNS
    assert index["x"].dtype == np.int32 and index["y"].dtype == np.int32
    assert index["tissue_fraction"].dtype == np.float32
    assert index["core_id"].tolist() == ["core_a"]
    assert index.iloc[0][["x", "y"]].tolist() == [0, 0]


def _paint(rgb: np.ndarray, x0: int, size: int, n_pixels: int) -> None:
    """Make the first ``n_pixels`` (raster order) of the tile at (x0, 0) tissue."""
    tile = rgb[:size, x0 : x0 + size].reshape(-1, 3).copy()
    tile[:n_pixels] = TISSUE
    rgb[:size, x0 : x0 + size] = tile.reshape(size, size, 3)


def test_exactly_five_percent_is_dropped_just_above_is_kept() -> None:
    rule = TileRule(tile_size=20, stride=20)  # 400 px: 5 % is exactly 20 px
    rgb = _white(20, 80)
    _paint(rgb, 0, 20, 20)  # exactly 5 % -> dropped (strict >)
    _paint(rgb, 20, 20, 21)  # 5.25 % -> kept
    _paint(rgb, 40, 20, 21)
    index = tile_index(rgb, "c", rule)
    assert index["x"].tolist() == [20, 40]
    assert index["tissue_fraction"].iloc[0] == pytest.approx(21 / 400)
    # The general (stride != tile size) path applies the same strict rule.
    general = tile_index(rgb, "c", TileRule(tile_size=20, stride=40))
    assert general["x"].tolist() == [40]


def test_paper_tile_size_boundary() -> None:
    rgb = _white(224, 448)
    _paint(rgb, 0, 224, 2508)  # 2508 / 50176 = 4.998 % -> dropped
    _paint(rgb, 224, 224, 2509)  # 2509 / 50176 = 5.0004 % -> kept
    assert tile_index(rgb, "c")["x"].tolist() == [224]


def test_partial_edge_tiles_dropped() -> None:
    rgb = np.full((470, 500, 3), TISSUE, dtype=np.uint8)  # height 470, width 500
    index = tile_index(rgb, "c")
    assert len(index) == 4
    assert sorted(zip(index["x"], index["y"], strict=True)) == [
        (0, 0),
        (0, 224),
        (224, 0),
        (224, 224),
    ]
    assert tile_origins(470, 500).tolist() == [[0, 0], [224, 0], [0, 224], [224, 224]]
    assert tile_origins(223, 500).shape == (0, 2)


def test_all_background_gives_empty_frame() -> None:
    index = tile_index(_white(600, 700), "empty")
    assert index.empty
    assert list(index.columns) == TILE_COLUMNS
    assert index["x"].dtype == np.int32 and index["tissue_fraction"].dtype == np.float32
    small = tile_index(np.full((100, 100, 3), TISSUE, np.uint8), "tiny")  # smaller than a tile
    assert small.empty and list(small.columns) == TILE_COLUMNS


def test_grey_boundary_matches_imaging() -> None:
    """Grey exactly 220 is foreground (background is strictly > 220), as in imaging.foreground_mask."""
    v = np.arange(256, dtype=np.int32)
    r, g, b = np.meshgrid(v, v, v, indexing="ij")
    weighted = 2989 * r + 5870 * g + 1140 * b
    near = np.abs(weighted - 2_200_000) <= 3000  # every colour float32 rounding could flip
    colours = np.stack([r[near], g[near], b[near]], axis=-1).astype(np.uint8)[None]
    fast = foreground_mask_fast(colours)[0]
    exact = weighted[near] <= 2_200_000
    assert np.array_equal(fast, exact)
    ties = colours[0][weighted[near] == 2_200_000]
    assert len(ties) == 3 and fast[weighted[near] == 2_200_000].all()
    # imaging.grey (float32) may round an exact tie up to 220.00002 (which ties, depends on the
    # CPU's BLAS kernel), and nothing else.
    slow = foreground_mask(colours)[0]
    assert (weighted[near][fast != slow] == 2_200_000).all()
    # Just above / at / below the boundary on a real-looking grey pixel.
    probe = np.array([[[221, 221, 221], [220, 220, 220], [219, 219, 219]]], dtype=np.uint8)
    assert foreground_mask_fast(probe)[0].tolist() == foreground_mask(probe)[0].tolist()


@pytest.mark.parametrize(
    "rule",
    [
        TileRule(tile_size=32, stride=32),
        TileRule(tile_size=32, stride=32, offset=(5, 11)),
        TileRule(tile_size=32, stride=24, offset=(3, 0)),
        TileRule(tile_size=32, stride=40, min_tissue=0.3),
        TileRule(tile_size=32, stride=32, background_grey=150.0),
    ],
)
def test_agrees_with_slow_reference_on_random_images(rule: TileRule) -> None:
    rng = np.random.default_rng(0)
    for height, width in [(200, 301), (257, 129)]:
        # White glass with random blobs so tile fractions spread over 0..1.
        rgb = _white(height, width)
        for _ in range(12):
            cy, cx, rad = rng.integers(0, height), rng.integers(0, width), rng.integers(3, 40)
            yy, xx = np.ogrid[:height, :width]
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < rad**2
            rgb[blob] = rng.integers(100, 240, size=3)
        rgb = np.where(rng.random((height, width, 1)) < 0.1, rng.integers(0, 256, rgb.shape), rgb)
        rgb = rgb.astype(np.uint8)
        got = tile_index(rgb, "r", rule)
        ref = _reference_index(rgb, rule)
        assert got["x"].tolist() == ref["x"].tolist()
        assert got["y"].tolist() == ref["y"].tolist()
        np.testing.assert_allclose(got["tissue_fraction"], ref["tissue_fraction"], rtol=1e-6)


def test_offsets_and_non_square() -> None:
    rgb = np.full((470, 500, 3), TISSUE, dtype=np.uint8)
    index = tile_index(rgb, "c", TileRule(offset=(10, 5)))
    assert sorted(zip(index["x"], index["y"], strict=True)) == [
        (10, 5),
        (10, 229),
        (234, 5),
        (234, 229),
    ]
    index = tile_index(rgb, "c", TileRule(offset=(100, 0)))
    assert sorted(zip(index["x"], index["y"], strict=True)) == [(100, 0), (100, 224)]
    tall = np.full((700, 230, 3), TISSUE, dtype=np.uint8)
    assert tile_index(tall, "t")["y"].tolist() == [0, 224, 448]


def test_read_tile_is_a_view_and_iter_tiles() -> None:
    rgb = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    tile = read_tile(rgb, 2, 1, 3)
    assert tile.shape == (3, 3, 3) and np.shares_memory(tile, rgb)
    assert np.array_equal(tile, rgb[1:4, 2:5])
    with pytest.raises(ValueError):
        read_tile(rgb, 6, 0, 3)
    frame = pd.DataFrame({"x": [0, 4], "y": [0, 2]})
    tiles = list(iter_tiles(rgb, frame, 4))
    assert [t.shape for t in tiles] == [(4, 4, 3), (4, 4, 3)]
    assert np.array_equal(tiles[1], rgb[2:6, 4:8])
    assert len(list(iter_tiles(rgb, [(1, 1)], 2))) == 1


def test_rule_validation() -> None:
    with pytest.raises(ValueError):
        TileRule(tile_size=0)
    with pytest.raises(ValueError):
        TileRule(offset=(-1, 0))


def test_the_rule_is_the_validated_tile_config() -> None:
    """One source of defaults: TileRule is TileConfig plus a per-call offset, and either works."""
    from her2_kedro.config import TileConfig

    assert TileRule().model_dump(exclude={"offset"}) == TileConfig().model_dump()
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, size=(100, 130, 3), dtype=np.uint8)
    config = TileConfig(tile_size=32, stride=32, min_tissue=0.4)
    pd.testing.assert_frame_equal(
        tile_index(rgb, "c", config), tile_index(rgb, "c", TileRule(**config.model_dump()))
    )
