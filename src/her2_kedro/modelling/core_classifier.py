"""The paper's whole-core CNN: a ResNet (ResNet34, random initialisation) classifying each core.

Input: a batch of whole cores downscaled to squares (:class:`~her2_kedro.modelling.core_images.
CoreBatch`, float [B, 3, s, s] in [0, 1]); output: class logits [B, n_classes]. The trunk is
:func:`~her2_kedro.modelling.encoders.build_encoder` (global average pooling, so any input side
works) followed by one ``Linear(width, n_classes)``, i.e. torchvision's ResNet with its own head.
The output is a :class:`ClassifierOutput` with ``logits`` (and ``attention`` always ``None``) so
the shared training loop and scoring code read ``.logits`` as they do for the MIL models.

Memory format: the weights and inputs are kept channels-last by default (``channels_last``).
Measured on this project's 2-core CPU (one training step, Adam): ResNet34 at 128 px, batch 32,
1.66-1.72 s channels-last vs 1.81-1.83 s contiguous (about 5-10% faster; inference about 15%);
at 224 px, batch 8, about equal; at tiny test sizes (ResNet18, 32 px, batch 12) channels-last is
20-30% slower (150-166 vs 126-128 ms). On CUDA with bf16 it is the layout cuDNN prefers (not
timed here).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

from her2_kedro.modelling.encoders import DEFAULT_ENCODER, build_encoder

__all__ = ["ClassifierOutput", "CoreClassifier", "build_core_classifier"]


class ClassifierOutput(NamedTuple):
    """Class ``logits`` [B, n_classes]; ``attention`` is always ``None`` (no instances here)."""

    logits: torch.Tensor
    attention: torch.Tensor | None = None


class CoreClassifier(nn.Module):
    """ResNet trunk + linear head over whole downscaled cores.

    ``encoder`` names a registered trunk (``resnet34`` as in the paper); ``encoder_weights`` its
    initial weights (``None``: random initialisation, as the authors trained it; a torchvision
    weights name; or a local state-dict file), see :func:`~her2_kedro.modelling.encoders.
    build_encoder`. ``channels_last`` keeps weights and inputs in channels-last memory format.
    """

    def __init__(
        self,
        n_classes: int,
        encoder: str = DEFAULT_ENCODER,
        encoder_weights: str | os.PathLike | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.n_classes, self.channels_last = int(n_classes), bool(channels_last)
        self.encoder, width = build_encoder(encoder, encoder_weights)
        self.classifier = nn.Linear(width, self.n_classes)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> ClassifierOutput:
        """Logits [B, n_classes] for images [B, 3, s, s] (a single [3, s, s] image is batched)."""
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, s, s], got shape {tuple(images.shape)}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return ClassifierOutput(self.classifier(self.encoder(images)), None)


def build_core_classifier(
    n_classes: int,
    encoder: str = DEFAULT_ENCODER,
    encoder_weights: str | os.PathLike | None = None,
    channels_last: bool = True,
) -> CoreClassifier:
    """The whole-core classifier from plain parameters (checkpoint arch ``core_classifier``)."""
    return CoreClassifier(n_classes, encoder, encoder_weights, channels_last)
