"""The user's path: `kedro run` through a KedroSession, with the project's hooks and kedro-mlflow."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from her2_kedro.config import ParameterError
from tests.conftest import PROJECT

pytestmark = pytest.mark.slow

TINY = {
    "synthetic": {
        "n_patients": 20,
        "core_size": 448,
        "cell_diameter_px": 20,
        "external_fraction": 0.2,
        "slides": {
            "n_rows": 3,
            "n_cols": 4,
            "core_diameter_px": 400,
            "pitch_px": 480,
            "n_missing": 1,
            "n_debris": 2,
        },
    },
    "preprocessing": {"stain_normalisation": {"max_reference_cores": 6, "preview_tiles": 2}},
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A copy of the project's configuration in an empty folder, small overrides in conf/local."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(PROJECT / "pyproject.toml", root)
    shutil.copy(PROJECT / ".telemetry", root)
    shutil.copytree(PROJECT / "conf", root / "conf")
    (root / "src").mkdir()  # the package itself is imported from the installed project
    (root / "conf" / "local").mkdir(exist_ok=True)
    (root / "conf" / "local" / "parameters_tiny.yml").write_text(yaml.safe_dump(TINY))
    monkeypatch.chdir(root)
    bootstrap_project(root)
    return root


def _run(root, pipeline: str, **kwargs) -> None:
    with KedroSession.create(project_path=root, **kwargs) as session:
        session.run(pipeline_names=[pipeline])


def test_kedro_run_synthetic_then_intensity(project):
    _run(project, "synthetic")
    _run(project, "intensity")
    metrics = pd.read_csv(project / "data" / "08_reporting" / "metrics.csv")
    assert {"intensity", "intensity_plus"} == set(metrics["model"])
    qc = pd.read_csv(project / "data" / "02_intermediate" / "qc_report.csv")
    assert (qc["status"] == "accepted").sum() > 20
    # kedro-mlflow tracked the run in the SQLite store named in conf/base/mlflow.yml
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("her2_kedro")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the synthetic pipeline is not tracked
    logged = runs[0].data.metrics
    assert "intensity.her2_status.test.balanced_accuracy" in logged
    assert runs[0].data.params["intensity_study.seed"] == "0"
    # every row says which run and which manifest version it came from
    manifest_dir = project / "data" / "02_intermediate" / "core_manifest.parquet"
    (version,) = [p.name for p in manifest_dir.iterdir()]
    predictions = pd.read_parquet(project / "data" / "07_model_output" / "predictions.parquet")
    for table in (metrics, predictions):
        assert set(table["run_id"]) == {runs[0].info.run_id}
        assert set(table["manifest_version"]) == {version}


def test_invalid_parameter_stops_the_run_before_any_work(project):
    (project / "conf" / "local" / "parameters_bad.yml").write_text(
        yaml.safe_dump(
            {"ingestion": {"splits": {"fractions": {"train": 2.0, "val": 0, "test": 0}}}}
        )
    )
    with pytest.raises(ParameterError, match="ingestion.splits.fractions"):
        _run(project, "ingestion")
    assert not (project / "data").exists()


def test_old_manifest_version_with_changed_cores_stops_preprocessing(project):
    """The README's reload recipe: an old manifest meeting changed core files is an error, not a mix."""
    from her2_kedro.features.preprocess import CoreContentError

    _run(project, "synthetic")
    _run(project, "ingestion")
    manifest_dir = project / "data" / "02_intermediate" / "core_manifest.parquet"
    (version,) = [p.name for p in manifest_dir.iterdir()]
    manifest = pd.read_parquet(manifest_dir / version / "core_manifest.parquet")
    cores = project / "data" / "02_intermediate" / "cores"
    first, second = manifest.iloc[0], manifest.iloc[1]
    (cores / first["image"]).write_bytes((cores / second["image"]).read_bytes())
    with pytest.raises(CoreContentError) as err:
        with KedroSession.create(project_path=project) as session:
            session.run(pipeline_names=["preprocessing"], load_versions={"core_manifest": version})
    assert version in str(err.value) and first["core_id"] in str(err.value)
    assert second["core_id"] not in str(err.value)


def test_our_tests_package_wins_over_torchmils():
    """torchmil's wheel installs a top-level ``tests`` package; ``from tests...`` must be ours."""
    import tests

    assert Path(tests.__file__).resolve().parent == PROJECT / "tests"


def test_the_singular_pipeline_flag_users_type_runs_that_pipeline(project):
    """`kedro run --pipeline=NAME` (as users type it) runs the registered pipeline NAME."""
    import subprocess
    import sys

    _run(project, "synthetic")
    kedro = Path(sys.executable).with_name("kedro")
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    done = subprocess.run(
        [str(kedro), "run", "--pipeline=ingestion"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (project / "data" / "02_intermediate" / "qc_report.csv").is_file()
    assert not (project / "data" / "04_feature" / "tile_index.parquet").exists()  # only ingestion
    # mlflow's chatter about kedro-mlflow's pipeline model, which users cannot act on, is dropped
    assert "Add type hints" not in done.stdout + done.stderr


def test_the_session_environment_shapes_the_pipelines(project):
    """`kedro run --env=NAME` reaches the pipeline registry: an `init_head` set in conf/NAME wires
    the head's checkpoint into the training node (the registry read conf/local before)."""
    from kedro.framework.project import pipelines

    other = project / "conf" / "other"
    other.mkdir()
    head = {"mil_study": {"models": {"mil": {"init_head": "mil_cached"}}}}
    (other / "parameters_head.yml").write_text(yaml.safe_dump(head))
    with KedroSession.create(project_path=project, env="other") as session:
        session.load_context()  # the parameter check passes: pipelines and session agree
        nodes = {n.name: n for n in pipelines["mil"].nodes}
    assert "mil_cached.ihc_score.checkpoint" in nodes["mil.ihc_score.train_model"].inputs
    assert "mil_cached.her2_status.checkpoint" in nodes["mil.her2_status.train_model"].inputs
