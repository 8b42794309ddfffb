"""Parameters of preprocessing (``parameters_preprocessing.yml``): tiles, stains, thresholds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from her2_kedro.config.base import Strict


class ThresholdConfig(Strict):
    """DAB positivity thresholds for intensity+, in rgb2hed DAB units (decimal OD / 6)."""

    weak: float = Field(0.2 / 6, gt=0)
    moderate: float = Field(0.4 / 6, gt=0)
    strong: float = Field(0.1, gt=0)  # OD 0.6

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdConfig:
        if not self.weak < self.moderate < self.strong:
            raise ValueError("thresholds must satisfy weak < moderate < strong")
        return self


class StainNormalisationConfig(Strict):
    """Macenko reference from training tiles, applied to the ``cohorts.stain_normalised`` cohorts.

    Nothing here runs unless the manifest holds a core of a normalised cohort. ``dab_scaling``:
    ``none`` keeps each core's DAB amount (it is the HER2 signal); ``cohort`` multiplies the DAB
    amount of every core of a normalised cohort by one factor, the reference's pooled DAB 99th
    percentile over the cohort's (both from the sampled tiles), which corrects a centre's weaker or
    stronger chromogen while keeping the order of its cores. It assumes the cohort's score mix is
    not far from the training cores'; a factor beyond ``max_dab_scale`` (or below its inverse)
    says it is not, and is limited to that bound with a warning. Per-image DAB matching is never
    done: it would make a faint 1+ core look 3+.
    """

    reference_splits: list[Literal["train", "val", "test"]] = ["train"]
    max_reference_cores: int = Field(40, ge=1)
    tiles_per_core: int = Field(8, ge=1)
    preview_tiles: int = Field(6, ge=0)
    dab_scaling: Literal["none", "cohort"] = "none"
    max_dab_scale: float = Field(2.0, ge=1.0)
    seed: int = 0


class PreprocessingParams(Strict):
    """Everything the preprocessing pipeline reads from ``parameters_preprocessing.yml``."""

    stain_matrix: Literal["skimage_hed", "histomicstk_hdab", "histomicstk_hed"] = "skimage_hed"
    workers: int = Field(2, ge=1)
    intensity_thresholds: ThresholdConfig = ThresholdConfig()
    stain_normalisation: StainNormalisationConfig = StainNormalisationConfig()
