"""The staining-intensity baseline: logistic regression on intensity features, saved as plain JSON.

The paper (Methods) feeds the single max-mean-DAB descriptor to a logistic regression with balanced
class weights, one model for the 4-class IHC score and one for the binary HER2 status; the authors'
code uses ``LogisticRegression(class_weight="balanced")`` on the raw feature. Here the feature is
standardised first. For one feature this keeps the same family of decision functions (a threshold
per class on the raw value) and helps lbfgs converge, but note that it does change the L2-penalised
optimum: raw max-mean-DAB values are ~0.01-0.1, so the authors' unscaled fit at C = 1 needs a large
coefficient and is shrunk much harder than the standardised one. ``standardize=False`` reproduces
the authors' unscaled fit.

The fitted model is stored as JSON (feature names, classes, scaler and LR parameters) so loading
it never unpickles code; ``IntensityModel.predict_proba`` re-implements sklearn's formula exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

FORMAT = "her2_kedro.intensity_lr/1"


@dataclass
class IntensityModel:
    """A fitted (standardise -> multinomial / binary logistic regression) model as plain numbers."""

    features: list[str]
    classes: list[int]
    mean: list[float]
    scale: list[float]
    coef: list[list[float]]  # (1, n_features) when binary, else (n_classes, n_features)
    intercept: list[float]

    def _matrix(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        if isinstance(X, pd.DataFrame):
            missing = [f for f in self.features if f not in X.columns]
            if missing:
                raise ValueError(f"missing feature columns {missing}")
            arr = X[self.features].to_numpy(dtype=np.float64)
            ids = _core_ids(X)
        else:
            arr = np.asarray(X, dtype=np.float64)
            if arr.ndim == 1:
                arr = arr.reshape(-1, 1)
            ids = pd.RangeIndex(len(arr))
        if arr.shape[1] != len(self.features):
            raise ValueError(f"expected {len(self.features)} features, got {arr.shape[1]}")
        _raise_on_nan(arr, ids)
        return arr

    def decision_function(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Linear scores of the standardised features (sklearn's decision_function)."""
        z = (self._matrix(X) - np.asarray(self.mean)) / np.asarray(self.scale)
        scores = z @ np.asarray(self.coef, dtype=np.float64).T + np.asarray(self.intercept)
        return scores[:, 0] if len(self.classes) == 2 else scores

    def predict_proba(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Class probabilities (n, n_classes), columns ordered like ``classes``."""
        scores = self.decision_function(X)
        if len(self.classes) == 2:
            positive = _expit(scores)
            return np.column_stack([1.0 - positive, positive])
        return _softmax(scores)

    def predict(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """Most probable class label for each row."""
        return np.asarray(self.classes)[np.argmax(self.predict_proba(X), axis=1)]

    def to_json(self) -> str:
        """Serialise to JSON text (floats written with full round-trip precision)."""
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> IntensityModel:
        """Load a model written by ``to_json``; validates the format tag and shapes."""
        data = json.loads(text)
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"not an intensity model file (expected format {FORMAT!r})")
        model = cls(
            features=[str(f) for f in data["features"]],
            classes=[int(c) for c in data["classes"]],
            mean=[float(v) for v in data["mean"]],
            scale=[float(v) for v in data["scale"]],
            coef=[[float(v) for v in row] for row in data["coef"]],
            intercept=[float(v) for v in data["intercept"]],
        )
        n_rows = 1 if len(model.classes) == 2 else len(model.classes)
        n_feat = len(model.features)
        shapes_ok = (
            len(model.mean) == n_feat
            and len(model.scale) == n_feat
            and len(model.coef) == n_rows
            and all(len(row) == n_feat for row in model.coef)
            and len(model.intercept) == n_rows
        )
        if not shapes_ok:
            raise ValueError("intensity model file has inconsistent shapes")
        return model


def _expit(x: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(x)


def _softmax(scores: np.ndarray) -> np.ndarray:
    from scipy.special import softmax

    return softmax(scores, axis=1)


def _core_ids(X: pd.DataFrame) -> Sequence:
    """Names used in error messages: a ``core_id`` column if present, else the index."""
    return X["core_id"].to_numpy() if "core_id" in X.columns else X.index.to_numpy()


def _raise_on_nan(arr: np.ndarray, ids: Sequence) -> None:
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        names = [str(i) for i in np.asarray(ids)[bad]]
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise ValueError(
            f"{len(names)} core(s) have NaN/inf intensity features (no kept tile?): {shown}; "
            "drop and report them before fitting or predicting"
        )


def make_sklearn_pipeline(
    seed: int = 0, standardize: bool = True, C: float = 1.0, max_iter: int = 1000
) -> Pipeline:
    """The sklearn estimator behind ``fit_intensity_lr`` (scaler + balanced logistic regression)."""
    lr = LogisticRegression(class_weight="balanced", max_iter=max_iter, C=C, random_state=seed)
    scaler = StandardScaler() if standardize else "passthrough"
    return Pipeline([("scale", scaler), ("lr", lr)])


def fit_intensity_lr(
    X: pd.DataFrame,
    y: np.ndarray | Sequence[int],
    seed: int = 0,
    standardize: bool = True,
    C: float = 1.0,
    max_iter: int = 1000,
) -> IntensityModel:
    """Fit the balanced logistic regression on the feature columns of ``X``.

    Core ids (for error messages) come from a ``core_id`` column if present, else the index; every
    other column is a feature. Multinomial for 3+ classes (lbfgs default), logistic for two.
    ``seed`` is passed as ``random_state`` (lbfgs itself is deterministic). Raises ValueError naming
    the cores whose features are NaN (cores without a kept tile must be dropped first).
    """
    features = [c for c in X.columns if c != "core_id"]
    pipe = fit_sklearn_pipeline(X, y, seed, standardize, C, max_iter)
    return model_from_sklearn(pipe, features)


def fit_sklearn_pipeline(
    X: pd.DataFrame,
    y: np.ndarray | Sequence[int],
    seed: int = 0,
    standardize: bool = True,
    C: float = 1.0,
    max_iter: int = 1000,
) -> Pipeline:
    """Fit and return the sklearn pipeline itself (for tests and comparisons)."""
    features = [c for c in X.columns if c != "core_id"]
    arr = X[features].to_numpy(dtype=np.float64)
    _raise_on_nan(arr, _core_ids(X))
    y_arr = np.asarray(y).astype(np.int64)
    if len(y_arr) != len(arr):
        raise ValueError(f"{len(arr)} feature rows but {len(y_arr)} labels")
    if len(np.unique(y_arr)) < 2:
        raise ValueError("need at least two classes to fit the intensity model")
    pipe = make_sklearn_pipeline(seed, standardize, C, max_iter)
    pipe.fit(arr, y_arr)
    return pipe


def model_from_sklearn(pipe: Pipeline, features: list[str]) -> IntensityModel:
    """Convert a fitted scaler + LogisticRegression pipeline into an ``IntensityModel``."""
    scaler = pipe.named_steps["scale"]
    lr: LogisticRegression = pipe.named_steps["lr"]
    n = len(features)
    if isinstance(scaler, StandardScaler):
        mean = [float(v) for v in scaler.mean_]
        scale = [float(v) for v in scaler.scale_]
    else:
        mean, scale = [0.0] * n, [1.0] * n
    return IntensityModel(
        features=list(features),
        classes=[int(c) for c in lr.classes_],
        mean=mean,
        scale=scale,
        coef=[[float(v) for v in row] for row in lr.coef_],
        intercept=[float(v) for v in lr.intercept_],
    )
