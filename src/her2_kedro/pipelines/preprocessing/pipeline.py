"""Preprocessing pipeline: accepted cores → (stain normalisation) → tile index and intensity features."""

from kedro.pipeline import Node, Pipeline

from her2_kedro.pipelines.preprocessing import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """One pass over the cores (each decoded once), then the before/after figure of normalised ones."""
    return Pipeline(
        [
            Node(
                nodes.preprocess_cores,
                inputs=[
                    "core_manifest",
                    "accepted_cores",
                    "params:preprocessing",
                    "params:tiles",
                    "params:cohorts",
                ],
                outputs=[
                    "tile_index",
                    "intensity_features",
                    "intensity_plus_features",
                    "preprocessing_problems",
                    "reference_stains",
                    "stain_normalisation_pairs",
                ],
                name="tile_and_measure_cores",
            ),
            Node(
                nodes.normalisation_preview,
                inputs=["stain_normalisation_pairs", "params:cohorts"],
                outputs="stain_normalisation_figures",
                name="stain_normalisation_preview",
            ),
        ],
        tags=["preprocessing"],
    )
