"""The intensity study's models and tasks are declared once, in parameters_intensity.yml."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from her2_kedro.config import IntensityStudyParams, ParameterError
from her2_kedro.config.project import project_parameters
from her2_kedro.hooks import check_study_matches_pipeline
from her2_kedro.pipelines.intensity.pipeline import create_pipeline, declared_study
from tests.conftest import PROJECT


def _study(base_params, **extra_models) -> IntensityStudyParams:
    study = copy.deepcopy(base_params["intensity_study"])
    study["models"].update(extra_models)
    return IntensityStudyParams.model_validate(study)


def test_the_pipeline_has_one_namespace_per_declared_model_and_task(base_params):
    dab_mean = {
        "name": "dab_mean",
        "features_table": "intensity_plus_features",
        "features": ["dab_mean"],
    }
    pipeline = create_pipeline(_study(base_params, dab_mean=dab_mean))
    fits = {n.name for n in pipeline.nodes if n.name.endswith(".fit_model")}
    assert fits == {
        f"{m}.{t}.fit_model"
        for m in ("intensity", "intensity_plus", "dab_mean")
        for t in ("ihc_score", "her2_status")
    }
    table = next(n for n in pipeline.nodes if n.name == "dab_mean.her2_status.build_task_table")
    assert "intensity_plus_features" in table.inputs
    assert "params:intensity_study.models.dab_mean" in table.inputs
    paper = next(n for n in pipeline.nodes if n.name == "intensity.ihc_score.build_task_table")
    assert "intensity_features" in paper.inputs
    report = next(n for n in pipeline.nodes if n.name == "collect_intensity_reports")
    assert "dab_mean.ihc_score.metrics" in report.inputs


def test_a_model_removed_from_yaml_is_not_built(base_params):
    study = copy.deepcopy(base_params["intensity_study"])
    del study["models"]["intensity_plus"]
    pipeline = create_pipeline(IntensityStudyParams.model_validate(study))
    assert not [n for n in pipeline.nodes if n.name.startswith("intensity_plus.")]


def _write_project(root: Path, local_models: dict | None) -> None:
    (root / "conf" / "base").mkdir(parents=True)
    (root / "conf" / "local").mkdir()
    for path in (PROJECT / "conf" / "base").glob("parameters*.yml"):
        (root / "conf" / "base" / path.name).write_text(path.read_text())
    if local_models:
        (root / "conf" / "local" / "parameters_mine.yml").write_text(
            yaml.safe_dump({"intensity_study": {"models": local_models}})
        )
    (root / "pyproject.toml").write_text("[tool.kedro]\npackage_name = 'her2_kedro'\n")


def test_registry_reads_the_run_environment(tmp_path, monkeypatch):
    extra = {"p99": {"name": "p99", "features": ["dab_p99"]}}
    _write_project(tmp_path, extra)
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    study = declared_study(project_parameters(root=tmp_path))
    assert set(study.models) == {"intensity", "intensity_plus", "p99"}  # soft merge with base
    (tmp_path / "conf" / "other").mkdir()
    monkeypatch.setenv("KEDRO_ENV", "other")
    assert set(declared_study(project_parameters(root=tmp_path)).models) == {
        "intensity",
        "intensity_plus",
    }


def test_session_parameters_that_differ_from_the_built_pipeline_stop_the_run(
    base_params, monkeypatch
):
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    monkeypatch.chdir(PROJECT)
    extra = {"p99": {"name": "p99", "features": ["dab_p99"]}}
    built = declared_study()
    check_study_matches_pipeline(built)  # the same declaration passes
    with pytest.raises(ParameterError, match="its pipeline was built from the 'local'"):
        check_study_matches_pipeline(_study(base_params, **extra))


def test_torch_study_that_differs_from_the_built_pipeline_stops_the_run(base_params, monkeypatch):
    from her2_kedro.config import TorchStudyParams

    monkeypatch.delenv("KEDRO_ENV", raising=False)
    monkeypatch.chdir(PROJECT)
    study = copy.deepcopy(base_params["clam_study"])
    check_study_matches_pipeline(TorchStudyParams.model_validate(study), "clam_study")
    study["models"]["extra"] = {**study["models"]["dsmil"], "name": "extra"}
    with pytest.raises(ParameterError, match="clam_study declares"):
        check_study_matches_pipeline(TorchStudyParams.model_validate(study), "clam_study")


def test_a_study_without_models_is_refused(base_params):
    study = copy.deepcopy(base_params["intensity_study"])
    study["models"] = {}
    with pytest.raises(ValueError, match="models"):
        IntensityStudyParams.model_validate(study)
    with pytest.raises(ParameterError, match="No intensity_study section"):
        declared_study({})


def test_init_head_given_only_at_run_time_stops_the_run_with_where_to_set_it(
    base_params, monkeypatch
):
    """`init_head` wires the mil_cached checkpoint into mil's training node: a value from
    `--params` that the pipeline was not built with is refused, not met by a missing input."""
    from her2_kedro.config import TorchStudyParams

    monkeypatch.delenv("KEDRO_ENV", raising=False)
    monkeypatch.chdir(PROJECT)
    study = copy.deepcopy(base_params["mil_study"])
    mil = study["models"]["mil"]
    mil["init_head"] = None if mil.get("init_head") else "mil_cached"  # the other choice
    with pytest.raises(ParameterError, match=r"init_head mil_cached.*not from --params"):
        check_study_matches_pipeline(TorchStudyParams.model_validate(study), "mil_study")
