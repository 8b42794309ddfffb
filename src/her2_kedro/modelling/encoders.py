"""Tile encoders: torchvision ResNet trunks without their classifier, through one small registry.

A trunk maps tiles ``(N, 3, s, s)`` to features ``(N, D)`` after global average pooling (the fc
layer is replaced by ``Identity``). Initial weights are a parameter: ``None`` (random init, as the
authors trained both CNNs), a torchvision weights enum name such as ``"IMAGENET1K_V1"`` (loaded by
torchvision, which downloads on first use, so only on machines that can), or a local checkpoint
file holding a state dict, read with ``torch.load(weights_only=True)`` so no code is unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

#: Registered trunks and their feature width after global average pooling.
ENCODERS: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
DEFAULT_ENCODER = "resnet34"  # the paper's backbone
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


class EncoderError(ValueError):
    """An unknown trunk, unknown weights name, or an unreadable / mismatched weights file."""


def build_encoder(
    name: str = DEFAULT_ENCODER, weights: str | os.PathLike | None = None
) -> tuple[nn.Module, int]:
    """Return ``(trunk, feature_width)`` for a registered trunk with the requested initial weights."""
    if name not in ENCODERS:
        raise EncoderError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    from_file = weights is not None and _is_path(weights)
    enum = None if weights is None or from_file else _weights_enum(name, str(weights))
    model = torchvision.models.get_model(name, weights=enum)
    width = model.fc.in_features
    if width != ENCODERS[name]:  # guards the registry table against torchvision changes
        raise EncoderError(f"{name}: feature width {width}, registry says {ENCODERS[name]}")
    model.fc = nn.Identity()
    if from_file:
        load_trunk_state(model, Path(weights), name)
    return model, width


def _is_path(weights: str | os.PathLike) -> bool:
    """A weights value names a file when it is a path object, has a separator or a weights suffix."""
    if isinstance(weights, os.PathLike):
        return True
    text = str(weights)
    if os.sep in text or "/" in text or text.lower().endswith(_CHECKPOINT_SUFFIXES):
        return True
    return Path(text).is_file()


def _weights_enum(name: str, weights: str):
    """Resolve a torchvision weights enum member by name (no download happens here)."""
    enum = torchvision.models.get_model_weights(name)
    if weights == "DEFAULT":
        return enum.DEFAULT
    if weights not in enum.__members__:
        raise EncoderError(
            f"{name}: unknown weights {weights!r}; choose one of {sorted(enum.__members__)}, "
            "None, or a local checkpoint path (ending in .pt/.pth or containing a '/')"
        )
    return enum[weights]


def extract_trunk_state(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Pick the trunk's state dict out of a loaded file.

    Accepts a plain state dict, a dict holding one under ``"state_dict"`` (this project's checkpoint
    format), keys prefixed ``module.`` (DDP) and, from an end-to-end MIL checkpoint, the keys under
    ``encoder.``. A torchvision classifier head (``fc.*``) is dropped.
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EncoderError(f"{path}: does not hold a state dict of tensors")
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("encoder.") for k in state):
        state = {
            k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")
        }
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def state_mismatches(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> list[str]:
    """Missing and unexpected keys and shape mismatches of ``state`` against ``expected``, in
    words (first five of each), for errors that say why a strict load would fail."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = [
        f"missing keys {missing[:5]} ({len(missing)} in all)" if missing else "",
        f"unexpected keys {unexpected[:5]} ({len(unexpected)} in all)" if unexpected else "",
        f"shape mismatches {shapes[:5]}" if shapes else "",
    ]
    return [p for p in parts if p]


def load_trunk_state(trunk: nn.Module, path: Path, name: str) -> None:
    """Load a trunk state dict from ``path`` strictly; any problem raises ``EncoderError`` naming it."""
    if not path.is_file():
        raise EncoderError(f"{path}: encoder weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / garbage files
        raise EncoderError(f"{path}: cannot read encoder weights ({exc})") from exc
    state = extract_trunk_state(obj, path)
    problems = state_mismatches(trunk.state_dict(), state)
    if problems:
        raise EncoderError(f"{path}: weights do not match {name}: " + "; ".join(problems))
    trunk.load_state_dict(state, strict=True)
