"""Parameters of the study report (``parameters_reporting.yml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from her2_kedro.config.base import Strict

Task = Literal["ihc_score", "her2_status"]


class BootstrapConfig(Strict):
    """Patient-level bootstrap of balanced accuracy (percentile interval)."""

    n_resamples: int = Field(1000, ge=1)
    level: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 0


class HeatmapConfig(Strict):
    """Fig. 3 panels: whose attention, on which split, how many cores and disagreeing tiles."""

    model: str = "mil"
    fallback_models: list[str] = ["mil_cached", "clam_sb", "dsmil"]
    split: str = "test"
    max_cores: int | None = Field(12, ge=1)
    disagreeing_tiles: int = Field(4, ge=0, le=12)


class TsneConfig(Strict):
    """Fig. 2: t-SNE of a random subset of one split's tile embeddings."""

    split: str = "test"
    max_tiles: int = Field(2000, ge=3)
    perplexity: float = Field(30.0, gt=0.0)
    seed: int = 0


#: The paper's published balanced accuracies (Pisula et al. 2023, Table 1 and text), by its model
#: names: the in-house test set, and the external centre after Macenko normalisation (MIL status
#: only). The paper gives no number for ResNet's status ("almost identical" to MIL's).
PAPER_TABLE1: dict[str, dict[str, dict[str, float]]] = {
    "MIL": {"ihc_score": {"test": 0.8249}, "her2_status": {"test": 0.9429, "external": 0.8688}},
    "ResNet34": {"ihc_score": {"test": 0.8536}},
    "intensity": {"ihc_score": {"test": 0.6876}, "her2_status": {"test": 0.8457}},
    "CLAM": {"ihc_score": {"test": 0.7166}, "her2_status": {"test": 0.8997}},
}
#: Our models -> the paper's model each reproduces.
PAPER_MODELS = {
    "mil": "MIL",
    "mil_cached": "MIL",
    "resnet34": "ResNet34",
    "intensity": "intensity",
    "clam_sb": "CLAM",
    "clam_mb": "CLAM",
}


class ReportingParams(Strict):
    """The report (``parameters_reporting.yml``): splits, intervals, figures and the paper's
    published figures, by the paper's model names, with the map from ours to theirs."""

    title: str = "HER2 IHC study report"
    splits: list[str] = Field(["test", "external", "external_unnormalised"], min_length=1)
    external_unnormalised: bool = True
    bootstrap: BootstrapConfig = BootstrapConfig()
    heatmaps: HeatmapConfig = HeatmapConfig()
    tsne: TsneConfig = TsneConfig()
    max_qc_rows: int = Field(200, ge=0)
    paper: dict[str, dict[Task, dict[str, float]]] = PAPER_TABLE1
    paper_models: dict[str, str] = PAPER_MODELS
