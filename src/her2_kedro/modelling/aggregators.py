"""Stronger MIL aggregators from torchmil 1.0.2 (TransMIL, DSMIL) behind our one-bag interface.

:class:`TorchmilAggregator` takes one bag of embeddings ``(N, D)`` (or ``(1, N, D)``) and returns
``.logits`` ``(n_classes,)`` and ``.attention`` ``(N,)`` summing to 1, like
:class:`~her2_kedro.modelling.attention.AttentionMIL`, so the training loop, evaluation and
checkpoints treat it the same way. torchmil's TransMIL and DSMIL emit one logit (binary tasks
only); their bag heads are replaced here to give ``n_classes`` logits:

* TransMIL (Shao et al. 2021): ``classifier`` becomes ``Linear(att_dim, n_classes)`` on the class
  token. Attention is a proxy: the class token's row of the last Nystrom layer's approximate
  attention matrix, averaged over heads, restricted to the ``N`` tiles (the copies TransMIL pads
  the sequence to a square with are dropped), clipped at 0 (the Nystrom approximation can go
  negative) and renormalised; uniform ``1/N`` if nothing positive remains.
* DSMIL (Li et al. 2021), multi-class as in the paper: the instance classifier gives one score
  per class, each class has its own critical instance and its own attention over the tiles, and
  the bag classifier is a ``Conv1d(n_classes, n_classes, kernel_size=D)`` over the ``n_classes``
  bag embeddings. ``logits`` average the bag stream and the max-pooled instance stream (as
  torchmil's ``predict``); ``attention`` is the predicted class's. The training loss is the mean
  of the two streams' cross-entropies (torchmil's ``compute_loss`` sums their BCEs).

torchmil is imported when an aggregator is built, not when this module is imported.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from her2_kedro.modelling.attention import MILOutput

__all__ = ["AGGREGATORS", "DSMILOutput", "TorchmilAggregator", "build_torchmil_aggregator"]

#: torchmil models wrapped here.
AGGREGATORS = ("transmil", "dsmil")


class DSMILOutput(NamedTuple):
    """DSMIL's output: averaged ``logits`` and predicted-class ``attention`` (as MILOutput), plus
    the two streams' logits ``(n_classes,)`` that its training loss needs."""

    logits: torch.Tensor
    attention: torch.Tensor
    bag_logits: torch.Tensor
    max_instance_logits: torch.Tensor


def _normalise(weights: torch.Tensor) -> torch.Tensor:
    """Non-negative weights ``(N,)`` summing to 1 (negatives clipped; uniform if none positive)."""
    weights = weights.clamp(min=0)
    total = weights.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.full_like(weights, 1.0 / weights.numel())
    return weights / total


class TorchmilAggregator(nn.Module):
    """A torchmil model (``name``: ``"transmil"`` or ``"dsmil"``) with ``n_classes`` outputs.

    ``kwargs`` go to the torchmil constructor (TransMIL: ``att_dim``, ``n_layers``, ``n_heads``,
    ``n_landmarks``, ``pinv_iterations``, ``dropout``, ``use_mlp``; DSMIL: ``att_dim``,
    ``nonlinear_q``, ``nonlinear_v``, ``dropout``); they must be plain values for checkpoints.
    """

    def __init__(self, name: str, n_classes: int, in_dim: int = 512, **kwargs: Any) -> None:
        super().__init__()
        if name not in AGGREGATORS:
            raise ValueError(f"unknown torchmil aggregator {name!r}; one of {AGGREGATORS}")
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        from torchmil.models import DSMIL, TransMIL

        self.name, self.n_classes, self.in_dim = name, n_classes, in_dim
        if name == "transmil":
            self.model = TransMIL(in_shape=(in_dim,), **kwargs)
            self.model.classifier = nn.Linear(self.model.classifier.in_features, n_classes)
        else:
            self.model = DSMIL(in_shape=(in_dim,), **kwargs)
            self.model.inst_classifier = nn.Linear(in_dim, n_classes)
            self.model.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=in_dim)

    def forward(self, bag: torch.Tensor) -> MILOutput | DSMILOutput:
        """Logits ``(n_classes,)`` and attention ``(N,)`` for embeddings ``(N, D)``/``(1, N, D)``."""
        if bag.dim() == 3 and bag.shape[0] == 1:
            bag = bag[0]
        if bag.dim() != 2 or bag.shape[1] != self.in_dim or bag.shape[0] == 0:
            raise ValueError(
                f"expected a non-empty bag of shape (N, {self.in_dim}), got {tuple(bag.shape)}"
            )
        x = bag[None]
        if self.name == "transmil":
            logits, attention = self.model(x, return_att=True)  # (1, C), (1, N)
            return MILOutput(logits[0], _normalise(attention[0].detach()))
        bag_logits, attention, instance_logits = self.model(
            x, return_att=True, return_inst_pred=True
        )  # (1, C), (1, N, C) softmaxed over tiles, (1, N, C)
        bag_logits, max_logits = bag_logits[0], instance_logits[0].max(dim=0).values
        logits = 0.5 * (bag_logits + max_logits)
        return DSMILOutput(
            logits, attention[0, :, int(logits.detach().argmax())], bag_logits, max_logits
        )

    def training_loss(self, output: MILOutput | DSMILOutput, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy for TransMIL; for DSMIL the mean of the bag and max-instance streams'."""
        target = target.reshape(-1)
        if isinstance(output, DSMILOutput):
            bag = F.cross_entropy(output.bag_logits.float().reshape(1, -1), target)
            top = F.cross_entropy(output.max_instance_logits.float().reshape(1, -1), target)
            return 0.5 * (bag + top)
        return F.cross_entropy(output.logits.float().reshape(1, -1), target)


def build_torchmil_aggregator(
    name: str, n_classes: int, in_dim: int = 512, **kwargs: Any
) -> TorchmilAggregator:
    """Build a :class:`TorchmilAggregator` from plain parameters (checkpoint arch ``"torchmil"``)."""
    return TorchmilAggregator(name, n_classes, in_dim, **kwargs)
