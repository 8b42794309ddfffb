"""Synthetic pipeline: a fabricated, labelled HER2 IHC TMA cohort written into data/01_raw."""

from kedro.pipeline import Node, Pipeline

from her2_kedro.pipelines.synthetic import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Sample labels first, then render pixels lazily while the guarded dataset writes them."""
    return Pipeline(
        [
            Node(
                nodes.sample_core_table,
                inputs="params:synthetic",
                outputs="synthetic_core_table",
                name="sample_synthetic_cores",
            ),
            Node(
                nodes.plan_slides,
                inputs="params:synthetic",
                outputs="synthetic_slide_plan",
                name="plan_synthetic_slides",
            ),
            Node(
                nodes.render_synthetic_cohort,
                inputs=["synthetic_core_table", "synthetic_slide_plan", "params:synthetic"],
                outputs="synthetic_cohort",
                name="render_synthetic_cohort",
            ),
        ],
        tags=["synthetic"],
    )
