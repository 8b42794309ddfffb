"""Predict pipeline: inbox images → QC → stain normalisation → trained models → calls, heatmaps."""

from kedro.pipeline import Node, Pipeline

from her2_kedro.pipelines.predict import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """One node: every inbox core is checked, prepared and scored, one at a time."""
    return Pipeline(
        [
            Node(
                nodes.score_inbox,
                inputs=[
                    "inbox_files",
                    "trained_models",
                    "reference_stains",
                    "inbox_predictions",
                    "params:ingestion.image_checks",
                    "params:tiles",
                    "params:preprocessing",
                    "params:predict",
                ],
                outputs=[
                    "scored_inbox_predictions",
                    "inbox_qc_report",
                    "inbox_heatmaps",
                ],
                name="score_inbox",
            ),
        ],
        tags=["predict"],
    )
