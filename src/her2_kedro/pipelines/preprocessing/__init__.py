"""Preprocessing: reference stains, normalisation, tile index and intensity features."""

from her2_kedro.pipelines.preprocessing.pipeline import create_pipeline

__all__ = ["create_pipeline"]
