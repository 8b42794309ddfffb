"""The intensity logistic regression: fits, JSON round trip exactness, NaN handling."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from her2_kedro.evaluation.metrics import classification_metrics
from her2_kedro.modelling.intensity_lr import (
    IntensityModel,
    fit_intensity_lr,
    fit_sklearn_pipeline,
    model_from_sklearn,
)


def _toy(n_classes: int, per_class: int = 15, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Separable one-feature data: class k has max-mean-DAB around 0.01 + 0.03 k (imbalanced)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for k in range(n_classes):
        n = per_class * (3 if k == 0 else 1)
        xs.append(0.01 + 0.03 * k + rng.uniform(-0.008, 0.008, n))
        ys.append(np.full(n, k))
    x = np.concatenate(xs)
    ids = [f"core_{i}" for i in range(len(x))]
    return pd.DataFrame({"max_mean_dab": x}, index=ids), np.concatenate(ys)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_separable_toy_set(n_classes: int) -> None:
    X, y = _toy(n_classes)
    model = fit_intensity_lr(X, y)
    assert model.classes == list(range(n_classes))
    m = classification_metrics(y, model.predict(X), model.predict_proba(X), model.classes)
    assert m["balanced_accuracy"] == 1.0
    assert len(model.coef) == (1 if n_classes == 2 else n_classes)


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("standardize", [True, False])
def test_json_round_trip_matches_sklearn(n_classes: int, standardize: bool) -> None:
    X, y = _toy(n_classes, seed=3)
    X["dab_p90"] = X["max_mean_dab"] * 1.5 + 0.01  # two features, correlated
    pipe = fit_sklearn_pipeline(X, y, standardize=standardize)
    model = IntensityModel.from_json(model_from_sklearn(pipe, list(X.columns)).to_json())
    X_new, _ = _toy(n_classes, seed=11)
    X_new["dab_p90"] = X_new["max_mean_dab"] * 1.4
    expected = pipe.predict_proba(X_new.to_numpy())
    got = model.predict_proba(X_new)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(model.predict(X_new), pipe.predict(X_new.to_numpy()))


def test_json_is_plain_data() -> None:
    X, y = _toy(4)
    text = fit_intensity_lr(X, y).to_json()
    data = json.loads(text)
    assert data["features"] == ["max_mean_dab"] and data["classes"] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        IntensityModel.from_json(json.dumps({**data, "format": "pickle"}))
    with pytest.raises(ValueError):
        IntensityModel.from_json(json.dumps({**data, "intercept": [0.0]}))


def test_nan_features_name_the_cores() -> None:
    X, y = _toy(2)
    X.loc["core_3", "max_mean_dab"] = np.nan
    X.loc["core_7", "max_mean_dab"] = np.nan
    with pytest.raises(ValueError, match=r"core_3, core_7"):
        fit_intensity_lr(X, y)
    model = fit_intensity_lr(X.dropna(), y[X["max_mean_dab"].notna().to_numpy()])
    with pytest.raises(ValueError, match="core_3"):
        model.predict_proba(X)


def test_core_id_column_names_the_cores_and_is_not_a_feature() -> None:
    X, y = _toy(2)
    frame = X.reset_index(names="core_id")
    model = fit_intensity_lr(frame, y)
    assert model.features == ["max_mean_dab"]
    np.testing.assert_allclose(model.predict_proba(frame), model.predict_proba(X), atol=0)
    frame.loc[4, "max_mean_dab"] = np.nan
    with pytest.raises(ValueError, match="core_4"):
        fit_intensity_lr(frame, y)


def test_missing_feature_column_and_single_class() -> None:
    X, y = _toy(2)
    model = fit_intensity_lr(X, y)
    with pytest.raises(ValueError, match="missing feature"):
        model.predict(X.rename(columns={"max_mean_dab": "other"}))
    with pytest.raises(ValueError, match="two classes"):
        fit_intensity_lr(X, np.zeros(len(X), dtype=int))
