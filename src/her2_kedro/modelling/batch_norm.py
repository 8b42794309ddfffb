"""BatchNorm on small CPU batches: recompute running statistics, or keep them frozen.

With a few optimiser steps per epoch, small batches and a high learning rate, BatchNorm's running
averages (momentum 0.1) lag behind the weights, and a model that fits its training batches
predicts one class at evaluation. :func:`recompute_batch_norm` ("precise BN") resets them after an
epoch and averages the batch statistics of a few training items under the current weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["batch_norms", "frozen_batch_norm", "recompute_batch_norm"]


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of a module."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def frozen_batch_norm(module: nn.Module, active: bool = True) -> Iterator[None]:
    """While active, BatchNorm layers of ``module`` use (and keep) their running statistics."""
    norms = batch_norms(module)
    states = [m.training for m in norms]
    if active:
        for m in norms:
            m.eval()
    try:
        yield
    finally:
        for m, state in zip(norms, states, strict=True):
            m.train(state)


def recompute_batch_norm(
    model: nn.Module, items: Iterable[Any], forward: Callable[[nn.Module, Any], Any]
) -> int:
    """Reset every BatchNorm's running statistics and set them to the cumulative average over
    ``items`` (``forward(model, item)`` runs one), in training mode without gradients; BatchNorm
    layers kept frozen (in eval mode) by the model are left alone. Returns the items used."""
    was_training = model.training
    model.train()  # a model that freezes some BatchNorm layers keeps them in eval mode here
    live = [m for m in batch_norms(model) if m.training]
    momenta = [m.momentum for m in live]
    for m in live:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    used = 0
    try:
        with torch.no_grad():
            for item in items:
                forward(model, item)
                used += 1
    finally:
        for m, momentum in zip(live, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return used
