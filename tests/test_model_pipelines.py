"""The CNN studies end to end on a tiny synthetic cohort with tiny inputs, through Kedro's runner:
features (trained encoder + embedding cache), mil, clam, resnet; reports, checkpoints, MLflow."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from her2_kedro.modelling.checkpoints import load_checkpoint
from tests.browser import view_page
from tests.test_pipelines import _run

pytestmark = pytest.mark.slow

FAST_TRAINING = {"max_epochs": 2, "early_stopping_patience": None, "seed": 0}


def _shrink(params: dict) -> dict:
    """Tiny inputs and two epochs everywhere: this checks the plumbing, not the accuracy."""
    encoder = params["encoder"]
    encoder.update(name="resnet18", micro_batch=8)
    encoder["bag"].update(input_size=32, max_tiles=4)
    encoder["training"].update(FAST_TRAINING)
    for section in ("mil_study", "clam_study", "resnet_study"):
        for model in params.get(section, {}).get("models", {}).values():
            model.setdefault("training", {}).update(FAST_TRAINING)
            model["encoder"] = "resnet18"
            model.setdefault("bag", {}).update(input_size=32, max_tiles=4)
            if model["input"] == "core_image":
                model.setdefault("image", {}).update(input_size=32, batch_size=4)
    return params


@pytest.fixture
def model_params(tiny_synthetic_params):
    tiny_synthetic_params["synthetic"].update(n_patients=20, external_fraction=0.2)
    tiny_synthetic_params["synthetic"]["slides"]["n_slides"] = 0
    normalisation = tiny_synthetic_params["preprocessing"]["stain_normalisation"]
    normalisation.update(max_reference_cores=6, preview_tiles=0)
    return _shrink(tiny_synthetic_params)


def test_mil_then_clam_end_to_end(tmp_path, catalog_config, model_params):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = tmp_path / "data"
    model_params["mil_study"]["models"]["mil_cached"]["labels"] = "five_class"
    _run("synthetic", catalog_config, model_params)
    with mlflow.start_run() as run:
        _run("mil", catalog_config, model_params)
    manifest_dir = data / "02_intermediate" / "core_manifest.parquet"
    manifest = pd.read_parquet(next(manifest_dir.iterdir()) / "core_manifest.parquet")
    tiles = pd.read_parquet(data / "04_feature" / "tile_index.parquet")
    with_tiles = set(tiles["core_id"])

    # the encoder and one cache entry per core with a tile
    encoder = load_checkpoint(data / "06_models" / "encoder.pt", expected_arch="encoder")
    assert encoder.meta["task"] == "five_class"
    index = pd.read_parquet(data / "05_model_input" / "embedding_index.parquet")
    assert set(index["core_id"]) == with_tiles
    cache = data / "05_model_input" / "embeddings"
    assert {p.stem for p in cache.glob("*.npz")} == set(index["key"])
    entry = np.load(cache / f"{index['key'].iloc[0]}.npz")
    n = int(index["n_tiles"].iloc[0])
    assert entry["embeddings"].shape == (n, 512) and entry["coords"].shape == (n, 2)

    metrics = pd.read_csv(data / "08_reporting" / "metrics.csv")
    assert set(metrics["model"]) == {"mil", "mil_cached"}
    assert set(metrics["task"]) == {"ihc_score", "her2_status"}
    bagged = manifest[manifest["core_id"].isin(with_tiles)]
    assert set(metrics["split"]) == set(bagged["split"])  # every split scored, external apart
    assert {"train", "val", "external"} <= set(metrics["split"])
    assert set(metrics["run_id"]) == {run.info.run_id}
    predictions = pd.read_parquet(data / "07_model_output" / "predictions.parquet")
    assert len(predictions) == 4 * len(with_tiles)
    status = predictions.query("model == 'mil' and task == 'her2_status'")
    assert np.allclose(status[["p_0", "p_1"]].sum(axis=1), 1.0, atol=1e-5)
    # labels come from the manifest, never from file names
    truth = dict(zip(manifest["core_id"], manifest["her2_status"], strict=True))
    assert (status["y_true"] == status["core_id"].map(truth)).all()

    attention = pd.read_parquet(data / "07_model_output" / "attention.parquet")
    assert set(attention["model"]) == {"mil", "mil_cached"}
    sums = attention.groupby(["model", "task", "core_id"])["attention"].sum()
    assert np.allclose(sums, 1.0, atol=1e-4)
    merged = attention.merge(tiles, on=["core_id", "x", "y"], how="left", indicator=True)
    assert (merged["_merge"] == "both").all()  # evaluation bags are the tile index

    checkpoint = load_checkpoint(
        data / "06_models" / "mil.ihc_score.pt", expected={"n_classes": 4, "task": "ihc_score"}
    )
    assert checkpoint.meta["arch"] == "attention_mil"
    # trained on the five classes, scored on the task's two
    five = load_checkpoint(
        data / "06_models" / "mil_cached.her2_status.pt",
        expected={"n_classes": 5, "task": "her2_status"},
    )
    assert five.meta["class_names"] == ["0", "1", "2-", "2+", "3"]
    cached = predictions.query("model == 'mil_cached' and task == 'her2_status'")
    assert np.allclose(cached[["p_0", "p_1"]].sum(axis=1), 1.0, atol=1e-5)
    assert "p_2" not in cached.dropna(axis=1, how="all").columns
    history = pd.read_csv(data / "06_models" / "mil_cached.her2_status.history.csv")
    assert len(history) == 2 and {"train_loss", "val_balanced_accuracy"} <= set(history.columns)
    client = mlflow.tracking.MlflowClient()
    curve = client.get_metric_history(run.info.run_id, "mil_cached.her2_status.val_loss")
    assert [m.step for m in curve] == [0, 1]
    logged = client.get_run(run.info.run_id).data.metrics
    assert "mil.ihc_score.val.balanced_accuracy" in logged
    assert not list((data / "06_models" / "work").rglob("resume.pt"))  # finished runs tidy up

    # clam reuses the finished encoder and cache: nothing is recomputed, mil's rows stay
    before = {p.name: os.stat(p).st_mtime_ns for p in cache.glob("*.npz")}
    encoder_bytes = (data / "06_models" / "encoder.pt").read_bytes()
    with mlflow.start_run():  # kedro-mlflow opens one run per `kedro run`
        _run("clam", catalog_config, model_params)
    assert {p.name: os.stat(p).st_mtime_ns for p in cache.glob("*.npz")} == before
    assert (data / "06_models" / "encoder.pt").read_bytes() == encoder_bytes
    metrics = pd.read_csv(data / "08_reporting" / "metrics.csv")
    assert set(metrics["model"]) == {"mil", "mil_cached", "clam_sb", "clam_mb", "dsmil"}
    attention = pd.read_parquet(data / "07_model_output" / "attention.parquet")
    sums = attention.groupby(["model", "task", "core_id"])["attention"].sum()
    assert np.allclose(sums, 1.0, atol=1e-4)

    # the whole-core ResNet: batches of cores, no attention rows
    with mlflow.start_run():
        _run("resnet", catalog_config, model_params)
    metrics = pd.read_csv(data / "08_reporting" / "metrics.csv")
    assert "resnet34" in set(metrics["model"]) and "dsmil" in set(metrics["model"])
    attention = pd.read_parquet(data / "07_model_output" / "attention.parquet")
    assert "resnet34" not in set(attention["model"])
    predictions = pd.read_parquet(data / "07_model_output" / "predictions.parquet")
    assert len(predictions.query("model == 'resnet34'")) == 2 * len(with_tiles)

    # the report of every model: panels of the heatmap model's test cores, t-SNE, one page
    # (this tiny cohort has no test split: the panels and t-SNE show validation cores)
    model_params["reporting"]["heatmaps"].update(max_cores=3, disagreeing_tiles=2, split="val")
    model_params["reporting"]["tsne"]["split"] = "val"
    with mlflow.start_run():
        _run("reporting", catalog_config, model_params)
    reports = data / "08_reporting"
    table1 = pd.read_csv(reports / "table1.csv")
    assert {"mil", "mil_cached", "clam_sb", "dsmil", "resnet34"} <= set(table1["model"])
    # the external centre with and without normalisation, scored by the same trained models
    assert {"external", "external_unnormalised"} <= set(table1["split"])
    as_scanned = pd.read_parquet(
        data / "07_model_output" / "external_unnormalised_predictions.parquet"
    )
    external_cores = set(predictions.query("split == 'external'")["core_id"])
    assert set(as_scanned["core_id"]) == external_cores
    assert {"mil", "dsmil", "resnet34"} <= set(as_scanned["model"])
    assert as_scanned["model_version"].str.startswith("run:").all()
    val_cores = set(predictions.query("model == 'mil' and split == 'val'")["core_id"])
    panels = {p.stem for p in (reports / "heatmaps").glob("*.png")}
    assert panels <= val_cores and len(panels) == min(3, len(val_cores)) > 0
    odd = pd.read_csv(reports / "heatmaps" / "disagreeing_tiles.csv")
    assert set(odd["model"]) == {"mil"} and set(odd["core_id"]) == panels
    assert odd["gap"].between(-1, 1).all()
    assert list((reports / "tsne").glob("fig2_tsne_val.png"))
    view = view_page(reports / "report.html", ["table1", "table2", "figures", "heatmaps"])
    assert "resnet34" in view.sections["table1"]
    assert view.images >= len(panels) + 3 and not view.broken_images
    assert not view.console_errors and not view.outside_requests

    # every trained model is registered with its metrics
    client = mlflow.tracking.MlflowClient()
    registered = {m.name for m in client.search_registered_models()}
    assert {"her2_kedro.mil.ihc_score", "her2_kedro.dsmil.her2_status"} <= registered
    version = client.get_model_version("her2_kedro.mil.her2_status", "1")
    assert "val.balanced_accuracy" in version.tags

    # predict: two test cores dropped into the inbox under new names, without labels, and a
    # broken file; the intensity baseline is not trained yet, and predict says so
    inbox = data / "01_raw" / "inbox"
    inbox.mkdir()
    internal = manifest[manifest["core_id"].isin(with_tiles) & (manifest["cohort"] != "external")]
    chosen = internal.head(2)
    for i, image in enumerate(chosen["image"]):
        source = data / "02_intermediate" / "cores" / image
        (inbox / f"new_{i}{source.suffix}").write_bytes(source.read_bytes())
    (inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(Exception, match="pipelines=intensity"), mlflow.start_run():
        _run("predict", catalog_config, model_params)
    with mlflow.start_run():  # kedro-mlflow opens one run per `kedro run`
        _run("intensity", catalog_config, model_params)
    # as scanned, a copy of a study core gets the study's own probabilities: same model, same
    # pixels, same preparation (internal cores are not normalised)
    model_params["predict"]["stain_normalise"] = False
    with mlflow.start_run():
        _run("predict", catalog_config, model_params)
    raw = pd.read_csv(data / "07_model_output" / "inbox_predictions.csv").set_index("core_id")
    study = predictions.query("model == 'mil' and task == 'her2_status'").set_index("core_id")
    for i, core_id in enumerate(chosen["core_id"]):
        assert raw.loc[f"new_{i}", "p_her2_positive"] == pytest.approx(
            study.loc[core_id, "p_1"], abs=1e-4
        )
    assert not raw["normalised"].any()
    model_params["predict"]["stain_normalise"] = True  # the default: rescored, not skipped
    with mlflow.start_run():
        _run("predict", catalog_config, model_params)
    calls = pd.read_csv(data / "07_model_output" / "inbox_predictions.csv")
    assert sorted(calls["core_id"]) == ["new_0", "new_1"]
    score_p = calls[[f"p_score_{c}" for c in range(4)]].to_numpy()
    assert np.allclose(score_p.sum(axis=1), 1.0, atol=1e-5)
    assert (calls["ihc_score"] == score_p.argmax(axis=1)).all()
    assert calls["p_her2_positive"].between(0, 1).all()
    assert set(calls["status_model"]) == {"mil"}
    assert calls["status_model_version"].str.startswith("run:").all()  # the training run
    assert calls["intensity_her2_status"].isin([0, 1]).all()
    assert calls["normalised"].all()
    assert {p.stem for p in (reports / "inbox").glob("*.png")} == {"new_0", "new_1"}
    inbox_qc = pd.read_csv(data / "02_intermediate" / "inbox_qc_report.csv")
    assert inbox_qc.set_index("core_id").loc["broken.jpg", "status"] == "rejected"
    page = (reports / "report.html").read_text()
    assert 'id="inbox"' in page and "broken.jpg" in page and "new_1" in page

    # a rerun skips the cores already scored by the same models; a champion alias takes over
    with mlflow.start_run():
        _run("predict", catalog_config, model_params)
    again = pd.read_csv(data / "07_model_output" / "inbox_predictions.csv")
    assert list(again["scored_at"]) == list(calls["scored_at"])
    client.set_registered_model_alias("her2_kedro.mil.her2_status", "champion", "1")
    client.set_registered_model_alias("her2_kedro.mil.ihc_score", "champion", "1")
    with mlflow.start_run():
        _run("predict", catalog_config, model_params)
    champion = pd.read_csv(data / "07_model_output" / "inbox_predictions.csv")
    assert champion["status_model_version"].str.contains("@champion").all()
    assert np.allclose(champion["p_her2_positive"], calls["p_her2_positive"], atol=1e-5)
