"""The study report: the paper's tables and figures, heatmaps, t-SNE and one HTML page."""

from her2_kedro.pipelines.reporting.pipeline import create_pipeline

__all__ = ["create_pipeline"]
