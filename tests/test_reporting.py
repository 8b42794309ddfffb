"""The study report's parts on small made-up predictions: patient bootstrap, Table 1 beside the
paper, Table 2 for every status model, errors by class, ROC, heatmap panels, t-SNE, HTML page."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from her2_kedro.evaluation.bootstrap import balanced_accuracy, patient_bootstrap, truncate
from her2_kedro.reporting import tables
from her2_kedro.reporting.embedding_map import sample_tiles, tsne_coordinates, tsne_figure
from her2_kedro.reporting.heatmaps import (
    core_tile_maps,
    disagreement,
    display_copy,
    interpretation_panel,
    tile_grid,
    unit_range,
)
from her2_kedro.reporting.html_report import Picture, ReportContent, png_uri, render_report
from her2_kedro.reporting.study_figures import confusion_grid, roc_figure, roc_points
from tests.conftest import fake_core

FIVE_TO_SCORE = {"0": 0, "1": 1, "2-": 2, "2+": 2, "3": 3}
FIVE_TO_STATUS = {"0": 0, "1": 0, "2-": 0, "2+": 1, "3": 1}


def made_up_predictions(n_patients: int = 20, seed: int = 0, skill: float = 0.8) -> pd.DataFrame:
    """Two models (one good, one coin-flipping) x both tasks on test and external cores, two cores
    per patient, with probabilities consistent with the calls."""
    rng = np.random.default_rng(seed)
    rows = []
    classes = list(FIVE_TO_SCORE)
    for p in range(n_patients):
        five = classes[p % 5]
        split = "test" if p < n_patients * 3 // 4 else "external"
        for k in range(2):
            core = f"P{p:02d}_c{k}"
            for model, good in (("good", skill), ("coin", 0.0)):
                for task, truth_of in (
                    ("ihc_score", FIVE_TO_SCORE),
                    ("her2_status", FIVE_TO_STATUS),
                ):
                    n_classes = 4 if task == "ihc_score" else 2
                    truth = truth_of[five]
                    guess = truth if rng.random() < good else int(rng.integers(n_classes))
                    proba = np.full(n_classes, 0.1 / (n_classes - 1))
                    proba[guess] = 0.9
                    row = {
                        "model": model,
                        "task": task,
                        "core_id": core,
                        "split": split,
                        "five_class": five,
                        "y_true": truth,
                        "y_pred": guess,
                        "manifest_version": "v1",
                    }
                    row.update({f"p_{c}": proba[c] for c in range(n_classes)})
                    rows.append(row)
    return pd.DataFrame(rows)


def manifest_of(predictions: pd.DataFrame) -> pd.DataFrame:
    cores = predictions.drop_duplicates("core_id")
    return pd.DataFrame(
        {
            "core_id": cores["core_id"],
            "patient_id": cores["core_id"].str.split("_").str[0],
            "five_class": cores["five_class"],
            "split": cores["split"],
            "ihc_score": cores["five_class"].map(FIVE_TO_SCORE),
        }
    )


# --- bootstrap -------------------------------------------------------------------------------


def test_balanced_accuracy_averages_present_classes_only():
    # class 1 absent from the truth: the mean is over classes 0 and 2 (the paper's test set)
    assert balanced_accuracy(np.array([0, 0, 2, 2]), np.array([0, 1, 2, 2])) == pytest.approx(0.75)


def test_patient_bootstrap_interval_holds_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.8, y, 1 - y)
    groups = np.repeat([f"p{i}" for i in range(100)], 2)
    a = patient_bootstrap(y, pred, groups, n_resamples=300, seed=3)
    b = patient_bootstrap(y, pred, groups, n_resamples=300, seed=3)
    assert a == b
    assert a.low < a.estimate < a.high
    assert a.n_groups == 100 and a.n_resamples == 300
    assert 0.05 < a.high - a.low < 0.3


def test_resampling_patients_widens_the_interval_when_their_cores_agree():
    """Ten copies of each core under one patient: resampling cores would see 10x the data and give
    a far narrower interval; resampling patients must not be fooled."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 30)
    pred = np.where(rng.random(30) < 0.75, y, 1 - y)
    y10, pred10 = np.repeat(y, 10), np.repeat(pred, 10)
    by_patient = patient_bootstrap(y10, pred10, np.repeat(np.arange(30), 10), 500, seed=0)
    by_core = patient_bootstrap(y10, pred10, np.arange(300), 500, seed=0)
    assert (by_patient.high - by_patient.low) > 2 * (by_core.high - by_core.low)


def test_bootstrap_rejects_mismatched_lengths_and_degenerates_gracefully():
    with pytest.raises(ValueError, match="one entry per core"):
        patient_bootstrap([0, 1], [0], ["a", "b"])
    single = patient_bootstrap([0, 1], [0, 0], ["a", "a"])
    assert single.low == single.high == single.estimate == 0.5


def test_truncate_cuts_instead_of_rounding():
    assert truncate(0.82496) == 0.8249
    assert truncate(0.825) == 0.825
    assert np.isnan(truncate(float("nan")))


# --- tables ----------------------------------------------------------------------------------

PAPER = {
    "MIL": {"her2_status": {"test": 0.9429, "external": 0.8688}, "ihc_score": {"test": 0.8249}}
}


def test_table1_has_every_model_task_split_with_intervals_and_the_papers_figure():
    predictions = made_up_predictions()
    frame = tables.with_patients(predictions, manifest_of(predictions))
    table = tables.table1(frame, ("test", "external"), PAPER, {"good": "MIL"}, n_resamples=200)
    assert len(table) == 2 * 2 * 2
    assert set(table["split"]) == {"test", "external"}
    assert (table["ci_low"] <= table["balanced_accuracy"]).all()
    assert (table["balanced_accuracy"] <= table["ci_high"]).all()
    good = table.set_index(["model", "task", "split"]).loc[("good", "her2_status", "test")]
    coin = table.set_index(["model", "task", "split"]).loc[("coin", "her2_status", "test")]
    assert good["balanced_accuracy"] > coin["balanced_accuracy"]
    assert good["paper_balanced_accuracy"] == 0.9429 and good["paper_model"] == "MIL"
    assert np.isnan(coin["paper_balanced_accuracy"])
    # 15 test patients of 2 cores each
    assert good["n"] == 30 and good["n_patients"] == 15
    # same figure as the metrics module computes
    part = frame.query("model == 'good' and task == 'her2_status' and split == 'test'")
    assert good["balanced_accuracy"] == pytest.approx(
        balanced_accuracy(part["y_true"].to_numpy(), part["y_pred"].to_numpy())
    )


def test_table1_needs_patients():
    with pytest.raises(KeyError, match="patient_id"):
        tables.table1(made_up_predictions())


def test_status_crosstabs_count_every_status_model_and_split():
    predictions = made_up_predictions()
    crosstabs = tables.status_crosstabs(predictions, ("test",))
    assert set(crosstabs["model"]) == {"good", "coin"} and set(crosstabs["split"]) == {"test"}
    for model, part in crosstabs.groupby("model"):
        counts = part[["0", "1", "2-", "2+", "3"]].to_numpy().sum()
        status = predictions[predictions["task"] == "her2_status"]
        expected = status[(status["model"] == model) & (status["split"] == "test")]
        assert counts == len(expected)


def test_class_errors_name_the_most_common_wrong_call():
    predictions = pd.DataFrame(
        {
            "model": "m",
            "task": "ihc_score",
            "split": "test",
            "core_id": list("abcde"),
            "five_class": ["2-", "2-", "2-", "3", "0"],
            "y_true": [2, 2, 2, 3, 0],
            "y_pred": [1, 1, 3, 3, 0],
        }
    )
    errors = tables.class_errors(predictions).set_index("true_class")
    assert list(errors.index) == ["0", "2-", "3"]  # in the five classes' order
    assert errors.loc["2-", "correct"] == 0 and errors.loc["2-", "n"] == 3
    assert errors.loc["2-", "most_common_error"] == "1"
    assert errors.loc["2-", "n_most_common_error"] == 2
    assert errors.loc["3", "accuracy"] == 1.0 and errors.loc["3", "most_common_error"] == ""


# --- figures ---------------------------------------------------------------------------------


def test_roc_points_of_a_perfect_ranking_reach_the_corner():
    part = pd.DataFrame(
        {"y_true": [0, 0, 1, 1], "p_0": [0.9, 0.8, 0.3, 0.1], "p_1": [0.1, 0.2, 0.7, 0.9]}
    )
    fpr, tpr = roc_points(part, "her2_status")
    assert np.trapezoid(tpr, fpr) == pytest.approx(1.0)
    assert roc_points(part.iloc[:2], "her2_status") is None  # one class: undefined


def test_roc_and_confusion_figures_draw_every_model():
    predictions = made_up_predictions()
    fig = roc_figure(predictions, "ihc_score", "test")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(labels) == 2 and all("AUROC" in t for t in labels)
    grid = confusion_grid(predictions, "test", "ihc_score")
    assert [ax.get_title() for ax in grid.axes if ax.get_images()] == ["coin", "good"]
    assert (
        confusion_grid(predictions, "test", "ihc_score", columns=1).get_size_inches()[1]
        > (grid.get_size_inches()[1])
    )  # one model a row: taller
    assert roc_figure(predictions, "ihc_score", "nowhere") is None


# --- heatmaps --------------------------------------------------------------------------------


def test_unit_range_and_tile_grid():
    assert np.allclose(unit_range([2.0, 4.0, 3.0]), [0.0, 1.0, 0.5])
    assert np.allclose(unit_range([7.0, 7.0]), [0.5, 0.5])
    tiles = pd.DataFrame({"x": [0, 224], "y": [224, 224], "v": [0.2, 0.9]})
    grid = tile_grid(tiles, "v", 224, height=500, width=500)
    assert grid.shape == (3, 3)
    assert grid[1, 0] == 0.2 and grid[1, 1] == 0.9
    assert np.isnan(grid[0, 0]) and np.isnan(grid[2, 2])


def test_core_maps_put_dab_on_stained_tiles_and_find_disagreement():
    rgb = fake_core(448, 448, 0)  # four 224 px tiles of real DAB/haematoxylin tissue
    tiles = pd.DataFrame({"x": [0, 224, 0, 224], "y": [0, 0, 224, 224]})
    from her2_kedro.features.intensity import tile_mean_dab
    from her2_kedro.imaging.stain import dab_channel

    raw = tile_mean_dab(dab_channel(rgb), tiles, 224)
    # attention opposite to staining: the weakest-stained tile gets all the attention
    attention = tiles.assign(attention=np.where(raw == raw.min(), 0.97, 0.01))
    maps = core_tile_maps(rgb, tiles, {"her2_status": attention}, 224)
    assert maps["dab"].max() == 1.0 and maps["dab"].min() == 0.0
    assert np.argmax(maps["dab"].to_numpy()) == np.argmax(raw)
    odd = disagreement(maps, "attention_her2_status", 2)
    assert len(odd) == 2
    # both ways round: attention without staining (+1), staining without attention (-1)
    by_gap = odd.set_index("gap")[["x", "y"]].astype(int)
    weakest, strongest = tiles.iloc[int(np.argmin(raw))], tiles.iloc[int(np.argmax(raw))]
    assert sorted(by_gap.index) == pytest.approx([-1.0, 1.0])
    assert tuple(by_gap.loc[1.0]) == (weakest["x"], weakest["y"])
    assert tuple(by_gap.loc[-1.0]) == (strongest["x"], strongest["y"])
    fig = interpretation_panel(
        rgb,
        maps,
        224,
        "core",
        {"attention_her2_status": "status", "attention_ihc_score": "score", "dab": "DAB"},
        odd,
    )
    titles = [ax.get_title() for ax in fig.axes]
    assert "score\n(not available)" in titles  # a missing map is said, not silently dropped
    assert sum(t.startswith(("1:", "2:")) for t in titles) == 2  # the two thumbnails


def test_a_large_core_is_drawn_reduced_over_its_full_resolution_coordinates():
    rgb = np.zeros((2300, 2100, 3), np.uint8)
    rgb[:, 1050:] = 200  # right half light: the reduced copy must keep where things are
    shown = display_copy(rgb, max_side=1024)
    assert shown.shape == (767, 700, 3)  # reduced by 3, the smallest whole factor that fits
    assert shown[:, :349].max() == 0 and shown[:, 351:].min() == 200
    small = rgb[:448, :448]
    assert display_copy(small) is small  # a core that fits is drawn as it is
    tiles = pd.DataFrame({"x": [0, 1792], "y": [0, 1792]})
    maps = tiles.assign(attention_her2_status=[0.2, 0.9], dab=[0.0, 1.0])
    odd = disagreement(maps, "attention_her2_status", 1)
    fig = interpretation_panel(rgb, maps, 224, "big", {"attention_her2_status": "status"}, odd)
    core_axes, map_axes, thumb_axes = fig.axes[0], fig.axes[1], fig.axes[-1]
    for ax in (core_axes, map_axes):
        drawn = ax.get_images()[0]
        assert max(drawn.get_array().shape[:2]) <= 1024
        assert tuple(drawn.get_extent()) == (0, 2100, 2300, 0)  # full-resolution coordinates
    assert core_axes.patches[0].get_xy() == (0, 0)  # the outlined tile, in core pixels
    # the map's cells are tiles of 224 core pixels: 11 x 10 cells reach past the 2300 x 2100 core
    assert tuple(map_axes.get_images()[1].get_extent()) == (0, 2240, 2464, 0)
    assert map_axes.get_xlim() == (0, 2100) and map_axes.get_ylim() == (2300, 0)
    assert thumb_axes.get_images()[0].get_array().shape[:2] == (224, 224)  # thumbnails full size


# --- t-SNE -----------------------------------------------------------------------------------


def test_sample_tiles_caps_and_keeps_core_ids():
    embeddings = {"a": np.zeros((50, 8)), "b": np.ones((10, 8))}
    x, ids = sample_tiles(embeddings, 20, seed=0)
    assert x.shape == (20, 8) and len(ids) == 20
    assert np.all(x[ids == "b"] == 1) and np.all(x[ids == "a"] == 0)
    x_all, _ = sample_tiles(embeddings, 1000)
    assert len(x_all) == 60


def test_tsne_separates_two_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (30, 16)), rng.normal(8, 1, (30, 16))])
    xy = tsne_coordinates(x, perplexity=30, seed=0)
    assert xy.shape == (60, 2)
    centres = xy[:30].mean(0), xy[30:].mean(0)
    spread = max(xy[:30].std(0).max(), xy[30:].std(0).max())
    assert np.linalg.norm(centres[0] - centres[1]) > 2 * spread
    fig = tsne_figure(xy, ["0"] * 30 + ["3"] * 30, "t")
    assert len(fig.axes[0].get_legend().get_texts()) == 2


# --- HTML ------------------------------------------------------------------------------------


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_png_uri_refuses_what_is_not_a_png(tmp_path):
    assert png_uri(_png()).startswith("data:image/png;base64,")
    bad = tmp_path / "fig.png"
    bad.write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="fig.png is not a PNG"):
        png_uri(bad)


def test_report_page_holds_every_section_and_escapes_input():
    predictions = made_up_predictions()
    frame = tables.with_patients(predictions, manifest_of(predictions))
    qc = pd.DataFrame(
        {
            "source": ["cores", "cores"],
            "core_id": ["ok", "<script>alert(1)</script>"],
            "status": ["accepted", "rejected"],
            "reason": ["", "truncated JPEG"],
        }
    )
    page = render_report(
        ReportContent(
            title="study",
            run={"run_id": "abc123", "env": "local", "generated": "now", "parameters": "a: 1"},
            models=["coin", "good"],
            qc_report=qc,
            table1=tables.table1(frame, ("test",), PAPER, {"good": "MIL"}, n_resamples=50),
            crosstabs=tables.status_crosstabs(frame),
            errors=tables.class_errors(frame),
            figures=[Picture("fig one", png_uri(_png()), "a caption")],
            panels=[Picture("core P00_c0", png_uri(_png()))],
        )
    )
    for section in ("run", "qc", "table1", "table2", "errors", "figures", "heatmaps"):
        assert f'<section id="{section}"' in page
    assert "abc123" in page and "MIL: 0.9429" in page and "truncated JPEG" in page
    assert "<script>alert(1)</script>" not in page  # file names are escaped
    assert page.count("data:image/png;base64,") == 2
    assert 'id="inbox"' not in page  # no inbox section without inbox calls


def test_panels_take_the_five_classes_in_turn_and_fall_back_to_a_model_with_attention():
    from her2_kedro.config import ReportingParams
    from her2_kedro.pipelines.reporting.nodes import _panel_cores, heatmap_model

    cores = pd.DataFrame(
        {
            "core_id": [f"c{i}" for i in range(8)],
            "five_class": ["0", "0", "0", "2+", "2+", "3", "1", "2-"],
        }
    )
    chosen = _panel_cores(cores, 5)
    assert sorted(cores.set_index("core_id").loc[chosen, "five_class"]) == [
        "0",
        "1",
        "2+",
        "2-",
        "3",
    ]
    assert len(_panel_cores(cores, None)) == 8
    attention = pd.DataFrame(
        {
            "model": ["mil", "dsmil", "dsmil"],
            "task": ["her2_status", "her2_status", "ihc_score"],
            "core_id": "c0",
            "x": 0,
            "y": 0,
            "attention": 1.0,
        }
    )
    config = ReportingParams()  # mil first, then mil_cached, clam_sb, dsmil
    assert heatmap_model(attention, config) == "dsmil"  # mil has attention for one task only
    assert heatmap_model(None, config) is None
