"""Model selection and evaluation shared by every model: honest splits, selection on validation only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from her2_kedro.evaluation import study


def _manifest_and_features(n=60, seed=0, external=0):
    rng = np.random.default_rng(seed)
    score = rng.integers(0, 4, size=n + external)
    status = (score >= 2).astype(int)
    manifest = pd.DataFrame(
        {
            "core_id": [f"c{i}" for i in range(n + external)],
            "split": rng.choice(["train", "val", "test"], p=[0.6, 0.2, 0.2], size=n + external),
            "cohort": ["internal"] * n + ["external"] * external,
            "five_class": [
                str(s) if s != 2 else ("2+" if st else "2-")
                for s, st in zip(score, status, strict=True)
            ],
            "ihc_score": score,
            "her2_status": status,
        }
    )
    features = pd.DataFrame(
        {
            "core_id": manifest["core_id"],
            "max_mean_dab": score * 0.02 + rng.normal(0, 0.004, n + external),
        }
    )
    return manifest, features


def test_external_cohort_is_evaluation_only_and_missing_features_reported():
    manifest, features = _manifest_and_features(external=7)
    features.loc[3, "max_mean_dab"] = np.nan
    table, problems = study.task_frame(
        manifest, features, study.TASKS["her2_status"], ["max_mean_dab"], ["external"]
    )
    assert (table.loc[table["core_id"].isin(manifest.core_id[-7:]), "split"] == "external").all()
    assert [p.core_id for p in problems] == ["c3"] and "c3" not in set(table["core_id"])


def test_selection_uses_validation_only_and_test_is_never_seen(monkeypatch):
    manifest, features = _manifest_and_features()
    task = study.TASKS["ihc_score"]
    table, _ = study.task_frame(manifest, features, task, ["max_mean_dab"])
    seen: list[set[str]] = []
    real_fit = study.fit_intensity_lr

    def spy(X, y, **kwargs):
        seen.append(set(X.index))
        return real_fit(X, y, **kwargs)

    monkeypatch.setattr(study, "fit_intensity_lr", spy)
    model, selection = study.select_and_fit(
        table, ["max_mean_dab"], task, [0.01, 1.0, 100.0], True, 0
    )
    train_ids = set(table.loc[table["split"] == "train", "core_id"])
    assert all(ids == train_ids for ids in seen)  # every fit on train only
    assert selection["chosen"].sum() == 1 and len(selection) == 3
    predictions, metrics, confusions = study.evaluate(
        model, table, ["max_mean_dab"], task, "intensity"
    )
    assert set(metrics["split"]) == {"train", "val", "test"}
    assert metrics.set_index("split").loc["test", "n"] == (table["split"] == "test").sum()
    assert metrics.set_index("split").loc["test", "balanced_accuracy"] > 0.8  # separable toy data
    assert list(confusions["test"].columns) == [0, 1, 2, 3]


def test_without_validation_the_default_c_is_used():
    manifest, features = _manifest_and_features()
    manifest["split"] = manifest["split"].replace({"val": "train"})
    task = study.TASKS["her2_status"]
    table, _ = study.task_frame(manifest, features, task, ["max_mean_dab"])
    _, selection = study.select_and_fit(table, ["max_mean_dab"], task, [0.01, 1.0, 100.0], True, 0)
    assert selection.loc[selection["chosen"], "C"].item() == 1.0


def test_single_class_train_split_is_a_clear_error():
    manifest, features = _manifest_and_features()
    manifest.loc[manifest["split"] == "train", "her2_status"] = 0
    task = study.TASKS["her2_status"]
    table, _ = study.task_frame(manifest, features, task, ["max_mean_dab"])
    with pytest.raises(ValueError, match="at least two classes"):
        study.select_and_fit(table, ["max_mean_dab"], task, [1.0], True, 0)


def test_status_crosstab_keeps_two_minus_and_two_plus_apart():
    predictions = pd.DataFrame(
        {"split": ["test"] * 4, "five_class": ["0", "2-", "2+", "3"], "y_pred": [0, 1, 1, 1]}
    )
    table = study.crosstab(predictions)
    assert list(table.columns) == ["0", "1", "2-", "2+", "3"]
    assert table.loc["Positive", "2-"] == 1 and table.loc["Negative", "0"] == 1


def test_a_class_missing_from_train_is_padded_through_selection_and_evaluation():
    """Train without score 1: selection and evaluation score all four classes (p_1 = 0), no crash."""
    manifest, features = _manifest_and_features(n=80, seed=4)
    manifest = manifest[~((manifest["split"] == "train") & (manifest["ihc_score"] == 1))]
    task = study.TASKS["ihc_score"]
    table, _ = study.task_frame(manifest, features, task, ["max_mean_dab"])
    assert 1 not in set(table.loc[table["split"] == "train", "y"])
    assert 1 in set(table.loc[table["split"] == "val", "y"])
    model, selection = study.select_and_fit(
        table, ["max_mean_dab"], task, [0.1, 1.0, 10.0], True, 0
    )
    assert model.classes == [0, 2, 3] and np.isfinite(selection["val_balanced_accuracy"]).all()
    predictions, metrics, _ = study.evaluate(model, table, ["max_mean_dab"], task, "intensity")
    assert (predictions["p_1"] == 0).all() and not (predictions["y_pred"] == 1).any()
    np.testing.assert_allclose(predictions[["p_0", "p_1", "p_2", "p_3"]].sum(axis=1), 1.0)
    assert np.isfinite(metrics.set_index("split").loc[["val", "test"], "auroc"]).all()


class _Scripted:
    """A stand-in model whose HER2-status call on each core is fixed in advance."""

    def __init__(self, positive: set[str]):
        self.classes = [0, 1]
        self.positive = positive

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        p = np.array([0.9 if core in self.positive else 0.1 for core in X.index])
        return np.column_stack([1 - p, p])


def test_c_is_chosen_on_validation_even_where_test_prefers_another(monkeypatch):
    """Small C is right on every validation core and wrong on test; large C the reverse."""
    manifest, features = _manifest_and_features(n=60, seed=2)
    task = study.TASKS["her2_status"]
    table, _ = study.task_frame(manifest, features, task, ["max_mean_dab"])
    truth = dict(zip(table["core_id"], table["y"], strict=True))
    split = dict(zip(table["core_id"], table["split"], strict=True))
    right_on = {  # each C's model is right on one split, wrong on the other
        0.01: {c for c, y in truth.items() if (y == 1) == (split[c] != "test")},
        100.0: {c for c, y in truth.items() if (y == 1) == (split[c] != "val")},
    }
    monkeypatch.setattr(study, "fit_intensity_lr", lambda X, y, C, **kw: _Scripted(right_on[C]))
    model, selection = study.select_and_fit(table, ["max_mean_dab"], task, [100.0, 0.01], True, 0)
    scores = selection.set_index("C")["val_balanced_accuracy"]
    assert scores[0.01] == 1.0 and scores[100.0] == 0.0
    assert selection.loc[selection["chosen"], "C"].item() == 0.01
    _, metrics, _ = study.evaluate(model, table, ["max_mean_dab"], task, "m")
    assert metrics.set_index("split").loc["test", "balanced_accuracy"] == 0.0  # test disagrees
