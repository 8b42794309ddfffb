"""The staining-intensity study: logistic regressions on intensity features, per task and feature set."""

from her2_kedro.pipelines.intensity.pipeline import create_pipeline

__all__ = ["create_pipeline"]
