"""Five-class balanced sampling: equal class shares, absent classes never drawn, fresh draws per epoch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from her2_kedro.modelling.sampling import FiveClassSampler, five_class_weights
from her2_kedro.schema import FIVE_CLASSES

# An imbalanced training set like the paper's (many 0s, few 2-/2+); "1" absent on purpose.
LABELS = ["0"] * 60 + ["2-"] * 2 + ["2+"] * 5 + ["3"] * 13


def draws(sampler: FiveClassSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_weights_give_each_present_class_an_equal_share():
    weights = five_class_weights(LABELS)
    assert weights.shape == (len(LABELS),) and np.isclose(weights.sum(), 1.0)
    present = sorted(set(LABELS))
    shares = {c: weights[[lab == c for lab in LABELS]].sum() for c in present}
    assert np.allclose(list(shares.values()), 1.0 / len(present))


def test_draws_differ_between_epochs_and_reproduce():
    sampler = FiveClassSampler(LABELS, seed=11)
    assert len(sampler) == len(LABELS)
    first, second = draws(sampler, 0), draws(sampler, 1)
    assert len(first) == len(LABELS) and first != second
    twin = FiveClassSampler(LABELS, seed=11)
    assert draws(twin, 1) == second and draws(twin, 0) == first
    assert draws(FiveClassSampler(LABELS, seed=12), 1) != second
    assert list(sampler) == second  # iterating again without set_epoch repeats the epoch


def test_class_frequencies_near_equal_and_absent_never_drawn():
    n = 20_000
    sampler = FiveClassSampler(LABELS, seed=0, num_samples=n)
    picked = draws(sampler, 3)
    assert len(picked) == n and min(picked) >= 0 and max(picked) < len(LABELS)
    counts = Counter(LABELS[i] for i in picked)
    present = set(LABELS)
    assert set(counts) == present and "1" not in counts
    expected = n / len(present)
    # binomial sd ~ sqrt(n p (1 - p)) ~ 61 draws here; allow ~5 sd
    for c in present:
        assert abs(counts[c] - expected) < 0.06 * expected, (c, counts)


def test_every_five_class_label_accepted_and_unknown_rejected():
    assert np.isclose(five_class_weights(list(FIVE_CLASSES)).sum(), 1.0)
    with pytest.raises(ValueError, match="nan"):
        FiveClassSampler(["0", "3", float("nan")])
    with pytest.raises(ValueError, match="no training cores"):
        FiveClassSampler([])
    with pytest.raises(ValueError, match="num_samples"):
        FiveClassSampler(["0"], num_samples=0)


def test_sampler_drives_a_dataloader():
    data = list(range(len(LABELS)))
    sampler = FiveClassSampler(LABELS, seed=5, num_samples=40)
    sampler.set_epoch(2)
    seen = [int(b) for b in DataLoader(data, sampler=sampler, batch_size=None)]
    assert seen == draws(FiveClassSampler(LABELS, seed=5, num_samples=40), 2)
