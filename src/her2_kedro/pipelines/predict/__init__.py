"""Scoring new, unlabelled cores from data/01_raw/inbox/ with the trained models."""

from her2_kedro.pipelines.predict.pipeline import create_pipeline

__all__ = ["create_pipeline"]
