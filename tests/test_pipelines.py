"""End to end: synthetic → ingestion through Kedro's SequentialRunner on the project's own catalog."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from her2_kedro.pipeline_registry import register_pipelines

pytestmark = pytest.mark.slow


def _catalog(config, params) -> DataCatalog:
    catalog = DataCatalog.from_config(config)
    for section, values in params.items():
        catalog[f"params:{section}"] = MemoryDataset(values)
    return catalog


def _run(name, config, params):
    pipeline = register_pipelines()[name]
    SequentialRunner().run(pipeline, _catalog(config, params))


@pytest.fixture
def ingested(tmp_path, catalog_config, tiny_synthetic_params):
    _run("synthetic", catalog_config, tiny_synthetic_params)
    _run("ingestion", catalog_config, tiny_synthetic_params)
    return tmp_path / "data"


def test_synthetic_then_ingestion(ingested: Path):
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
    assert set(manifest["split"]) <= {"train", "val", "test"}


def test_bad_inputs_cost_nothing_else(tmp_path, catalog_config, tiny_synthetic_params):
    _run("synthetic", catalog_config, tiny_synthetic_params)
    raw = tmp_path / "data" / "01_raw"
    labels = pd.read_csv(raw / "labels.csv")
    good = len(labels)
    (raw / "cores" / "truncated.jpg").write_bytes((raw / "cores" / labels.filename[0]).read_bytes()[:500])
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
    assert "truncated" in reasons["truncated.jpg"].lower() or "corrupt" in reasons["truncated.jpg"].lower()
    assert "not an image" in reasons["notes.jpg"].lower()
    assert "escapes" in reasons["../../secret.jpg"]
    assert "label without file" in reasons["absent.jpg"]
    broken = qc[qc["source"] == "slides/broken.tif"]
    assert len(broken) == 1 and "unreadable slide" in broken["reason"].iloc[0]
