"""Bootstrap confidence intervals of balanced accuracy, resampling patients, not cores.

Test sets are small (the paper's had 15 score-2 cores), so a balanced accuracy needs an interval.
Cores of one patient share a label and look alike; resampling cores would treat them as
independent and give intervals that are too narrow, so whole patients are drawn with replacement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (sklearn's definition, the paper's)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if len(y_true) == 0:
        return float("nan")
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval over ``n_resamples`` draws."""

    estimate: float
    low: float
    high: float
    n_resamples: int
    n_groups: int


def patient_bootstrap(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Balanced accuracy with a percentile interval from resampling ``groups`` (patients).

    Each resample draws as many patients as there are, with replacement, and takes all their
    cores. Balanced accuracy is computed over the classes present in that resample, as for the
    point estimate. With one patient, or none, the interval is the estimate itself (or NaN).
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    groups = np.asarray(groups).astype(str)
    if not (len(y_true) == len(y_pred) == len(groups)):
        raise ValueError(
            f"y_true ({len(y_true)}), y_pred ({len(y_pred)}) and groups ({len(groups)}) "
            "must have one entry per core"
        )
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    estimate = balanced_accuracy(y_true, y_pred)
    names, group_of = np.unique(groups, return_inverse=True)
    n_groups = len(names)
    if n_groups < 2:
        return Interval(estimate, estimate, estimate, 0, n_groups)
    members = [np.flatnonzero(group_of == g) for g in range(n_groups)]
    rng = np.random.default_rng(seed)
    draws = np.empty(n_resamples)
    for i in range(n_resamples):
        chosen = rng.integers(0, n_groups, size=n_groups)
        rows = np.concatenate([members[g] for g in chosen])
        draws[i] = balanced_accuracy(y_true[rows], y_pred[rows])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return Interval(estimate, float(low), float(high), n_resamples, n_groups)


def truncate(value: float, decimals: int = 4) -> float:
    """``value`` cut (not rounded) to ``decimals`` places, as the paper printed its figures."""
    if not np.isfinite(value):
        return float(value)
    factor = 10.0**decimals
    # the small nudge keeps 0.8249999999 (binary noise of 0.825) from dropping to 0.8249
    return float(np.trunc(value * factor + 1e-9 * np.sign(value)) / factor)
