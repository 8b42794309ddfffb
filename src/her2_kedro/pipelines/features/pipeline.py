"""Features pipeline: accepted cores + tile index → trained, frozen encoder → embedding cache."""

from kedro.pipeline import Node, Pipeline

from her2_kedro.pipelines.features import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Train (or take) the encoder, then embed every core not yet in the cache."""
    return Pipeline(
        [
            Node(
                nodes.train_encoder,
                inputs=[
                    "core_manifest",
                    "tile_index",
                    "accepted_cores",
                    "reference_stains",
                    "params:encoder",
                    "params:tiles",
                    "params:cohorts",
                    "encoder_workdir",
                ],
                outputs=["encoder_checkpoint", "encoder_history"],
                name="train_encoder",
            ),
            Node(
                nodes.embed_cores,
                inputs=[
                    "core_manifest",
                    "tile_index",
                    "accepted_cores",
                    "reference_stains",
                    "encoder_checkpoint",
                    "embedding_cache",
                    "params:encoder",
                    "params:tiles",
                    "params:cohorts",
                ],
                outputs=["tile_embeddings", "embedding_index"],
                name="embed_cores",
            ),
        ],
        tags=["features"],
    )
