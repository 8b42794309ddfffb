"""Class-balanced sampling of training cores over the paper's five classes (0, 1, 2-, 2+, 3).

The authors draw training cores with weights that give each of the five classes the same total
probability (so in the score task, score 2 gets about 2/5 of the draws). Their public code builds the
sampler once and never sets its epoch, so every epoch repeats one and the same draw sequence; that is
a bug, not the method. Here every epoch draws anew from a generator seeded by ``(seed, epoch)``:
epochs differ, and a rerun with the same seed repeats each epoch exactly (also after a resume).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from her2_kedro.schema import FIVE_CLASSES

__all__ = ["FiveClassSampler", "five_class_weights"]


def five_class_weights(five_class: Sequence[str]) -> np.ndarray:
    """Per-core draw probabilities: each class present gets an equal share, split evenly among its
    cores; classes absent from ``five_class`` get nothing. Sums to 1.

    Raises ValueError naming labels outside ``schema.FIVE_CLASSES`` (e.g. missing ones).
    """
    labels = np.asarray([str(c) for c in five_class], dtype=object)
    if len(labels) == 0:
        raise ValueError("no training cores to sample from")
    unknown = sorted(set(labels) - set(FIVE_CLASSES))
    if unknown:
        raise ValueError(f"five_class labels {unknown} are not among {list(FIVE_CLASSES)}")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / (len(classes) * counts[inverse].astype(np.float64))


class FiveClassSampler(Sampler[int]):
    """Indices into the training cores, drawn with replacement so each five-class label present
    gets equal probability; a fresh draw every epoch (call :meth:`set_epoch` before iterating).

    ``num_samples`` defaults to the number of training cores (one epoch sees as many draws as cores).
    """

    def __init__(
        self, five_class: Sequence[str], *, seed: int = 0, num_samples: int | None = None
    ) -> None:
        self.weights = five_class_weights(five_class)
        self.num_samples = len(self.weights) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        draws = rng.choice(len(self.weights), size=self.num_samples, replace=True, p=self.weights)
        return iter(draws.tolist())
