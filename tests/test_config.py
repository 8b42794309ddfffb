"""Parameter files are validated at load, with the bad key or unknown section named."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader

from her2_kedro.config import SECTIONS, ParameterError, SyntheticParams, validate_parameters
from tests.conftest import PROJECT

ENVS = sorted(p.name for p in (PROJECT / "conf").iterdir() if p.is_dir() and p.name != "base")


def _env_parameters(env: str) -> dict:
    loader = OmegaConfigLoader(
        conf_source=str(PROJECT / "conf"),
        base_env="base",
        default_run_env=env,
        merge_strategy={"parameters": "soft"},
    )
    return loader["parameters"]


def test_shipped_parameters_are_valid(base_params):
    validated = validate_parameters(base_params)
    assert set(validated) == set(SECTIONS)


@pytest.mark.parametrize("env", ENVS)
def test_every_environment_loads_and_validates(env):
    params = _env_parameters(env)
    validated = validate_parameters(params)
    assert set(validated) == set(SECTIONS)


def test_paper_env_overrides_single_keys():
    p = validate_parameters(_env_parameters("paper"))["synthetic"]
    assert isinstance(p, SyntheticParams)
    assert p.core_size == 5468 and p.priors()["0"] > p.priors()["3"]
    # soft merge: keys the paper env does not name keep their base values
    assert p.seed == validate_parameters(_env_parameters("local"))["synthetic"].seed


@pytest.mark.parametrize("section", [s for s in SECTIONS if not s.endswith("_study")])
def test_base_yaml_and_model_defaults_agree(base_params, section):
    """One source of truth: conf/base states the models' defaults, it does not override them."""
    model = SECTIONS[section]
    assert model.model_validate(base_params[section]) == model()


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("synthetic", "core_size", 10, "synthetic.core_size"),
        ("synthetic", "class_priors", {"4": 1.0}, "unknown classes"),
        ("synthetic", "n_patinets", 3, "synthetic.n_patinets"),
        ("ingestion", "splits", {"fractions": {"train": 0.9, "val": 0.3, "test": 0.0}}, "sum to 1"),
        ("tiles", "min_tissue", 1.5, "tiles.min_tissue"),
        ("cohorts", "evaluation_onyl", ["external"], "cohorts.evaluation_onyl"),
    ],
)
def test_bad_parameters_are_named(base_params, section, key, value, message):
    base_params[section][key] = value
    with pytest.raises(ParameterError, match=message):
        validate_parameters(base_params)


def test_unknown_section_stops_with_its_name(base_params, tmp_path: Path):
    base_params["ingestoin"] = {"splits": {"seed": 1}}
    with pytest.raises(ParameterError, match="ingestoin: unknown parameter section"):
        validate_parameters(base_params)


def test_slides_pitch_must_fit_the_cores(base_params):
    base_params["synthetic"]["slides"].update(core_diameter_px=800, pitch_px=700)
    with pytest.raises(ParameterError, match="pitch_px"):
        validate_parameters(base_params)
