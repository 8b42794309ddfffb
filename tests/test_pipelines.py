"""End to end: synthetic → ingestion through Kedro's SequentialRunner on the project's own catalog."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from her2_kedro.pipeline_registry import register_pipelines

pytestmark = pytest.mark.slow


def _add_params(catalog: DataCatalog, prefix: str, values) -> None:
    """Register params:<a>, params:<a>.<b>, ... as Kedro does for nested parameters."""
    catalog[f"params:{prefix}"] = MemoryDataset(values)
    if isinstance(values, dict):
        for key, value in values.items():
            _add_params(catalog, f"{prefix}.{key}", value)


def _catalog(config, params) -> DataCatalog:
    catalog = DataCatalog.from_config(config)
    catalog["parameters"] = MemoryDataset(params)  # as Kedro's context registers them
    for section, values in params.items():
        _add_params(catalog, section, values)
    return catalog


def _run(name, config, params):
    pipeline = register_pipelines()[name]
    SequentialRunner().run(pipeline, _catalog(config, params))


@pytest.fixture
def ingested(tmp_path, catalog_config, tiny_synthetic_params):
    _run("synthetic", catalog_config, tiny_synthetic_params)
    _run("ingestion", catalog_config, tiny_synthetic_params)
    return tmp_path / "data"


def test_synthetic_then_ingestion(ingested: Path, tiny_synthetic_params):
    raw = ingested / "01_raw"
    labels = pd.read_csv(raw / "labels.csv")
    slide_map = pd.read_csv(raw / "slide_map.csv")
    qc = pd.read_csv(ingested / "02_intermediate" / "qc_report.csv")
    assert list(qc.columns) == ["source", "core_id", "status", "reason"]
    accepted = qc[qc["status"] == "accepted"]
    # every folder core and every present slide core is accepted; the one empty grid position is reported
    assert len(accepted) == len(labels) + len(slide_map)
    missing = qc[qc["reason"].str.startswith("missing grid position")]
    assert len(missing) == 1
    manifest_dir = ingested / "02_intermediate" / "core_manifest.parquet"
    versions = sorted(manifest_dir.iterdir())
    assert len(versions) == 1  # versioned: <timestamp>/core_manifest.parquet
    manifest = pd.read_parquet(versions[0] / "core_manifest.parquet")
    assert set(manifest["core_id"]) == set(accepted["core_id"])
    cores = ingested / "02_intermediate" / "cores"
    assert sorted(p.name for p in cores.iterdir()) == sorted(manifest["image"])
    # dearrayed cores carry the labels of their slide_map row
    for row in slide_map.itertuples(index=False):
        core = manifest.set_index("core_id").loc[f"{Path(row.slide).stem}_{row.core}"]
        assert core["ihc_score"] == row._2 and core["her2_status"] == row._3
    # patient-level split: no patient in two splits
    assert manifest.groupby("patient_id")["split"].nunique().max() == 1
    # evaluation-only cohorts are split "external" at ingestion, the others train/val/test
    evaluation_only = set(tiny_synthetic_params["cohorts"]["evaluation_only"])
    held_out = manifest["cohort"].isin(evaluation_only)
    assert (manifest.loc[held_out, "split"] == "external").all()
    assert set(manifest.loc[~held_out, "split"]) <= {"train", "val", "test"}


def test_bad_inputs_cost_nothing_else(tmp_path, catalog_config, tiny_synthetic_params):
    _run("synthetic", catalog_config, tiny_synthetic_params)
    raw = tmp_path / "data" / "01_raw"
    labels = pd.read_csv(raw / "labels.csv")
    good = len(labels)
    (raw / "cores" / "truncated.jpg").write_bytes(
        (raw / "cores" / labels.filename[0]).read_bytes()[:500]
    )
    (raw / "cores" / "notes.jpg").write_text("not an image")
    extra = pd.DataFrame(
        {
            "filename": ["truncated.jpg", "notes.jpg", "../../secret.jpg", "absent.jpg"],
            "ihc-score": [1, 2, 3, 0],
            "her2-status": [0, 1, 1, 0],
        }
    )
    pd.concat([labels, extra]).to_csv(raw / "labels.csv", index=False)
    (raw / "slides" / "broken.tif").write_bytes(b"II*\x00garbage")
    _run("ingestion", catalog_config, tiny_synthetic_params)
    qc = pd.read_csv(tmp_path / "data" / "02_intermediate" / "qc_report.csv")
    folder_ok = qc[(qc["status"] == "accepted") & (qc["source"] == "cores")]
    assert len(folder_ok) == good
    reasons = qc.set_index("core_id")["reason"].to_dict()
    # 500 bytes end inside the JPEG header: the header itself is reported as cut short
    assert reasons["truncated.jpg"] == "not an image or corrupt header: Truncated File Read"
    assert "not an image" in reasons["notes.jpg"].lower()
    assert "escapes" in reasons["../../secret.jpg"]
    assert "label without file" in reasons["absent.jpg"]
    broken = qc[qc["source"] == "slides/broken.tif"]
    assert len(broken) == 1 and "unreadable slide" in broken["reason"].iloc[0]


@pytest.fixture
def study_params(tiny_synthetic_params):
    """Enough patients for every class to reach train and validation, plus an external cohort."""
    tiny_synthetic_params["synthetic"].update(n_patients=20, external_fraction=0.2)
    tiny_synthetic_params["preprocessing"]["stain_normalisation"]["max_reference_cores"] = 6
    tiny_synthetic_params["preprocessing"]["stain_normalisation"]["preview_tiles"] = 2
    return tiny_synthetic_params


def test_intensity_study_end_to_end_with_mlflow(tmp_path, catalog_config, study_params):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _run("synthetic", catalog_config, study_params)
    with mlflow.start_run() as run:
        _run("intensity", catalog_config, study_params)
    data = tmp_path / "data"

    tiles = pd.read_parquet(data / "04_feature" / "tile_index.parquet")
    assert list(tiles.columns) == ["core_id", "x", "y", "tissue_fraction"]
    assert (tiles["tissue_fraction"] > 0.05).all() and (tiles[["x", "y"]] % 224 == 0).all().all()
    features = pd.read_parquet(data / "04_feature" / "intensity_features.parquet")
    assert list(features.columns) == ["core_id", "max_mean_dab"]
    manifest_dir = data / "02_intermediate" / "core_manifest.parquet"
    manifest = pd.read_parquet(next(manifest_dir.iterdir()) / "core_manifest.parquet")
    assert set(features["core_id"]) == set(manifest["core_id"])

    metrics = pd.read_csv(data / "08_reporting" / "metrics.csv")
    assert list(metrics.columns) == [
        "model",
        "task",
        "split",
        "n",
        "balanced_accuracy",
        "precision_weighted",
        "recall_weighted",
        "f1_weighted",
        "auroc",
        "run_id",
        "manifest_version",
    ]
    assert set(metrics["run_id"]) == {run.info.run_id}  # no kedro hooks here: version unknown
    assert set(metrics["model"]) == {"intensity", "intensity_plus"}
    assert set(metrics["task"]) == {"ihc_score", "her2_status"}
    # external-centre cores never train: they are reported as their own split
    assert "external" in set(metrics["split"])
    external = manifest[manifest["cohort"] == "external"]
    n_external = metrics.query(
        "model == 'intensity' and task == 'her2_status' and split == 'external'"
    )["n"]
    assert int(n_external.iloc[0]) == len(external) > 0
    predictions = pd.read_parquet(data / "07_model_output" / "predictions.parquet")
    assert len(predictions) == 4 * len(manifest)
    assert set(predictions["run_id"]) == {run.info.run_id}
    # only the external centre was normalised, and the flag says where it actually ran
    plus = pd.read_parquet(data / "04_feature" / "intensity_plus_features.parquet")
    flagged = dict(zip(plus["core_id"], plus["normalised"], strict=True))
    assert flagged == {c: c in set(external["core_id"]) for c in manifest["core_id"]}
    reference = json.loads(
        next((data / "04_feature" / "reference_stains.json").rglob("*.json")).read_text()
    )
    assert reference["status"] == "estimated"
    train_internal = manifest[(manifest["split"] == "train") & (manifest["cohort"] != "external")]
    assert set(reference["cores"]) <= set(train_internal["core_id"])
    assert (
        data / "08_reporting" / "intensity" / "her2_status" / "status_crosstab_test.csv"
    ).is_file()
    model = json.loads((data / "06_models" / "intensity.her2_status.json").read_text())
    assert model["features"] == ["max_mean_dab"] and model["classes"] == [0, 1]

    logged = mlflow.tracking.MlflowClient().get_run(run.info.run_id).data.metrics
    test_rows = metrics.query("split == 'test'")
    for row in test_rows.itertuples(index=False):
        name = f"{row.model}.{row.task}.test.balanced_accuracy"
        assert logged[name] == pytest.approx(row.balanced_accuracy)
    artifacts = [a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id)]
    assert {"models", "figures"} <= set(artifacts)

    # the report of an intensity-only study: tables and page, no attention so no heatmaps
    with mlflow.start_run() as report_run:
        _run("reporting", catalog_config, study_params)
    table1 = pd.read_csv(data / "08_reporting" / "table1.csv")
    assert set(table1["model"]) == {"intensity", "intensity_plus"}
    # the external cohort is stain normalised, so its raw pixels are scored as scanned beside it
    assert set(table1["split"]) == {"test", "external", "external_unnormalised"}
    studied = table1[table1["split"] != "external_unnormalised"]
    merged = studied.merge(metrics, on=["model", "task", "split"], suffixes=("", "_metrics"))
    assert len(merged) == len(studied)
    scanned = table1.query("split == 'external_unnormalised'").set_index(["model", "task"])
    normalised = table1.query("split == 'external'").set_index(["model", "task"])
    assert set(scanned.index) == set(normalised.index)
    assert (scanned["n"] <= normalised.loc[scanned.index, "n"]).all()
    assert np.allclose(merged["balanced_accuracy"], merged["balanced_accuracy_metrics"])
    assert (table1["ci_low"] <= table1["balanced_accuracy"]).all()
    paper = table1.query("model == 'intensity' and split == 'test'").set_index("task")
    assert paper.loc["ihc_score", "paper_balanced_accuracy"] == 0.6876
    page = (data / "08_reporting" / "report.html").read_text()
    assert 'id="table1"' in page and "intensity_plus" in page
    assert not list((data / "08_reporting" / "heatmaps").glob("*.png"))
    logged = {
        a.path
        for a in mlflow.tracking.MlflowClient().list_artifacts(report_run.info.run_id, "report")
    }
    assert {"report/report.html", "report/table1.csv"} <= logged


def test_reporting_before_any_study_says_what_to_run(
    ingested, catalog_config, tiny_synthetic_params
):
    with pytest.raises(Exception, match="run a study first"):
        _run("reporting", catalog_config, tiny_synthetic_params)


def test_rerun_replaces_own_metric_rows_and_keeps_others(tmp_path, catalog_config, study_params):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    reporting = tmp_path / "data" / "08_reporting"
    reporting.mkdir(parents=True)
    other = pd.DataFrame(
        [
            {
                "model": "mil",
                "task": "ihc_score",
                "split": "test",
                "n": 3,
                "balanced_accuracy": 0.5,
                "precision_weighted": 0.5,
                "recall_weighted": 0.5,
                "f1_weighted": 0.5,
                "auroc": 0.5,
            }
        ]
    )
    other.to_csv(reporting / "metrics.csv", index=False)
    _run("synthetic", catalog_config, study_params)
    with mlflow.start_run():
        _run("intensity", catalog_config, study_params)
        first = pd.read_csv(reporting / "metrics.csv")
        _run("intensity", catalog_config, study_params)
    second = pd.read_csv(reporting / "metrics.csv")
    assert len(second) == len(first)
    assert (second["model"] == "mil").sum() == 1
