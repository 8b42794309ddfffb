"""Parameters of ingestion (``parameters_ingestion.yml``): image checks, dearraying, splits."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from her2_kedro.config.base import Strict


class ImageChecks(Strict):
    """Decode-verification and blank-core rules applied to every incoming core image."""

    max_pixels: int = Field(100_000_000, ge=1)
    min_side: int = Field(224, ge=1)


class DearrayConfig(Strict):
    """Grid fitting on whole TMA slides."""

    row_labels: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    column_labels: list[str] | None = None
    n_rows: int | None = Field(None, ge=1)
    n_cols: int | None = Field(None, ge=1)
    core_diameter_px: float | None = Field(None, gt=0)
    thumbnail_max_side: int = Field(2048, ge=256)
    min_area_fraction: float = Field(0.35, gt=0, le=1)
    max_offgrid: float = Field(0.35, gt=0, le=0.5)
    margin: float = Field(0.05, ge=0, le=0.5)
    jpeg_quality: int = Field(95, ge=50, le=100)
    #: Largest plain (JPEG/PNG, not tiled) slide decoded whole: 350 M pixels (about 18700 px
    #: square) at ~5 bytes a pixel keeps a slide under 2 GB; tiled TIFFs stream and need no limit.
    max_slide_pixels: int = Field(350_000_000, ge=1)


class SplitConfig(Strict):
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


class IngestionParams(Strict):
    """Everything the ingestion pipeline reads from ``parameters_ingestion.yml``."""

    image_checks: ImageChecks = ImageChecks()
    dearray: DearrayConfig = DearrayConfig()
    splits: SplitConfig = SplitConfig()
