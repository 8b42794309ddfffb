"""Ingestion: raw cores and whole TMA slides → QC'd, labelled, split core images and a manifest."""

from her2_kedro.pipelines.ingestion.pipeline import create_pipeline

__all__ = ["create_pipeline"]
