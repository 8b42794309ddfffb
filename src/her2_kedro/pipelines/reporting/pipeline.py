"""Reporting pipeline: predictions, attention and embeddings of the finished studies → the paper's
tables and figures → ``data/08_reporting/report.html``. It trains nothing: run a study first."""

from kedro.pipeline import Node, Pipeline

from her2_kedro.pipelines.reporting import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Tables, comparison figures, heatmap panels and t-SNE, then the page that holds them all."""
    return Pipeline(
        [
            Node(
                nodes.predictions_to_report,
                inputs="previous_predictions",
                outputs="report_predictions",
                name="predictions_to_report",
            ),
            Node(
                nodes.external_as_scanned,
                inputs=[
                    "report_predictions",
                    "core_manifest",
                    "accepted_cores",
                    "trained_models",
                    "previous_external_unnormalised_predictions",
                    "params:tiles",
                    "params:cohorts",
                    "params:preprocessing",
                    "params:reporting",
                ],
                outputs="external_unnormalised_predictions",
                name="external_as_scanned",
            ),
            Node(
                nodes.with_external_as_scanned,
                inputs=["report_predictions", "external_unnormalised_predictions"],
                outputs="table_predictions",
                name="with_external_as_scanned",
            ),
            Node(
                nodes.study_tables,
                inputs=["table_predictions", "core_manifest", "params:reporting"],
                outputs=["table1", "table2", "class_errors"],
                name="study_tables",
            ),
            Node(
                nodes.study_figures,
                inputs=["table_predictions", "params:reporting"],
                outputs="study_figures",
                name="study_figures",
            ),
            Node(
                nodes.heatmap_panels,
                inputs=[
                    "report_predictions",
                    "previous_attention",
                    "core_manifest",
                    "tile_index",
                    "accepted_cores",
                    "reference_stains",
                    "params:tiles",
                    "params:cohorts",
                    "params:reporting",
                ],
                outputs=["heatmap_panels", "disagreeing_tiles"],
                name="heatmap_panels",
            ),
            Node(
                nodes.embedding_figure,
                inputs=[
                    "previous_embedding_index",
                    "embedding_cache",
                    "core_manifest",
                    "params:reporting",
                ],
                outputs="embedding_figures",
                name="embedding_figure",
            ),
            Node(
                nodes.write_report,
                inputs=[
                    "table1",
                    "table2",
                    "class_errors",
                    "study_figures",
                    "heatmap_panels",
                    "embedding_figures",
                    "report_predictions",
                    "qc_report",
                    "inbox_predictions",
                    "inbox_qc_report",
                    "inbox_heatmaps",
                    "parameters",
                    "params:reporting",
                ],
                outputs="report_html",
                name="write_report",
            ),
        ],
        tags=["reporting"],
    )
