"""The project's pipelines, by the names users pass to ``kedro run --pipelines=NAME``."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from her2_kedro.pipelines import ingestion, synthetic


def register_pipelines() -> dict[str, Pipeline]:
    """``synthetic`` writes the demo cohort; ``__default__`` is the study on whatever is in data/01_raw."""
    pipelines = {
        "synthetic": synthetic.create_pipeline(),
        "ingestion": ingestion.create_pipeline(),
    }
    pipelines["__default__"] = pipelines["ingestion"]
    return pipelines
