"""The project's pipelines, by the names users pass to ``kedro run --pipelines=NAME``."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from her2_kedro.pipelines import ingestion, intensity, preprocessing, synthetic


def register_pipelines() -> dict[str, Pipeline]:
    """``synthetic`` writes the demo cohort; the others run on whatever is in data/01_raw.

    ``intensity`` is the complete staining-intensity study from raw images to metrics, and
    ``__default__`` (plain ``kedro run``) is the same study.
    """
    pipelines = {
        "synthetic": synthetic.create_pipeline(),
        "ingestion": ingestion.create_pipeline(),
        "preprocessing": preprocessing.create_pipeline(),
    }
    pipelines["intensity"] = (
        pipelines["ingestion"] + pipelines["preprocessing"] + intensity.create_pipeline()
    )
    pipelines["__default__"] = pipelines["intensity"]
    return pipelines
