"""Parameters of the intensity study (``parameters_intensity.yml``): models and tasks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from her2_kedro.config.base import Strict, check_keys_are_names


class IntensityModelConfig(Strict):
    """One intensity model: the feature table it reads, its features and the C values tried."""

    name: str
    features_table: Literal["intensity_features", "intensity_plus_features"] = (
        "intensity_plus_features"
    )
    features: list[str] = Field(min_length=1)
    standardize: bool = True
    c_grid: list[float] = Field([0.01, 0.1, 1.0, 10.0, 100.0], min_length=1)

    @field_validator("c_grid")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(c <= 0 for c in value):
            raise ValueError("every C must be > 0")
        return value


class TaskConfig(Strict):
    """A prediction task: its name and the manifest column it predicts."""

    name: Literal["ihc_score", "her2_status"]
    target: Literal["ihc_score", "her2_status"]


class IntensityStudyParams(Strict):
    """The intensity study (``parameters_intensity.yml``): the one place its models and tasks are
    declared; the intensity pipeline builds one namespace per model and task from it."""

    seed: int = 0
    tasks: dict[str, TaskConfig] = Field(min_length=1)
    models: dict[str, IntensityModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _keys_are_names(self) -> IntensityStudyParams:
        check_keys_are_names(tasks=self.tasks, models=self.models)
        return self
