"""Parameters of the synthetic cohort (``parameters_synthetic.yml``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from her2_kedro.config.base import Strict
from her2_kedro.schema import FIVE_CLASSES, PAPER_CLASS_COUNTS


class ArtefactRates(Strict):
    """Probability that a synthetic core carries each preparation artefact."""

    tear: float = Field(0.1, ge=0, le=1)
    fold: float = Field(0.1, ge=0, le=1)
    partial: float = Field(0.1, ge=0, le=1)
    blur: float = Field(0.1, ge=0, le=1)


class SyntheticSlides(Strict):
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


class SyntheticParams(Strict):
    """The fabricated cohort: patients, labels, optics and artefacts."""

    seed: int = 7
    n_patients: int = Field(60, ge=1)
    cores_per_patient: tuple[int, int] = (1, 2)
    class_priors: Literal["balanced", "paper"] | dict[str, float] = "balanced"
    external_fraction: float = Field(0.15, ge=0, le=1)
    status_cue_strength: float = Field(0.9, ge=0.5, le=1)
    core_size: int = Field(672, ge=224)
    cell_diameter_px: float = Field(60.0, gt=2)
    # Per-core nuisances, independent of every label (the renderer's defaults in
    # synthetic.staining; a test keeps them equal): they make max-mean-DAB overlap between scores.
    dab_gain_sd: float = Field(0.3, ge=0)  # log-sd of the staining-run DAB gain (median 1)
    tumour_fraction_range: tuple[float, float] = (0.3, 0.95)  # tumour share of the tissue, uniform
    focal_rate: float = Field(0.3, ge=0, le=1)  # P(stained cells clustered in a patch)
    artefact_rates: ArtefactRates = ArtefactRates()
    slides: SyntheticSlides = SyntheticSlides()

    @field_validator("cores_per_patient", mode="before")
    @classmethod
    def _range(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) else value

    @field_validator("tumour_fraction_range")
    @classmethod
    def _fraction_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] <= value[1] <= 1.0:
            raise ValueError(f"need 0 <= min <= max <= 1, got {list(value)}")
        return value

    @field_validator("class_priors")
    @classmethod
    def _known_classes(cls, value: Any) -> Any:
        if isinstance(value, dict):
            unknown = set(value) - set(FIVE_CLASSES)
            if unknown:
                raise ValueError(f"unknown classes {sorted(unknown)}; use {list(FIVE_CLASSES)}")
            if sum(value.values()) <= 0 or min(value.values()) < 0:
                raise ValueError("class priors must be non-negative and not all zero")
        return value

    def priors(self) -> dict[str, float]:
        """Class priors as a mapping over the five classes 0, 1, 2-, 2+, 3."""
        if self.class_priors == "balanced":
            return dict.fromkeys(FIVE_CLASSES, 1.0)
        if self.class_priors == "paper":
            return dict(PAPER_CLASS_COUNTS)
        return {c: float(self.class_priors.get(c, 0.0)) for c in FIVE_CLASSES}
