"""The device embedding path (torch ops, run here on CPU) against the numpy path it replaces."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from her2_kedro.config.shared import TileConfig
from her2_kedro.features import device_embedding as de
from her2_kedro.features.preprocess import decode_rgb
from her2_kedro.imaging.normalisation import cohort_normaliser, normalise
from her2_kedro.imaging.pixels import encode_jpeg, encode_png
from her2_kedro.imaging.stain_vectors import StainVectors
from her2_kedro.imaging.tiling import PAPER_RULE
from her2_kedro.modelling.bags import EmptyBagError, bag_tiles, tiles_to_tensor
from her2_kedro.modelling.embeddings import embed_core
from her2_kedro.modelling.encoders import build_encoder
from tests.conftest import fake_core

SMALL = TileConfig(tile_size=32, stride=32)
OVERLAPPING = TileConfig(tile_size=48, stride=20, min_tissue=0.3)
#: A reference with pooled percentiles (so the haematoxylin scale is matched) and a source.
TARGET = StainVectors((0.65, 0.70, 0.29), (0.27, 0.57, 0.78), max_concentrations=(120.0, 80.0))
SOURCE = StainVectors((0.55, 0.78, 0.30), (0.20, 0.50, 0.84))
#: Normalised pixels: numpy's look-up tables are reproduced in float32, so at most a rounding
#: flip (from last-bit differences of the percentile) separates the two.
MAX_GREY_DIFF = 1
#: Embeddings on CPU: same pixels, same resize, same trunk; float32 round-off at most.
EMBED_ATOL = 1e-4


@pytest.fixture(scope="module")
def cores() -> dict[str, np.ndarray]:
    """Three small cores of real IHC tissue on glass, different crops and placements."""
    return {
        "a": fake_core(300, 200, 40),
        "b": fake_core(260, 230, 10, source=150),
        "c": fake_core(330, 150, 100, source=300),
    }


@pytest.fixture(scope="module")
def jpegs(cores) -> dict[str, bytes]:
    return {core_id: encode_jpeg(rgb, 90) for core_id, rgb in cores.items()}


@pytest.fixture(scope="module")
def trunk() -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = build_encoder("resnet18", None)
    return de.prepare_trunk(model, "cpu")


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def test_decode_gives_the_project_decoders_pixels(cores, jpegs):
    for data in (jpegs["a"], encode_jpeg(cores["b"], 75), encode_png(cores["c"])):
        t = de.decode_core(data, "cpu")
        assert t.dtype == torch.uint8 and t.shape[0] == 3
        np.testing.assert_array_equal(_hwc(t), decode_rgb(data))
    batched = de.decode_cores([jpegs["a"], encode_png(cores["c"]), jpegs["b"]], "cpu")
    assert [tuple(t.shape[1:]) for t in batched] == [(300, 300), (330, 330), (260, 260)]


@pytest.mark.parametrize(
    "bad, problem",
    [
        (b"definitely not an image", "not a JPEG"),
        (b"\xff\xd8\xff\xe0 truncated header", "JPEG"),
    ],
)
def test_undecodable_bytes_name_the_problem_and_the_core(bad, problem, trunk, jpegs):
    with pytest.raises(de.CoreImageError, match=f"cannot decode core image .*{problem}"):
        de.decode_core(bad, "cpu")
    with pytest.raises(de.CoreImageError, match="core 'broken'"):
        de.embed_core_on_device(trunk, bad, "broken", PAPER_RULE, 32, device="cpu")
    cores = [("a", lambda: jpegs["a"]), ("broken", lambda: bad)]
    with pytest.raises(de.CoreImageError, match="core 'broken'"):
        list(de.embed_cores_on_device(trunk, cores, PAPER_RULE, 32, decode_batch=2))
    truncated = jpegs["a"][: len(jpegs["a"]) // 2]
    with pytest.raises(de.CoreImageError, match="(?i)truncated|incomplete"):
        de.decode_core(truncated, "cpu")


@pytest.mark.parametrize(
    "rule, offset",
    [
        (PAPER_RULE, (0, 0)),
        (PAPER_RULE, (30, 11)),
        (PAPER_RULE, (200, 200)),  # no full tile at this offset: falls back to (0, 0)
        (SMALL, (0, 0)),
        (SMALL, (7, 19)),
        (OVERLAPPING, (0, 0)),
        (OVERLAPPING, (5, 3)),
    ],
)
def test_kept_tiles_equal_bag_tiles(cores, rule, offset):
    for core_id, rgb in cores.items():
        expected = bag_tiles(rgb, core_id, rule, offset)
        coords, fractions = de.kept_tiles(
            torch.from_numpy(rgb).permute(2, 0, 1), core_id, rule, offset
        )
        assert coords.dtype == np.int64 and len(coords) > 0
        np.testing.assert_array_equal(coords, expected[["x", "y"]].to_numpy(np.int64))
        np.testing.assert_allclose(fractions, expected["tissue_fraction"], rtol=1e-6)


def test_tissue_rule_ties_are_decided_as_in_imaging():
    """A tile with exactly ``min_tissue`` is dropped (strictly greater keeps), and grey exactly 220
    (RGB 180, 254, 150) is tissue by the integer rule."""
    rule = TileConfig(tile_size=20, stride=20, min_tissue=0.25)
    rgb = np.full((40, 60, 3), 255, dtype=np.uint8)
    rgb[0:10, 0:10] = (180, 254, 150)  # tile (0, 0): exactly 100 / 400 tissue pixels
    rgb[0:10, 20:30] = (180, 254, 150)
    rgb[10, 20] = (100, 100, 100)  # tile (20, 0): 101 / 400
    rgb[20:40, 40:60] = (181, 254, 150)  # tile (40, 20): grey just above 220, background
    expected = bag_tiles(rgb, "tie", rule)
    t = de.decode_core(encode_png(rgb), "cpu")
    coords, _ = de.kept_tiles(t, "tie", rule)
    assert coords.tolist() == [[20, 0]]
    np.testing.assert_array_equal(coords, expected[["x", "y"]].to_numpy(np.int64))


def test_float_grey_rule_of_normalisation_agrees_with_numpy_on_ties():
    """normalise masks with the float32 grey rule, under which the exact tie (180, 254, 150)
    rounds to background; the torch version must round every colour the same way."""
    from her2_kedro.imaging.pixels import foreground_mask

    rng = np.random.default_rng(0)
    ties = [(180, 254, 150), (220, 228, 179), (250, 237, 54)]
    colours = np.concatenate([np.array(ties), rng.integers(0, 256, (20_000, 3))]).astype(np.uint8)
    rgb = colours[None]
    expected = foreground_mask(rgb, 220.0)
    got = de.foreground_float(torch.from_numpy(rgb).permute(2, 0, 1), 220.0).numpy()
    np.testing.assert_array_equal(got, expected)
    assert not got[0, 0]  # the tie is background here (tissue by the integer rule)


def test_core_without_tissue_raises_the_same_empty_bag_error(trunk):
    glass = np.full((300, 300, 3), 240, dtype=np.uint8)
    with pytest.raises(EmptyBagError) as numpy_error:
        bag_tiles(glass, "blank", PAPER_RULE)
    with pytest.raises(EmptyBagError) as device_error:
        de.embed_core_on_device(trunk, encode_jpeg(glass, 90), "blank", PAPER_RULE, 32)
    assert str(device_error.value) == str(numpy_error.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"match_dab": True, "dab_scale": 1.4},
        {"max_percentile_pixels": 2_000, "seed": 3},  # sampled percentile pixels
        {"match_haematoxylin": False},
    ],
)
def test_normalisation_matches_numpy(cores, kwargs):
    rgb = cores["a"]
    expected = normalise(rgb, SOURCE, TARGET, 220.0, **kwargs)
    t = torch.from_numpy(rgb).permute(2, 0, 1)
    got = _hwc(de.normalise_tensor(t, SOURCE, TARGET, 220.0, **kwargs))
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= MAX_GREY_DIFF
    assert (diff > 0).mean() < 1e-3
    assert (got != rgb).mean() > 0.3  # it did change the tissue
    glass = rgb.min(axis=2) == 255
    np.testing.assert_array_equal(got[glass], rgb[glass])


def test_normalisation_with_the_cores_own_vectors_and_of_blank_glass(cores):
    rgb = cores["b"]
    t = torch.from_numpy(rgb).permute(2, 0, 1)
    diff = np.abs(
        _hwc(de.normalise_tensor(t, None, TARGET)).astype(int) - normalise(rgb, None, TARGET)
    )
    assert diff.max() <= MAX_GREY_DIFF
    glass = torch.full((3, 40, 40), 250, dtype=torch.uint8)
    assert torch.equal(de.normalise_tensor(glass, SOURCE, TARGET), glass)


def test_cohort_device_normaliser_follows_cohort_normaliser(cores):
    assert de.cohort_device_normaliser(None, ["external"]) is None
    reference = {
        "vectors": TARGET.to_dict(),
        "sources": {"external": {"vectors": SOURCE.to_dict(), "dab_scale": 1.2}},
    }
    numpy_transform = cohort_normaliser(reference, ["external"])
    device_transform = de.cohort_device_normaliser(reference, ["external"])
    rgb = cores["c"]
    t = torch.from_numpy(rgb).permute(2, 0, 1)
    assert device_transform({"cohort": "internal"}, t) is t
    row = {"cohort": "external", "core_id": "c"}
    diff = np.abs(_hwc(device_transform(row, t)).astype(int) - numpy_transform(row, rgb))
    assert diff.max() <= MAX_GREY_DIFF
    assert not np.array_equal(_hwc(device_transform(row, t)), rgb)


@pytest.mark.parametrize("input_size", [None, 24])
def test_tiles_are_cut_and_resized_as_tiles_to_tensor(cores, input_size):
    rgb = cores["a"]
    coords = bag_tiles(rgb, "a", SMALL)[["x", "y"]].to_numpy(np.int64)
    expected = tiles_to_tensor(rgb, coords, SMALL.tile_size, input_size)
    tiles = de.cut_tiles(torch.from_numpy(rgb).permute(2, 0, 1), coords, SMALL.tile_size)
    got = de.tiles_to_input(tiles, input_size)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("input_size", [None, 32])
def test_embed_core_on_device_equals_embed_core(trunk, cores, jpegs, input_size):
    rule = SMALL if input_size is None else PAPER_RULE  # small tiles keep the full-size case fast
    for core_id in ("a", "c"):
        rgb = decode_rgb(jpegs[core_id])
        expected = embed_core(trunk, rgb, core_id, rule, input_size, batch_size=16)
        got = de.embed_core_on_device(
            trunk, jpegs[core_id], core_id, rule, input_size, batch_size=16, device="cpu"
        )
        assert got["coords"].dtype == np.int64 and got["embeddings"].dtype == np.float32
        np.testing.assert_array_equal(got["coords"], expected["coords"])
        np.testing.assert_allclose(got["embeddings"], expected["embeddings"], atol=EMBED_ATOL)


def test_normalised_embeddings_equal_embed_core_on_normalised_pixels(trunk, jpegs):
    rgb = normalise(decode_rgb(jpegs["b"]), SOURCE, TARGET)
    expected = embed_core(trunk, rgb, "b", SMALL, 16, batch_size=64)
    normaliser = functools.partial(de.normalise_tensor, source=SOURCE, target=TARGET)
    got = de.embed_core_on_device(trunk, jpegs["b"], "b", SMALL, 16, normaliser=normaliser)
    np.testing.assert_array_equal(got["coords"], expected["coords"])
    np.testing.assert_allclose(got["embeddings"], expected["embeddings"], atol=EMBED_ATOL)


def test_many_cores_in_order_equal_one_at_a_time(trunk, jpegs):
    singles = {
        core_id: de.embed_core_on_device(trunk, data, core_id, PAPER_RULE, 32, batch_size=3)
        for core_id, data in jpegs.items()
    }
    loaders = [(core_id, (lambda d=data: d)) for core_id, data in jpegs.items()]
    many = list(
        de.embed_cores_on_device(
            trunk, loaders, PAPER_RULE, 32, batch_size=3, pad_batches=True, decode_batch=2
        )
    )
    assert [core_id for core_id, _ in many] == list(jpegs)
    for core_id, entry in many:
        np.testing.assert_array_equal(entry["coords"], singles[core_id]["coords"])
        np.testing.assert_allclose(
            entry["embeddings"], singles[core_id]["embeddings"], atol=EMBED_ATOL
        )


def test_the_features_node_gives_the_same_cache_on_the_torch_path(tmp_path, jpegs, trunk):
    """``encoder.device_preprocessing: always`` (the GPU path, run on the CPU) fills the cache
    with the same keys and entries as the numpy path, whatever order the cache saves them in."""
    import pandas as pd

    from her2_kedro.config import EncoderConfig
    from her2_kedro.modelling.checkpoints import save_checkpoint
    from her2_kedro.pipelines.features.nodes import embed_cores

    path = save_checkpoint(tmp_path / "encoder.pt", trunk, "encoder", {"name": "resnet18"})
    manifest = pd.DataFrame(
        {
            "core_id": list(jpegs),
            "image": [f"{c}.jpg" for c in jpegs],
            "content_hash": [f"{i:064x}" for i in range(1, len(jpegs) + 1)],
            "cohort": "main",
        }
    )
    tiles = pd.concat(
        [bag_tiles(decode_rgb(data), core_id, SMALL) for core_id, data in jpegs.items()]
    )
    loaders = {f"{c}.jpg": functools.partial(lambda d: d, d) for c, d in jpegs.items()}
    results = {}
    for mode in ("never", "always"):
        encoder = EncoderConfig(
            device_preprocessing=mode, bag={"input_size": 32}, training={"device": "cpu"}
        ).model_dump(mode="json")
        new, index = embed_cores(
            manifest, tiles, loaders, None, path, {}, encoder, SMALL.model_dump(), {}
        )
        order = list(new)[::-1] if mode == "always" else list(new)  # out of order: buffered
        results[mode] = ({key: new[key]() for key in order}, index)
    (numpy_entries, numpy_index), (torch_entries, torch_index) = results.values()
    pd.testing.assert_frame_equal(numpy_index, torch_index)
    assert set(numpy_entries) == set(torch_entries) == set(numpy_index["key"])
    for key, entry in numpy_entries.items():
        np.testing.assert_array_equal(torch_entries[key]["coords"], entry["coords"])
        np.testing.assert_allclose(
            torch_entries[key]["embeddings"], entry["embeddings"], atol=EMBED_ATOL
        )
