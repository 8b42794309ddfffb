"""The project's pipelines, by the names users pass to ``kedro run --pipeline(s)=NAME``."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from her2_kedro.config import TORCH_STUDIES
from her2_kedro.pipelines import (
    features,
    ingestion,
    intensity,
    models,
    predict,
    preprocessing,
    reporting,
    synthetic,
)


def register_pipelines() -> dict[str, Pipeline]:
    """``synthetic`` writes the demo cohort; every other pipeline runs on data/01_raw end to end.

    ``intensity`` is the staining-intensity study, ``features`` the trained encoder and embedding
    cache, ``mil`` / ``resnet`` / ``clam`` the CNN studies (each from raw images to metrics; Kedro
    skips nothing by itself, ``--only-missing-outputs`` reuses finished outputs), ``all`` every
    study at once, and ``__default__`` (plain ``kedro run``) the paper's main study, ``mil``.
    """
    upstream = ingestion.create_pipeline() + preprocessing.create_pipeline()
    features_pipeline = features.create_pipeline()
    pipelines = {
        "synthetic": synthetic.create_pipeline(),
        "ingestion": ingestion.create_pipeline(),
        "preprocessing": preprocessing.create_pipeline(),
        "intensity": upstream + intensity.create_pipeline(),
        "features": upstream + features_pipeline,
        # reads the finished studies' outputs from disk: run after them (`make run` does)
        "reporting": reporting.create_pipeline(),
        # scores the inbox, then renews the report with its section (fed this run's calls)
        "predict": predict.create_pipeline()
        + Pipeline(
            reporting.create_pipeline(), inputs={"inbox_predictions": "scored_inbox_predictions"}
        ),
    }
    everything = pipelines["intensity"]
    for family in TORCH_STUDIES:
        study = models.declared_torch_study(family)
        family_pipeline = models.create_pipeline(family, study)
        needs_features = study is not None and any(
            m.needs_trained_encoder for m in study.models.values()
        )
        pipelines[family] = upstream + (features_pipeline if needs_features else Pipeline([]))
        pipelines[family] += family_pipeline
        everything += pipelines[family]
    pipelines["all"] = everything
    pipelines["__default__"] = pipelines["mil"]
    return pipelines
