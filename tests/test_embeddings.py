"""Embedding cache pieces: keys, per-core entries, bags read back, tile batches, the bag table,
the cohort normaliser, and the datasets that store checkpoints and cache entries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io.core import DatasetError

from her2_kedro.config.mil import BagConfig
from her2_kedro.evaluation.study import TASKS
from her2_kedro.imaging.normalisation import cohort_normaliser
from her2_kedro.imaging.stain_vectors import StainVectors
from her2_kedro.imaging.tiling import tile_index
from her2_kedro.io.outputs import EmbeddingsDataset, ModelFileDataset
from her2_kedro.modelling.embeddings import (
    EmbeddingBagDataset,
    embed_core,
    embedding_key,
)
from her2_kedro.modelling.encoders import build_encoder
from her2_kedro.modelling.tile_batches import TileBatchDataset
from her2_kedro.modelling.torch_study import FIVE_CLASS_TASK, bag_table
from tests.conftest import fake_core
from tests.test_bags import RULE, make_dataset


def test_embedding_key_changes_with_each_input_and_not_with_key_order():
    key = embedding_key("a" * 64, "b" * 64, {"input_size": 64, "tiles": {"tile_size": 224}})
    assert key == embedding_key("a" * 64, "b" * 64, {"tiles": {"tile_size": 224}, "input_size": 64})
    assert key != embedding_key("c" * 64, "b" * 64, {"input_size": 64, "tiles": {"tile_size": 224}})
    assert key != embedding_key("a" * 64, "d" * 64, {"input_size": 64, "tiles": {"tile_size": 224}})
    assert key != embedding_key("a" * 64, "b" * 64, {"input_size": 96, "tiles": {"tile_size": 224}})
    with pytest.raises(ValueError, match="content hash"):
        embedding_key("", "b" * 64, {})


def test_embed_core_is_the_evaluation_bag_and_independent_of_batch_size():
    torch.manual_seed(0)
    trunk, width = build_encoder("resnet18")
    rgb = fake_core(288, 160, 48)
    whole = embed_core(trunk, rgb, "a", RULE, 64, batch_size=64, channels_last=False)
    chunked = embed_core(trunk, rgb, "a", RULE, 64, batch_size=3, channels_last=True)
    index = tile_index(rgb, "a", RULE)
    assert whole["embeddings"].shape == (len(index), width)
    assert np.array_equal(whole["coords"], index[["x", "y"]].to_numpy())
    assert np.allclose(whole["embeddings"], chunked["embeddings"], atol=1e-4)


def _entries(sizes: dict[str, int], dim: int = 8) -> dict:
    rng = np.random.default_rng(0)
    return {
        c: (
            lambda n=n: {
                "embeddings": rng.normal(size=(n, dim)).astype(np.float32),
                "coords": np.arange(2 * n).reshape(n, 2),
            }
        )
        for c, n in sizes.items()
    }


def test_embedding_bags_read_entries_once_and_cap_training_bags_afresh_each_epoch():
    calls = []
    base = _entries({"a": 12, "b": 3})
    entries = {c: (lambda c=c: calls.append(c) or base[c]()) for c in base}
    rows = pd.DataFrame({"core_id": ["a", "b"], "ihc_score": [3, 0]})
    train = EmbeddingBagDataset(rows, entries, target="ihc_score", train=True, max_tiles=5)
    first = train[0]
    assert first.tiles.shape == (5, 8) and first.label == 3 and train[1].tiles.shape == (3, 8)
    train.set_epoch(1)
    assert not torch.equal(train[0].coords, first.coords)  # a new subset this epoch
    assert calls == ["a", "b"]  # each entry read once, then kept
    evaluated = EmbeddingBagDataset(rows, entries, target="ihc_score", max_tiles=5)
    assert evaluated[0].tiles.shape == (12, 8)  # evaluation bags are whole
    with pytest.raises(KeyError, match="no cached embeddings for core"):
        EmbeddingBagDataset(
            pd.DataFrame({"core_id": ["z"], "ihc_score": [1]}), entries, target=None
        )


def test_embeddings_dataset_round_trip_and_corrupt_entry(tmp_path):
    path = tmp_path / "entry.npz"
    data = {"embeddings": np.ones((3, 4), np.float32), "coords": np.zeros((3, 2), np.int64)}
    EmbeddingsDataset(filepath=str(path)).save(data)
    loaded = EmbeddingsDataset(filepath=str(path)).load()
    assert np.array_equal(loaded["embeddings"], data["embeddings"])
    path.write_bytes(b"not a numpy file")
    with pytest.raises(DatasetError, match="entry.npz.*unreadable embedding cache entry"):
        EmbeddingsDataset(filepath=str(path)).load()


def test_model_file_dataset_saves_bytes_and_loads_its_path(tmp_path):
    dataset = ModelFileDataset(filepath=str(tmp_path / "models" / "m.pt"))
    with pytest.raises(DatasetError, match="no model file"):
        dataset.load()
    dataset.save(b"weights")
    assert dataset.load().read_bytes() == b"weights"


def test_tile_batches_mix_cores_and_label_each_tile_with_its_core(cohort):
    bags = make_dataset(cohort, config=BagConfig(input_size=16, max_tiles=4), train=True)
    five = ["0", "2+", "3"]
    batches = TileBatchDataset(bags, five, cores_per_batch=2, seed=1)
    sizes = [len(g) for g in batches.groups]
    assert sum(sizes) == 3 and 1 not in sizes  # no training group of one core
    item = batches[0]
    assert item.tiles.shape[0] == len(item.label) and item.tiles.shape[1:] == (3, 16, 16)
    labels = {bags.core_ids[i]: bags.labels[i] for i in range(3)}
    counts = [len(bags[i].tiles) for i in batches.groups[0]]
    expected = np.repeat([labels[bags.core_ids[i]] for i in batches.groups[0]], counts)
    assert np.array_equal(item.label.numpy(), expected)
    evaluation = make_dataset(cohort, config=BagConfig(input_size=16))
    ordered = TileBatchDataset(evaluation, five, cores_per_batch=2)
    assert ordered.groups == [[0, 1], [2]]


def test_bag_table_labels_from_manifest_external_split_and_empty_cores_reported():
    manifest = pd.DataFrame(
        {
            "core_id": ["a", "b", "c", "d"],
            "image": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
            "split": ["train", "val", "test", "test"],
            "cohort": ["internal", "internal", "external", "internal"],
            "five_class": ["2+", "0", "3", "1"],
            "ihc_score": [2, 0, 3, 1],
            "her2_status": [1, 0, 1, 0],
        }
    )
    tiles = pd.DataFrame({"core_id": ["a", "a", "b", "c"], "x": 0, "y": 0, "tissue_fraction": 1.0})
    table, problems = bag_table(manifest, tiles, TASKS["her2_status"], ["external"])
    assert list(table["core_id"]) == ["a", "b", "c"]
    assert list(table["y"]) == [1, 0, 1] and list(table["n_tiles"]) == [2, 1, 1]
    assert list(table["split"]) == ["train", "val", "external"]
    assert [(p.core_id, "no tissue tile" in p.reason) for p in problems] == [("d", True)]
    five, _ = bag_table(manifest, tiles, FIVE_CLASS_TASK)
    assert list(five["y"]) == [3, 0, 4]


def test_cohort_normaliser_changes_only_normalised_cohorts():
    assert cohort_normaliser(None, ["external"]) is None
    assert cohort_normaliser({"vectors": None}, ["external"]) is None
    reference = {"vectors": StainVectors.reference().to_dict(), "sources": {}}
    transform = cohort_normaliser(reference, ["external"])
    rgb = fake_core(128, 100, 14)
    assert transform({"cohort": "internal"}, rgb) is rgb
    changed = transform({"cohort": "external", "core_id": "x"}, rgb)
    assert changed.shape == rgb.shape and changed.dtype == np.uint8
    assert not np.array_equal(changed, rgb)


def test_fit_without_validation_cores_keeps_the_last_epoch_and_says_so(caplog):
    from her2_kedro.config import TorchModelConfig, TrainingConfig
    from her2_kedro.modelling.torch_study import ModelInputs, fit

    sizes = {f"c{i}": 4 for i in range(6)}
    rows = pd.DataFrame(
        {
            "core_id": list(sizes),
            "split": "train",
            "five_class": ["0", "3"] * 3,
            "y": [0, 1] * 3,
        }
    )
    spec = TorchModelConfig(
        name="m",
        input="embeddings",
        arch="attention_mil",
        training=TrainingConfig(max_epochs=3, early_stopping_patience=1),
    )
    inputs = ModelInputs(embeddings=_entries(sizes), embedding_dim=8)
    _, result, params = fit(spec, rows, TASKS["her2_status"], inputs, progress=False)
    assert "no validation cores" in caplog.text
    assert len(result.history) == 3 and result.selected_epoch == 2  # never stopped early
    assert params["in_dim"] == 8 and params["n_classes"] == 2


def test_stale_cache_entries_are_pruned_or_kept_and_counted(tmp_path, caplog):
    from her2_kedro.pipelines.features.nodes import _report_stale

    cache = {}
    for name in ("aaaa-enc1-s", "bbbb-enc1-s", "aaaa-enc0-s"):
        (tmp_path / f"{name}.npz").write_bytes(b"x" * 1000)
        cache[f"{name}.npz"] = tmp_path / f"{name}.npz"
    current = {"aaaa-enc1-s", "bbbb-enc1-s", "cccc-enc1-s"}  # cccc is still to compute
    with caplog.at_level("INFO"):
        _report_stale(cache, current, prune=False)
    assert "1 stale entries" in caplog.text and (tmp_path / "aaaa-enc0-s.npz").exists()
    _report_stale(cache, current, prune=True)
    assert sorted(p.stem for p in tmp_path.glob("*.npz")) == ["aaaa-enc1-s", "bbbb-enc1-s"]


def test_model_inputs_name_missing_cache_entries():
    from her2_kedro.config import TorchModelConfig
    from her2_kedro.pipelines.models.nodes import _inputs

    spec = TorchModelConfig(name="m", input="embeddings", arch="attention_mil")
    entry = {"embeddings": np.zeros((2, 8), np.float32), "coords": np.zeros((2, 2), np.int64)}
    index = pd.DataFrame({"core_id": ["c1", "c2"], "key": ["k1", "k2"], "n_tiles": [2, 2]})
    inputs = _inputs(
        spec,
        {},
        {},
        tile_embeddings={"k1.npz": lambda: entry, "k2.npz": lambda: entry},
        embedding_index=index,
    )
    assert set(inputs.embeddings) == {"c1", "c2"} and inputs.embedding_dim == 8
    with pytest.raises(KeyError, match="k2"):
        _inputs(spec, {}, {}, tile_embeddings={"k1.npz": lambda: entry}, embedding_index=index)


def test_fit_does_not_depend_on_what_ran_before_it():
    """The same spec and data give the same model whatever drew random numbers earlier in the
    process (in a pipeline: the encoder, other models)."""
    from her2_kedro.config import TorchModelConfig, TrainingConfig
    from her2_kedro.modelling.torch_study import ModelInputs, fit

    sizes = {f"c{i}": 3 + i % 3 for i in range(8)}
    rows = pd.DataFrame(
        {
            "core_id": list(sizes),
            "split": ["train"] * 6 + ["val"] * 2,
            "five_class": ["0", "3"] * 4,
            "y": [0, 1] * 4,
        }
    )
    spec = TorchModelConfig(
        name="m", input="embeddings", arch="attention_mil", training=TrainingConfig(max_epochs=2)
    )
    weights = []
    for earlier in (1, 1000):
        inputs = ModelInputs(embeddings=_entries(sizes), embedding_dim=8)  # the same entries
        torch.rand(earlier)  # unrelated random draws before the fit
        model, result, _ = fit(spec, rows, TASKS["her2_status"], inputs, progress=False)
        weights.append((model.classifier.weight.detach().clone(), result.history))
    assert torch.equal(weights[0][0], weights[1][0])
    assert weights[0][1] == weights[1][1]


def test_embedding_settings_follow_the_normalised_cohorts_stain_reference():
    """A normalised cohort's entries change with its source vectors and DAB factor; other
    cohorts' do not (their pixels are not normalised)."""
    from her2_kedro.config import TileConfig
    from her2_kedro.config.models import EncoderConfig
    from her2_kedro.pipelines.features.nodes import _embedding_settings

    reference = {"vectors": {"h": 1}, "sources": {"external": {"vectors": {"h": 2}}}}
    scaled = {**reference, "sources": {"external": {"vectors": {"h": 2}, "dab_scale": 1.5}}}
    config, rule = EncoderConfig(), TileConfig()

    def settings(cohort, ref):
        return _embedding_settings(config, rule, cohort, ref, ["external"])

    assert settings("external", reference) != settings("external", scaled)
    assert "dab_scale" not in settings("external", reference)["stain_reference"]
    assert settings("internal", reference) == settings("internal", scaled)
