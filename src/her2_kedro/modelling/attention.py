"""Gated-attention multiple-instance learning (Ilse et al. 2018), the paper's bag model.

One bag is one TMA core: its tiles' features ``h_i`` (``D = 512`` for ResNet18/34) get attention
``a = softmax_i(w(tanh(V h_i) * sigmoid(U h_i)))`` with ``V, U: D -> 256`` and ``w: 256 -> 1``
(one head, as in the authors' code); the bag embedding ``sum_i a_i h_i`` goes to
``Linear(D, n_classes)``. The same module runs on cached embeddings ``(N, D)`` or end to end on
tiles ``(N, 3, s, s)`` through a trainable encoder, in tile micro-batches with optional gradient
checkpointing so a whole core (576 tiles of 224 px) fits in memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from her2_kedro.modelling.batch_norm import batch_norms, frozen_batch_norm
from her2_kedro.modelling.encoders import build_encoder


class MILOutput(NamedTuple):
    """A bag's class logits ``(n_classes,)`` and its tiles' attention ``(N,)`` (sums to 1)."""

    logits: torch.Tensor
    attention: torch.Tensor


class GatedAttention(nn.Module):
    """Unnormalised gated attention scores ``w(tanh(V h) * sigmoid(U h))`` for each instance."""

    def __init__(self, in_dim: int = 512, hidden_dim: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh())
        self.U = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Sigmoid())
        self.dropout = nn.Dropout(dropout)
        self.w = nn.Linear(hidden_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Scores ``(N,)`` for features ``(N, in_dim)``; softmax them over the bag for weights."""
        return self.w(self.dropout(self.V(h) * self.U(h))).squeeze(-1)


class AttentionMIL(nn.Module):
    """Gated-attention MIL over one bag, on embeddings or (with ``encoder``) on tiles end to end.

    ``micro_batch`` tiles go through the encoder at a time; ``grad_checkpoint`` recomputes each
    micro-batch's activations in the backward pass instead of keeping them (used only when
    gradients are being recorded). Note that in training mode BatchNorm normalises each
    micro-batch with its own statistics (the authors passed the whole bag at once), and with
    checkpointing its running statistics are updated again during recomputation.
    """

    def __init__(
        self,
        n_classes: int,
        in_dim: int = 512,
        hidden_dim: int = 256,
        dropout: float = 0.0,
        encoder: nn.Module | None = None,
        micro_batch: int = 64,
        grad_checkpoint: bool = False,
        freeze_batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.freeze_batch_norm = bool(freeze_batch_norm)
        if n_classes < 1 or micro_batch < 1:
            raise ValueError(
                f"n_classes ({n_classes}) and micro_batch ({micro_batch}) must be >= 1"
            )
        self.n_classes, self.in_dim = n_classes, in_dim
        self.micro_batch, self.grad_checkpoint = micro_batch, grad_checkpoint
        self.encoder = encoder
        self.feature_dropout = nn.Dropout(dropout)
        self.attention = GatedAttention(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(in_dim, n_classes)

    def train(self, mode: bool = True) -> AttentionMIL:
        """Training mode; with ``freeze_batch_norm`` the encoder's BatchNorm layers stay in eval
        mode (running statistics, not one bag's), e.g. when fine-tuning a trained trunk."""
        super().train(mode)
        if mode and self.freeze_batch_norm and self.encoder is not None:
            for m in batch_norms(self.encoder):
                m.eval()
        return self

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tile features ``(N, in_dim)`` from tiles ``(N, 3, s, s)``, one micro-batch at a time.

        The bag is cut into equal-as-possible chunks of at most ``micro_batch`` tiles, so (for
        ``micro_batch > 2``) no chunk of a bag of several tiles is left with one tile alone:
        BatchNorm in training fails on a single tile whose last feature map is 1x1. A bag of one
        tile is encoded with BatchNorm's running statistics (its own would be degenerate).
        """
        if self.encoder is None:
            raise ValueError("this AttentionMIL has no encoder: pass embeddings of shape (N, D)")
        use_ckpt = self.grad_checkpoint and torch.is_grad_enabled()
        parts = []
        n_chunks = -(-tiles.shape[0] // self.micro_batch)
        with frozen_batch_norm(self.encoder, tiles.shape[0] == 1 and self.training):
            for chunk in torch.tensor_split(tiles, n_chunks):
                if use_ckpt:
                    parts.append(checkpoint(self.encoder, chunk, use_reentrant=False))
                else:
                    parts.append(self.encoder(chunk))
        return torch.cat(parts).flatten(1)

    def forward(self, bag: torch.Tensor) -> MILOutput:
        """Logits and attention for one bag: embeddings ``(N, D)`` or tiles ``(N, 3, s, s)``.

        A leading batch dimension of one (``(1, N, ...)``, as a DataLoader yields) is dropped.
        """
        if bag.dim() in (3, 5) and bag.shape[0] == 1:
            bag = bag[0]
        if bag.dim() == 4:
            bag = self.encode(bag)
        if bag.dim() != 2 or bag.shape[1] != self.in_dim or bag.shape[0] == 0:
            raise ValueError(
                f"expected a non-empty bag of shape (N, {self.in_dim}) or (N, 3, s, s), "
                f"got {tuple(bag.shape)}"
            )
        h = self.feature_dropout(bag)
        attention = torch.softmax(self.attention(h), dim=0)
        embedding = attention @ h
        return MILOutput(self.classifier(embedding), attention)


def build_attention_mil(
    n_classes: int,
    encoder: str | None = None,
    encoder_weights: str | None = None,
    in_dim: int = 512,
    hidden_dim: int = 256,
    dropout: float = 0.0,
    micro_batch: int = 64,
    grad_checkpoint: bool = False,
    freeze_batch_norm: bool = False,
) -> AttentionMIL:
    """Build AttentionMIL from plain parameters (as stored in a checkpoint's meta).

    ``encoder`` names a registered trunk for end-to-end mode (its width overrides ``in_dim``);
    ``None`` builds the embeddings-only model.
    """
    trunk = None
    if encoder is not None:
        trunk, in_dim = build_encoder(encoder, encoder_weights)
    return AttentionMIL(
        n_classes,
        in_dim,
        hidden_dim,
        dropout,
        trunk,
        micro_batch,
        grad_checkpoint,
        freeze_batch_norm,
    )
