"""Parameter files are validated at load, with the bad key named."""

from __future__ import annotations

import pytest

from her2_kedro.config import ParameterError, SyntheticParams, validate_parameters


def test_shipped_parameters_are_valid(base_params):
    validated = validate_parameters(base_params)
    assert set(validated) == {"synthetic", "ingestion", "preprocessing", "intensity_study"}


def test_paper_env_overrides_are_valid(base_params):
    from tests.conftest import load_yaml

    paper = load_yaml("conf/paper/parameters_synthetic.yml")["synthetic"]
    merged = {**base_params["synthetic"], **paper}
    merged["slides"] = {**base_params["synthetic"]["slides"], **paper["slides"]}
    p = SyntheticParams.model_validate(merged)
    assert p.core_size == 5468 and p.priors()["0"] > p.priors()["3"]


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("synthetic", "core_size", 10, "synthetic.core_size"),
        ("synthetic", "class_priors", {"4": 1.0}, "unknown classes"),
        ("synthetic", "n_patinets", 3, "synthetic.n_patinets"),
        ("ingestion", "splits", {"fractions": {"train": 0.9, "val": 0.3, "test": 0.0}}, "sum to 1"),
    ],
)
def test_bad_parameters_are_named(base_params, section, key, value, message):
    base_params[section][key] = value
    with pytest.raises(ParameterError, match=message):
        validate_parameters(base_params)


def test_slides_pitch_must_fit_the_cores(base_params):
    base_params["synthetic"]["slides"].update(core_diameter_px=800, pitch_px=700)
    with pytest.raises(ParameterError, match="pitch_px"):
        validate_parameters(base_params)
