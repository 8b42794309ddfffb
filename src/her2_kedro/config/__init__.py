"""Typed parameters: every ``conf/*/parameters_*.yml`` section is validated when Kedro starts.

A typo or a wrong type in a parameter file, or an unknown section, stops the run before any work,
with a message naming the section and the key, instead of failing deep inside a node. The models
here are also the library's config objects: their defaults are the only defaults.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from her2_kedro.config.ingestion import DearrayConfig, ImageChecks, IngestionParams, SplitConfig
from her2_kedro.config.intensity import IntensityModelConfig, IntensityStudyParams, TaskConfig
from her2_kedro.config.mil import BagConfig, DistributedConfig, TrainingConfig
from her2_kedro.config.models import (
    TRAINED_ENCODER,
    EncoderConfig,
    ImageConfig,
    TorchModelConfig,
    TorchStudyParams,
)
from her2_kedro.config.predict import PredictParams
from her2_kedro.config.preprocessing import (
    PreprocessingParams,
    StainNormalisationConfig,
    ThresholdConfig,
)
from her2_kedro.config.reporting import ReportingParams
from her2_kedro.config.shared import CohortsConfig, TileConfig
from her2_kedro.config.synthetic import ArtefactRates, SyntheticParams, SyntheticSlides

__all__ = [
    "ArtefactRates",
    "BagConfig",
    "DistributedConfig",
    "CohortsConfig",
    "DearrayConfig",
    "EncoderConfig",
    "ImageConfig",
    "ImageChecks",
    "IngestionParams",
    "IntensityModelConfig",
    "IntensityStudyParams",
    "ParameterError",
    "PredictParams",
    "PreprocessingParams",
    "ReportingParams",
    "SECTIONS",
    "SplitConfig",
    "StainNormalisationConfig",
    "SyntheticParams",
    "SyntheticSlides",
    "TaskConfig",
    "ThresholdConfig",
    "TileConfig",
    "TORCH_STUDIES",
    "TorchModelConfig",
    "TorchStudyParams",
    "TrainingConfig",
    "TRAINED_ENCODER",
    "validate_parameters",
]

SECTIONS: dict[str, type[BaseModel]] = {
    "synthetic": SyntheticParams,
    "ingestion": IngestionParams,
    "preprocessing": PreprocessingParams,
    "intensity_study": IntensityStudyParams,
    "tiles": TileConfig,
    "cohorts": CohortsConfig,
    "encoder": EncoderConfig,
    "mil_study": TorchStudyParams,
    "resnet_study": TorchStudyParams,
    "clam_study": TorchStudyParams,
    "reporting": ReportingParams,
    "predict": PredictParams,
}
#: The torch studies, by the pipeline that runs them.
TORCH_STUDIES: dict[str, str] = {"mil": "mil_study", "resnet": "resnet_study", "clam": "clam_study"}


class ParameterError(ValueError):
    """A parameter file holds a value the project cannot use."""


def validate_parameters(params: dict[str, Any]) -> dict[str, BaseModel]:
    """Validate every section; raise ``ParameterError`` listing each bad key and unknown section."""
    validated: dict[str, BaseModel] = {}
    errors: list[str] = [
        f"  {name}: unknown parameter section (known: {', '.join(SECTIONS)})"
        for name in params
        if name not in SECTIONS
    ]
    for section, model in SECTIONS.items():
        if section not in params:
            continue
        try:
            validated[section] = model.model_validate(params[section])
        except ValidationError as err:
            for item in err.errors():
                where = ".".join(str(p) for p in (section, *item["loc"]))
                errors.append(f"  {where}: {item['msg']}")
    if errors:
        raise ParameterError("Invalid parameters in conf/:\n" + "\n".join(errors))
    return validated
