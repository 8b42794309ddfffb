"""The tile encoder (trained here on training cores, then frozen) and the per-core embedding cache."""

from her2_kedro.pipelines.features.pipeline import create_pipeline

__all__ = ["create_pipeline"]
