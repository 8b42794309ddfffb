"""Model checkpoints that load without unpickling code.

A checkpoint is a ``.pt`` file holding only tensors and plain Python values::

    {"format": FORMAT, "schema_version": 1, "meta": {...}, "state_dict": {...}, "extras": {...}}

``meta`` records the architecture name and its constructor parameters (so the model can be rebuilt
from a registry, never from pickled classes), n_classes, class names, task, training parameters and
epoch; ``extras`` carries optional plain state such as an optimiser's ``state_dict()`` for resuming.
Files are read with ``torch.load(weights_only=True)`` and every problem (missing, corrupted,
truncated, or mismatched file) raises ``CheckpointError`` naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from her2_kedro.modelling.attention import build_attention_mil
from her2_kedro.modelling.clam import build_clam
from her2_kedro.modelling.core_classifier import build_core_classifier
from her2_kedro.modelling.encoders import build_encoder, state_mismatches

FORMAT = "her2_kedro.checkpoint"
SCHEMA_VERSION = 1
#: Constructor parameters that name initial weights; the state dict supplies every weight, so
#: they are set to None when a model is rebuilt (no download, no dependency on the original file).
WEIGHT_PARAMS = ("weights", "encoder_weights")
_PLAIN = (str, int, float, bool, type(None))


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not match what the caller expects."""


def _encoder_trunk(name: str = "resnet34", weights: str | None = None) -> nn.Module:
    """A bare trunk (arch ``"encoder"``), e.g. a backbone trained here and frozen for the cache."""
    return build_encoder(name, weights)[0]


def _torchmil_aggregator(**params: Any) -> nn.Module:
    """A torchmil aggregator (arch ``"torchmil"``); imports torchmil only when one is built."""
    from her2_kedro.modelling.aggregators import build_torchmil_aggregator

    return build_torchmil_aggregator(**params)


#: Architecture name -> builder called with the checkpoint's ``meta["params"]``.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "attention_mil": build_attention_mil,
    "clam": build_clam,
    "core_classifier": build_core_classifier,
    "encoder": _encoder_trunk,
    "torchmil": _torchmil_aggregator,
}


def register_architecture(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``name`` loadable: ``builder(**params)`` must rebuild the model from plain parameters."""
    ARCHITECTURES[name] = builder


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode), its meta and any extras."""

    model: nn.Module
    meta: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` could not read back (or would pickle).

    Types are matched exactly: subclasses such as ``numpy.float64`` or torch's ``TorchVersion``
    (a ``str``) would be pickled as their own classes.
    """
    if type(value) in _PLAIN or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where}: {type(value).__name__} is not a tensor or plain Python value")


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    arch: str,
    params: Mapping[str, Any],
    *,
    class_names: list[str] | None = None,
    task: str | None = None,
    training: Mapping[str, Any] | None = None,
    epoch: int | None = None,
    extras: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s state dict and meta to ``path`` atomically; returns the path.

    ``params`` must rebuild the model: ``ARCHITECTURES[arch](**params)``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {arch!r}; register it first ({sorted(ARCHITECTURES)})"
        )
    n_classes = params.get("n_classes", len(class_names) if class_names else None)
    if class_names is not None and n_classes is not None and len(class_names) != n_classes:
        raise ValueError(f"{len(class_names)} class names for n_classes={n_classes}")
    meta = {
        "schema_version": SCHEMA_VERSION,
        "arch": arch,
        "params": dict(params),
        "n_classes": n_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "task": task,
        "training": dict(training or {}),
        "epoch": epoch,
        "torch_version": str(torch.__version__),
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "meta": meta,
        "state_dict": state,
        "extras": dict(extras or {}),
    }
    _check_plain(payload, "checkpoint")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # an interrupted save never leaves a half-written checkpoint behind
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint's structure (no model is built); returns the payload dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, disallowed globals, ...
        raise CheckpointError(
            f"{path}: unreadable checkpoint (corrupted or truncated?): {exc}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: schema version {payload.get('schema_version')!r}, "
            f"this code reads {SCHEMA_VERSION}"
        )
    meta, state = payload.get("meta"), payload.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(meta.get("params"), dict):
        raise CheckpointError(f"{path}: missing or malformed meta")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: missing or malformed state_dict")
    return payload


def _check_expected(
    path: Path, meta: Mapping[str, Any], expected_arch: str | None, expected: Mapping[str, Any]
) -> None:
    """Compare meta with what the caller expects; a key is looked up in meta, then meta['params']."""
    wanted = dict(expected)
    if expected_arch is not None:
        wanted["arch"] = expected_arch
    problems = []
    for key, value in wanted.items():
        have = meta[key] if key in meta else meta["params"].get(key, "<absent>")
        if have != value:
            problems.append(f"{key}: checkpoint has {have!r}, expected {value!r}")
    if problems:
        raise CheckpointError(f"{path}: mismatch: " + "; ".join(problems))


def _check_state(path: Path, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Name missing and unexpected keys and shape mismatches before a strict load."""
    problems = state_mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{path}: state dict mismatch: " + "; ".join(problems))


def load_checkpoint(
    path: str | os.PathLike,
    expected_arch: str | None = None,
    expected: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Rebuild the model from a checkpoint's meta and load its weights strictly (eval mode).

    ``expected`` maps meta keys (``n_classes``, ``task``, ...; or constructor parameters such as
    ``encoder``) to required values; any difference raises ``CheckpointError``.
    """
    path = Path(path)
    payload = read_checkpoint(path)
    meta, state = payload["meta"], payload["state_dict"]
    _check_expected(path, meta, expected_arch, expected or {})
    builder = ARCHITECTURES.get(meta.get("arch"))
    if builder is None:
        raise CheckpointError(f"{path}: unknown architecture {meta.get('arch')!r}")
    params = {k: (None if k in WEIGHT_PARAMS else v) for k, v in meta["params"].items()}
    try:
        model = builder(**params)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot build {meta['arch']} from {params}: {exc}") from exc
    _check_state(path, model, state)
    model.load_state_dict(state, strict=True)
    model.to(map_location).eval()
    return Checkpoint(model, meta, dict(payload.get("extras") or {}))


#: The head of an attention-MIL model: what a model on cached embeddings and the same model end to
#: end (trunk + head) share, parameter for parameter.
HEAD_PREFIXES = ("attention.", "classifier.")


def load_head(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Copy the attention and classifier weights of the attention-MIL checkpoint at ``path`` into
    ``model`` (its trunk untouched); the names copied. A checkpoint of another architecture, or
    whose head differs in a key or a shape, raises ``CheckpointError`` naming the file and why."""
    path = Path(path)
    payload = read_checkpoint(path)
    arch = payload["meta"].get("arch")
    if arch != "attention_mil":
        raise CheckpointError(
            f"{path}: a head comes from an attention_mil checkpoint, not {arch!r}"
        )
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIXES)}
    head = {k: v for k, v in payload["state_dict"].items() if k.startswith(HEAD_PREFIXES)}
    problems = state_mismatches(expected, head)
    if problems:
        raise CheckpointError(f"{path}: head does not fit the model: " + "; ".join(problems))
    model.load_state_dict(head, strict=False)
    return sorted(head)


def checkpoint_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a checkpoint file's bytes, for cache keys (e.g. of cached embeddings)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()
