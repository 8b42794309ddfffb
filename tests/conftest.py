"""Shared fixtures: the project's own catalog and parameters, pointed at a temporary data folder."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from skimage.data import immunohistochemistry

from her2_kedro.config.project import rebase_data_paths

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

PROJECT = Path(__file__).resolve().parents[1]
REAL_CORES = PROJECT.parent / "shared" / "data" / "real_cores"


def load_yaml(relative: str) -> dict[str, Any]:
    return yaml.safe_load((PROJECT / relative).read_text())


@pytest.fixture
def catalog_config(tmp_path: Path) -> dict[str, Any]:
    """conf/base/catalog_*.yml, merged, with every data path under ``tmp_path/data``."""
    catalog: dict[str, Any] = {}
    for path in sorted((PROJECT / "conf" / "base").glob("catalog*.yml")):
        catalog.update(yaml.safe_load(path.read_text()) or {})
    return rebase_data_paths(catalog, tmp_path / "data")


@pytest.fixture
def base_params() -> dict[str, Any]:
    """All sections of conf/base/parameters_*.yml, merged."""
    params: dict[str, Any] = {}
    for path in sorted((PROJECT / "conf" / "base").glob("parameters*.yml")):
        params.update(yaml.safe_load(path.read_text()) or {})
    return copy.deepcopy(params)


@pytest.fixture
def tiny_synthetic_params(base_params: dict[str, Any]) -> dict[str, Any]:
    """A synthetic cohort small enough for a CPU test run (a dozen small cores, one small slide)."""
    p = base_params["synthetic"]
    p.update(n_patients=8, cores_per_patient=[1, 2], core_size=448, cell_diameter_px=20)
    p["artefact_rates"] = {"tear": 0.0, "fold": 0.0, "partial": 0.0, "blur": 0.0}
    p["slides"].update(
        n_slides=1, n_rows=3, n_cols=4, core_diameter_px=400, pitch_px=480, n_missing=1, n_debris=3
    )
    return base_params


def fake_core(canvas: int, patch: int, at: int, source: int = 0) -> np.ndarray:
    """White glass with a patch of real DAB/haematoxylin tissue pasted at (at, at)."""
    rgb = np.full((canvas, canvas, 3), 255, dtype=np.uint8)
    tissue = immunohistochemistry()[source : source + patch, source : source + patch]
    rgb[at : at + patch, at : at + patch] = tissue
    return rgb


@pytest.fixture(scope="module")
def cohort() -> dict[str, np.ndarray]:
    """Three small cores by image name (different tissue crops and placements)."""
    return {
        "a.png": fake_core(288, 160, 48),
        "b.png": fake_core(256, 200, 20, source=150),
        "c.png": fake_core(300, 120, 90, source=300),
    }


@pytest.fixture(autouse=True)
def _kedro_env_restored():
    """A session with an ``env`` sets ``KEDRO_ENV`` for the pipeline registry (as `kedro run
    --env` does, once per process); the next test gets the environment it started with."""
    before = os.environ.get("KEDRO_ENV")
    yield
    if before is None:
        os.environ.pop("KEDRO_ENV", None)
    else:
        os.environ["KEDRO_ENV"] = before


@pytest.fixture(autouse=True)
def _no_mlflow_run_outlives_its_test():
    """End any MLflow run a test left active (MLflow's fluent API starts one implicitly when an
    artifact is logged outside a run); the next test would otherwise log into a deleted store.

    A Kedro session also leaves process-wide state that a real ``kedro run`` (one per process)
    never carries over: the experiment MLflow's ``set_experiment`` made active (also in
    ``MLFLOW_EXPERIMENT_ID``), and the run id kept by kedro-mlflow's one hook instance. Both
    point into the test's own, deleted store; they are reset too.
    """
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.tracking.fluent._active_experiment_id = None
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    hook = sys.modules.get("kedro_mlflow.framework.hooks.mlflow_hook")
    if hook is not None:
        hook.mlflow_hook.run_id = None
