"""Encoder registry: feature widths, random init, local checkpoint weights and their errors."""

from __future__ import annotations

import pytest
import torch

from her2_kedro.modelling.encoders import ENCODERS, EncoderError, build_encoder


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_each_trunk_gives_its_feature_width(name: str) -> None:
    torch.manual_seed(0)
    trunk, width = build_encoder(name, weights=None)
    assert width == ENCODERS[name]
    trunk.eval()
    with torch.inference_mode():
        out = trunk(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, width)


def test_default_is_resnet34() -> None:
    trunk, width = build_encoder()
    assert width == 512
    assert (
        sum(len(layer) for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)) == 16
    )


def test_weights_from_a_local_checkpoint(tmp_path) -> None:
    torch.manual_seed(1)
    source, _ = build_encoder("resnet18")
    path = tmp_path / "trunk.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    loaded, _ = build_encoder("resnet18", weights=path)
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    x = torch.rand(2, 3, 32, 32)
    source.eval(), loaded.eval()
    assert torch.allclose(source(x), loaded(x))


def test_weights_from_an_end_to_end_mil_state_dict(tmp_path) -> None:
    """The trunk of a MIL model trained end to end can seed the frozen embedding encoder."""
    source, _ = build_encoder("resnet18")
    state = {f"encoder.{k}": v for k, v in source.state_dict().items()}
    state["classifier.weight"] = torch.zeros(2, 512)
    path = tmp_path / "mil.pt"
    torch.save({"state_dict": state, "meta": {"arch": "attention_mil"}}, path)
    loaded, _ = build_encoder("resnet18", weights=str(path))
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)


def test_missing_weights_file_is_named(tmp_path) -> None:
    path = tmp_path / "nowhere" / "trunk.pt"
    with pytest.raises(EncoderError, match="trunk.pt.*not found"):
        build_encoder("resnet18", weights=path)


def test_mismatched_weights_file_is_named(tmp_path) -> None:
    other, _ = build_encoder("resnet50")
    path = tmp_path / "r50.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(EncoderError, match=r"r50\.pt.*do not match resnet18"):
        build_encoder("resnet18", weights=path)


def test_garbage_weights_file_is_named(tmp_path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a torch file at all")
    with pytest.raises(EncoderError, match=r"garbage\.pth.*cannot read"):
        build_encoder("resnet18", weights=path)


def test_unknown_names_are_refused_without_downloading() -> None:
    with pytest.raises(EncoderError, match="unknown encoder"):
        build_encoder("vgg11")
    with pytest.raises(EncoderError, match="IMAGENET1K_V1"):
        build_encoder("resnet18", weights="IMAGENET_BEST")
