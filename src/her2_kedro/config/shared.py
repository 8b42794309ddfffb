"""Parameters shared by every stage (``parameters_tiles.yml``, ``parameters_cohorts.yml``)."""

from __future__ import annotations

from pydantic import Field

from her2_kedro.config.base import Strict


class TileConfig(Strict):
    """The paper's tile rule (authors' code: 224 px, stride 224 from (0, 0), >5 % tissue)."""

    tile_size: int = Field(224, ge=16)
    stride: int = Field(224, ge=1)
    background_grey: float = Field(220.0, ge=0, le=255)
    min_tissue: float = Field(0.05, ge=0, lt=1)


class CohortsConfig(Strict):
    """Which cohorts only ever evaluate, and which are stain-normalised to the training reference."""

    evaluation_only: list[str] = ["external"]
    stain_normalised: list[str] = ["external"]
