"""The CNN studies (``mil``, ``resnet``, ``clam``): one namespace per declared model and task."""

from her2_kedro.pipelines.models.pipeline import create_pipeline, declared_torch_study

__all__ = ["create_pipeline", "declared_torch_study"]
