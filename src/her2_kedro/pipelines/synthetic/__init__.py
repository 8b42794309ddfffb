"""Synthetic cohort: a labelled HER2 IHC TMA cohort (cores and whole slides) written to data/01_raw."""

from her2_kedro.pipelines.synthetic.pipeline import create_pipeline

__all__ = ["create_pipeline"]
