"""Shared metrics: hand-checked values, AUROC edge cases, Table 2 layout, metrics.csv merging."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from her2_kedro.evaluation.metrics import (
    METRIC_COLUMNS,
    append_metrics,
    classification_metrics,
    confusion_frame,
    metrics_row,
    mlflow_metric_names,
    status_crosstab,
)


def test_hand_checked_binary() -> None:
    y_true = [0, 0, 0, 0, 1, 1]
    y_pred = [0, 0, 0, 1, 1, 0]
    m = classification_metrics(y_true, y_pred, None, [0, 1])
    # recall class 0 = 3/4, class 1 = 1/2 -> balanced accuracy 0.625
    assert m["balanced_accuracy"] == pytest.approx(0.625)
    # precision: class 0 = 3/4, class 1 = 1/2; weighted by support 4, 2 -> (3 + 1) / 6
    assert m["precision_weighted"] == pytest.approx(4 / 6)
    # recall weighted = accuracy = 4/6
    assert m["recall_weighted"] == pytest.approx(4 / 6)
    # F1 class 0 = 0.75, class 1 = 0.5 -> (4 * 0.75 + 2 * 0.5) / 6
    assert m["f1_weighted"] == pytest.approx(4 / 6)
    assert m["n"] == 6 and math.isnan(m["auroc"])


def test_hand_checked_multiclass_with_absent_predicted_class() -> None:
    y_true = [0, 0, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 2, 2, 0]
    m = classification_metrics(y_true, y_pred, None, [0, 1, 2, 3])
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 2 / 3) / 3)
    # F1: class 0 p=1/2 r=1/2 -> 1/2; class 1 p=1/2 r=1 -> 2/3; class 2 p=1 r=2/3 -> 4/5
    assert m["f1_weighted"] == pytest.approx((2 * 0.5 + 1 * 2 / 3 + 3 * 0.8) / 6)


def test_auroc_binary_multiclass_single_class() -> None:
    y_true = np.array([0, 0, 1, 1, 1])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8], [0.7, 0.3]])
    m = classification_metrics(y_true, proba.argmax(1), proba, [0, 1])
    assert m["auroc"] == pytest.approx(roc_auc_score(y_true, proba[:, 1]))
    # A 1-D positive-class score is accepted for binary tasks.
    m1 = classification_metrics(y_true, proba.argmax(1), proba[:, 1], [0, 1])
    assert m1["auroc"] == m["auroc"]

    # 4 labels, class 1 absent from y_true: macro OvR over the three present classes.
    rng = np.random.default_rng(1)
    y4 = np.array([0, 0, 0, 2, 2, 3, 3, 3])
    p4 = rng.dirichlet(np.ones(4), size=len(y4))
    expected = np.mean(
        [roc_auc_score(y4 == c, p4[:, i]) for i, c in enumerate([0, 1, 2, 3]) if c != 1]
    )
    m4 = classification_metrics(y4, p4.argmax(1), p4, [0, 1, 2, 3])
    assert m4["auroc"] == pytest.approx(expected)
    # All four present equals sklearn's macro OvR.
    y_all = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    m_all = classification_metrics(y_all, p4.argmax(1), p4, [0, 1, 2, 3])
    assert m_all["auroc"] == pytest.approx(
        roc_auc_score(y_all, p4 / p4.sum(1, keepdims=True), multi_class="ovr", average="macro")
    )

    # One class only: NaN, no exception, for binary and multiclass.
    one = classification_metrics([1, 1, 1], [1, 0, 1], np.array([[0.2, 0.8]] * 3), [0, 1])
    assert math.isnan(one["auroc"])
    one4 = classification_metrics([3, 3], [3, 3], np.full((2, 4), 0.25), [0, 1, 2, 3])
    assert math.isnan(one4["auroc"]) and one4["balanced_accuracy"] == 1.0


def test_empty_split_is_nan_not_error() -> None:
    m = classification_metrics([], [], None, [0, 1])
    assert m["n"] == 0 and math.isnan(m["balanced_accuracy"])


def test_confusion_frame_has_every_label() -> None:
    frame = confusion_frame([0, 0, 2], [0, 2, 2], [0, 1, 2, 3])
    assert frame.index.tolist() == [0, 1, 2, 3] and frame.columns.tolist() == [0, 1, 2, 3]
    assert frame.loc[0, 2] == 1 and frame.loc[2, 2] == 1 and frame.to_numpy().sum() == 3


def test_status_crosstab_layout() -> None:
    table = status_crosstab(["0", "0", "2+", "3", "2-"], [0, 1, 1, 1, 0])
    assert table.index.tolist() == ["Negative", "Positive"]
    assert table.columns.tolist() == ["0", "1", "2-", "2+", "3"]  # class 1 absent, still a column
    assert table.loc["Negative", "0"] == 1 and table.loc["Positive", "0"] == 1
    assert table.loc["Positive", "2+"] == 1 and table.loc["Negative", "2-"] == 1
    assert table["1"].sum() == 0 and table.to_numpy().sum() == 5
    with pytest.raises(ValueError):
        status_crosstab(["4"], [0])


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def test_metrics_row_and_append_replaces_same_key() -> None:
    m = {
        "n": 10.0,
        "balanced_accuracy": 0.5,
        "precision_weighted": 0.6,
        "recall_weighted": 0.7,
        "f1_weighted": 0.65,
        "auroc": float("nan"),
    }
    row = metrics_row("intensity", "her2_status", "test", m)
    assert list(row) == METRIC_COLUMNS and row["n"] == 10
    old = _frame(
        [
            row,
            metrics_row("intensity", "her2_status", "val", m),
            metrics_row("mil", "her2_status", "test", m),
        ]
    )
    new = _frame([metrics_row("intensity", "her2_status", "test", {**m, "balanced_accuracy": 0.9})])
    merged = append_metrics(old, new)
    assert len(merged) == 3
    hit = merged[(merged["model"] == "intensity") & (merged["split"] == "test")]
    assert hit["balanced_accuracy"].tolist() == [0.9]
    assert list(merged.columns) == METRIC_COLUMNS
    assert len(append_metrics(None, new)) == 1
    # Re-reading from CSV (all dtypes inferred) still merges on the same keys.
    again = append_metrics(pd.read_csv(io.StringIO(merged.to_csv(index=False))), new)
    assert len(again) == 3


def test_mlflow_names_skip_nan() -> None:
    m = {"n": 5.0, "balanced_accuracy": 0.8, "auroc": float("nan")}
    names = mlflow_metric_names("intensity", "her2_status", "test", m)
    assert names == {
        "intensity.her2_status.test.n": 5.0,
        "intensity.her2_status.test.balanced_accuracy": 0.8,
    }


def test_figures_render_without_pyplot_state() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from her2_kedro.reporting.plots import confusion_figure, crosstab_figure

    before = plt.get_fignums()
    conf = confusion_frame([0, 0, 1, 3], [0, 1, 1, 3], [0, 1, 2, 3])
    fig = confusion_figure(conf, "IHC score")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 16 and texts.count("1") == 4  # counts annotated, empty row included
    fig.canvas.draw()
    table = crosstab_figure(status_crosstab(["0", "3"], [0, 1]), "Table 2")
    table.canvas.draw()
    buffer = io.BytesIO()
    table.savefig(buffer, format="png")
    assert buffer.getvalue()[:4] == b"\x89PNG"
    assert plt.get_fignums() == before


def test_rows_carry_their_run_and_manifest_version() -> None:
    m = {"n": 4.0, "balanced_accuracy": 0.5}
    row = metrics_row(
        "intensity", "her2_status", "test", m, {"run_id": "r1", "manifest_version": "v1"}
    )
    assert list(row) == METRIC_COLUMNS
    assert (row["run_id"], row["manifest_version"]) == ("r1", "v1")
    assert metrics_row("intensity", "her2_status", "test", m)["run_id"] == ""
    old = _frame(
        [metrics_row("mil", "ihc_score", "test", m, {"run_id": "r0", "manifest_version": "v0"})]
    )
    merged = append_metrics(old, _frame([row])).set_index("model")
    assert merged.loc["mil", "run_id"] == "r0" and merged.loc["intensity", "run_id"] == "r1"
