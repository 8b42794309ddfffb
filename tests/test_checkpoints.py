"""Checkpoints: round trip, plain-data payload, and named errors for bad or mismatched files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from her2_kedro.modelling.attention import build_attention_mil
from her2_kedro.modelling.checkpoints import (
    CheckpointError,
    checkpoint_sha256,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from her2_kedro.modelling.encoders import build_encoder

PARAMS = {"n_classes": 4, "in_dim": 64, "hidden_dim": 16}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_attention_mil(**PARAMS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 64)).logits.sum().backward()
    opt.step()
    path = save_checkpoint(
        tmp_path / "ckpt" / "mil.pt",
        model,
        "attention_mil",
        PARAMS,
        class_names=["0", "1", "2", "3"],
        task="ihc_score",
        training={"lr": 1e-3, "seed": 0},
        epoch=3,
        extras={"optimizer": opt.state_dict(), "rng": torch.get_rng_state()},
    )
    return path, model


def test_round_trip_gives_the_same_outputs(saved) -> None:
    path, model = saved
    loaded = load_checkpoint(path, expected_arch="attention_mil", expected={"n_classes": 4})
    bag = torch.randn(9, 64)
    model.eval()
    assert torch.equal(model(bag).logits, loaded.model(bag).logits)
    assert loaded.meta["task"] == "ihc_score" and loaded.meta["epoch"] == 3
    assert loaded.meta["class_names"] == ["0", "1", "2", "3"]
    assert loaded.meta["training"] == {"lr": 1e-3, "seed": 0}
    opt = torch.optim.Adam(loaded.model.parameters(), lr=1e-3)
    opt.load_state_dict(loaded.extras["optimizer"])  # resumable: optimiser state survives
    assert not path.with_name("mil.pt.tmp").exists()


def test_end_to_end_round_trip_and_no_download_on_rebuild(tmp_path) -> None:
    torch.manual_seed(0)
    params = {"n_classes": 2, "encoder": "resnet18", "encoder_weights": "IMAGENET1K_V1"}
    model = build_attention_mil(n_classes=2, encoder="resnet18").eval()
    path = save_checkpoint(tmp_path / "e2e.pt", model, "attention_mil", params)
    loaded = load_checkpoint(path, expected={"encoder": "resnet18"})
    tiles = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(tiles).logits, loaded.model(tiles).logits)


def test_payload_is_plain_and_loads_with_weights_only(saved) -> None:
    path, _ = saved
    payload = torch.load(path, weights_only=True)  # would fail on any pickled class
    assert set(payload) == {"format", "schema_version", "meta", "state_dict", "extras"}
    assert read_checkpoint(path)["meta"]["arch"] == "attention_mil"


def test_unplain_values_are_refused_at_save(tmp_path) -> None:
    model = build_attention_mil(**PARAMS)
    with pytest.raises(TypeError, match="training.*object"):
        save_checkpoint(tmp_path / "x.pt", model, "attention_mil", PARAMS, training={"a": object()})
    with pytest.raises(TypeError, match="lr.*float64"):  # a float subclass pickles as numpy's class
        save_checkpoint(
            tmp_path / "x.pt", model, "attention_mil", PARAMS, training={"lr": np.float64(0.1)}
        )
    assert not (tmp_path / "x.pt").exists()


def test_missing_file_is_named(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"absent\.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_corrupted_file_is_named(tmp_path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=r"garbage\.pt: unreadable checkpoint"):
        load_checkpoint(path)


def test_truncated_file_is_named(saved) -> None:
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"mil\.pt: unreadable checkpoint"):
        load_checkpoint(path)


def test_foreign_file_is_named(tmp_path) -> None:
    path = tmp_path / "plain_state.pt"
    torch.save(build_attention_mil(**PARAMS).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"plain_state\.pt: not a her2_kedro\.checkpoint"):
        load_checkpoint(path)


def test_mismatched_architecture_is_named(saved) -> None:
    path, _ = saved
    with pytest.raises(
        CheckpointError, match=r"mil\.pt: mismatch: arch: .*'attention_mil'.*'clam_sb'"
    ):
        load_checkpoint(path, expected_arch="clam_sb")


def test_mismatched_n_classes_is_named(saved) -> None:
    path, _ = saved
    with pytest.raises(
        CheckpointError, match=r"mil\.pt: mismatch: n_classes: checkpoint has 4, expected 2"
    ):
        load_checkpoint(path, expected={"n_classes": 2})


def test_state_dict_mismatches_are_named(tmp_path) -> None:
    model = build_attention_mil(**PARAMS)
    shape_path = save_checkpoint(
        tmp_path / "shape.pt", model, "attention_mil", {**PARAMS, "hidden_dim": 8}
    )
    with pytest.raises(CheckpointError, match=r"shape\.pt: state dict mismatch: shape mismatches"):
        load_checkpoint(shape_path)
    keys_path = save_checkpoint(
        tmp_path / "keys.pt",
        model,
        "attention_mil",
        {**PARAMS, "in_dim": 512, "encoder": "resnet18"},
    )
    with pytest.raises(
        CheckpointError, match=r"keys\.pt: state dict mismatch: missing keys \['encoder"
    ):
        load_checkpoint(keys_path)


def test_sha256_follows_the_content(saved, tmp_path) -> None:
    path, model = saved
    digest = checkpoint_sha256(path)
    assert len(digest) == 64 and digest == checkpoint_sha256(path)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(path.read_bytes())
    assert checkpoint_sha256(copy) == digest
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    other = save_checkpoint(tmp_path / "other.pt", model, "attention_mil", PARAMS)
    assert checkpoint_sha256(other) != digest


def test_encoder_trunk_round_trip_also_feeds_build_encoder(tmp_path) -> None:
    torch.manual_seed(0)
    trunk, _ = build_encoder("resnet18")
    path = save_checkpoint(tmp_path / "trunk.pt", trunk, "encoder", {"name": "resnet18"})
    loaded = load_checkpoint(path, expected_arch="encoder", expected={"name": "resnet18"})
    again, _ = build_encoder("resnet18", weights=path)  # the same file as encoder weights
    x = torch.rand(2, 3, 32, 32)
    trunk.eval(), again.eval()
    with torch.no_grad():
        assert torch.allclose(trunk(x), loaded.model(x))
        assert torch.allclose(trunk(x), again(x))
