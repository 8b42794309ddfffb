"""Typed parameters: every ``conf/*/parameters_*.yml`` section is validated here when Kedro starts.

A typo or a wrong type in a parameter file stops the run before any work, with a message naming the
section and the key, instead of failing deep inside a node.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from her2_kedro.synthetic.cohort import BALANCED_PRIORS, CLASSES, PAPER_PRIORS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArtefactRates(_Strict):
    """Probability that a synthetic core carries each preparation artefact."""

    tear: float = Field(0.1, ge=0, le=1)
    fold: float = Field(0.1, ge=0, le=1)
    partial: float = Field(0.1, ge=0, le=1)
    blur: float = Field(0.1, ge=0, le=1)


class SyntheticSlides(_Strict):
    """Whole TMA slides of the synthetic cohort (cores on a labelled grid)."""

    n_slides: int = Field(1, ge=0)
    n_rows: int = Field(4, ge=1, le=26)
    n_cols: int = Field(6, ge=1)
    core_diameter_px: int = Field(640, ge=64)
    pitch_px: int = Field(760, ge=64)
    rotation_deg: float = Field(2.0, ge=-20, le=20)
    jitter_px: float = Field(12.0, ge=0)
    n_missing: int = Field(2, ge=0)
    n_debris: int = Field(6, ge=0)

    @model_validator(mode="after")
    def _pitch_fits(self) -> SyntheticSlides:
        if self.pitch_px < self.core_diameter_px:
            raise ValueError("pitch_px must be at least core_diameter_px (cores would overlap)")
        return self


class SyntheticParams(_Strict):
    """The fabricated cohort: patients, labels, optics and artefacts."""

    seed: int = 7
    n_patients: int = Field(60, ge=1)
    cores_per_patient: tuple[int, int] = (1, 2)
    class_priors: Literal["balanced", "paper"] | dict[str, float] = "balanced"
    external_fraction: float = Field(0.0, ge=0, le=1)
    status_cue_strength: float = Field(0.9, ge=0.5, le=1)
    core_size: int = Field(672, ge=224)
    cell_diameter_px: float = Field(24.0, gt=2)
    artefact_rates: ArtefactRates = ArtefactRates()
    slides: SyntheticSlides = SyntheticSlides()

    @field_validator("cores_per_patient", mode="before")
    @classmethod
    def _range(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) else value

    @field_validator("class_priors")
    @classmethod
    def _known_classes(cls, value: Any) -> Any:
        if isinstance(value, dict):
            unknown = set(value) - set(CLASSES)
            if unknown:
                raise ValueError(f"unknown classes {sorted(unknown)}; use {list(CLASSES)}")
            if sum(value.values()) <= 0 or min(value.values()) < 0:
                raise ValueError("class priors must be non-negative and not all zero")
        return value

    def priors(self) -> dict[str, float]:
        """Class priors as a mapping over the five classes 0, 1, 2-, 2+, 3."""
        if self.class_priors == "balanced":
            return dict(BALANCED_PRIORS)
        if self.class_priors == "paper":
            return dict(PAPER_PRIORS)
        return {c: float(self.class_priors.get(c, 0.0)) for c in CLASSES}


class ImageChecks(_Strict):
    """Decode-verification and blank-core rules applied to every incoming core image."""

    max_pixels: int = Field(100_000_000, ge=1)
    min_side: int = Field(224, ge=1)
    tile_size: int = Field(224, ge=1)
    background_grey: float = Field(220.0, ge=0, le=255)
    min_tile_tissue: float = Field(0.05, ge=0, le=1)


class DearrayConfig(_Strict):
    """Grid fitting on whole TMA slides."""

    row_labels: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    column_labels: list[str] | None = None
    n_rows: int | None = Field(None, ge=1)
    n_cols: int | None = Field(None, ge=1)
    core_diameter_px: float | None = Field(None, gt=0)
    thumbnail_max_side: int = Field(2048, ge=256)
    background_grey: float = Field(220.0, ge=0, le=255)
    min_area_fraction: float = Field(0.35, gt=0, le=1)
    max_offgrid: float = Field(0.35, gt=0, le=0.5)
    margin: float = Field(0.05, ge=0, le=0.5)
    jpeg_quality: int = Field(95, ge=50, le=100)
    max_slide_pixels: int = Field(20_000_000_000, ge=1)


class SplitConfig(_Strict):
    """Patient-level train/validation/test split, stratified by the five classes."""

    fractions: dict[Literal["train", "val", "test"], float] = {
        "train": 0.7,
        "val": 0.15,
        "test": 0.15,
    }
    seed: int = 42

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, value: dict[str, float]) -> dict[str, float]:
        if any(v < 0 for v in value.values()) or abs(sum(value.values()) - 1) > 1e-6:
            raise ValueError(f"split fractions must be non-negative and sum to 1, got {value}")
        return value


class IngestionParams(_Strict):
    """Everything the ingestion pipeline reads from ``parameters_ingestion.yml``."""

    image_checks: ImageChecks = ImageChecks()
    dearray: DearrayConfig = DearrayConfig()
    splits: SplitConfig = SplitConfig()


class TileConfig(_Strict):
    """The paper's tile rule (authors' code: 224 px, stride 224 from (0, 0), >5 % tissue)."""

    tile_size: int = Field(224, ge=16)
    stride: int = Field(224, ge=1)
    background_grey: float = Field(220.0, ge=0, le=255)
    min_tissue: float = Field(0.05, ge=0, lt=1)


class ThresholdConfig(_Strict):
    """DAB positivity thresholds for intensity+, in rgb2hed DAB units (decimal OD / 6)."""

    weak: float = Field(0.2 / 6, gt=0)
    moderate: float = Field(0.4 / 6, gt=0)
    strong: float = Field(0.6 / 6, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdConfig:
        if not self.weak < self.moderate < self.strong:
            raise ValueError("thresholds must satisfy weak < moderate < strong")
        return self


class StainNormalisationConfig(_Strict):
    """Macenko reference from training tiles, applied to the cohorts listed in normalise_cohorts."""

    normalise_cohorts: list[str] = ["external"]
    reference_splits: list[Literal["train", "val", "test"]] = ["train"]
    max_reference_cores: int = Field(40, ge=1)
    tiles_per_core: int = Field(8, ge=1)
    preview_tiles: int = Field(6, ge=0)
    seed: int = 0


class PreprocessingParams(_Strict):
    """Everything the preprocessing pipeline reads from ``parameters_preprocessing.yml``."""

    stain_matrix: Literal["skimage_hed", "histomicstk_hdab", "histomicstk_hed"] = "skimage_hed"
    tiles: TileConfig = TileConfig()
    intensity_thresholds: ThresholdConfig = ThresholdConfig()
    stain_normalisation: StainNormalisationConfig = StainNormalisationConfig()


class IntensityModelConfig(_Strict):
    """One intensity model: its feature set and the C values tried on the validation split."""

    name: str
    features: list[str] = Field(min_length=1)
    standardize: bool = True
    c_grid: list[float] = Field([0.01, 0.1, 1.0, 10.0, 100.0], min_length=1)

    @field_validator("c_grid")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(c <= 0 for c in value):
            raise ValueError("every C must be > 0")
        return value


class TaskConfig(_Strict):
    """A prediction task: its name and the manifest column it predicts."""

    name: Literal["ihc_score", "her2_status"]
    target: Literal["ihc_score", "her2_status"]


class IntensityStudyParams(_Strict):
    """The intensity study (``parameters_intensity.yml``): models, tasks, evaluation-only cohorts."""

    seed: int = 0
    evaluation_only_cohorts: list[str] = ["external"]
    tasks: dict[str, TaskConfig]
    models: dict[str, IntensityModelConfig]

    @model_validator(mode="after")
    def _keys_are_names(self) -> IntensityStudyParams:
        for kind, entries in (("tasks", self.tasks), ("models", self.models)):
            for key, entry in entries.items():
                if key != entry.name:
                    raise ValueError(f"{kind}.{key}.name must be {key!r} (got {entry.name!r})")
        return self


SECTIONS: dict[str, type[BaseModel]] = {
    "synthetic": SyntheticParams,
    "ingestion": IngestionParams,
    "preprocessing": PreprocessingParams,
    "intensity_study": IntensityStudyParams,
}


class ParameterError(ValueError):
    """A parameter file holds a value the project cannot use."""


def validate_parameters(params: dict[str, Any]) -> dict[str, BaseModel]:
    """Validate every known section; raise ``ParameterError`` listing each bad key."""
    validated: dict[str, BaseModel] = {}
    errors: list[str] = []
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
