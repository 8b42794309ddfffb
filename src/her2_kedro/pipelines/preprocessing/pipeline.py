"""Preprocessing pipeline: accepted cores → reference stains → tile index and intensity features."""

from kedro.pipeline import Node, Pipeline

from her2_kedro.pipelines.preprocessing import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Reference stains first (from training tiles), then one pass per core for tiles and features."""
    return Pipeline(
        [
            Node(
                nodes.estimate_reference_stains,
                inputs=[
                    "core_manifest",
                    "accepted_cores",
                    "params:preprocessing.stain_normalisation",
                    "params:tiles",
                    "params:cohorts",
                ],
                outputs="reference_stains",
                name="estimate_reference_stains",
            ),
            Node(
                nodes.compute_features,
                inputs=[
                    "core_manifest",
                    "accepted_cores",
                    "reference_stains",
                    "params:preprocessing.stain_matrix",
                    "params:preprocessing.intensity_thresholds",
                    "params:tiles",
                    "params:cohorts",
                ],
                outputs=[
                    "tile_index",
                    "intensity_features",
                    "intensity_plus_features",
                    "preprocessing_problems",
                ],
                name="tile_and_measure_cores",
            ),
            Node(
                nodes.normalisation_preview,
                inputs=[
                    "core_manifest",
                    "accepted_cores",
                    "reference_stains",
                    "params:preprocessing.stain_normalisation",
                    "params:tiles",
                    "params:cohorts",
                ],
                outputs="stain_normalisation_figures",
                name="stain_normalisation_preview",
            ),
        ],
        tags=["preprocessing"],
    )
