"""Parameters of ``predict`` (``parameters_predict.yml``): which trained models score the inbox."""

from __future__ import annotations

from pydantic import Field

from her2_kedro.config.base import Strict


class PredictParams(Strict):
    """The models called on new cores, how their pixels are prepared, and what is drawn."""

    model: str = "mil"
    intensity_model: str | None = "intensity"
    stain_normalise: bool = True
    registry_alias: str | None = "champion"
    heatmaps: bool = True
    disagreeing_tiles: int = Field(4, ge=0, le=12)
    device: str = "auto"
