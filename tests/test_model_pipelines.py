"""The CNN studies end to end on a tiny synthetic cohort with tiny inputs, through Kedro's runner:
features (trained encoder + embedding cache), mil, clam, resnet; reports, checkpoints, MLflow."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from her2_kedro.modelling.checkpoints import load_checkpoint
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
