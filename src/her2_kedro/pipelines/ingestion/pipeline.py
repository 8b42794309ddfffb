"""Ingestion pipeline: two raw sources → one QC report, one manifest, one folder of accepted cores."""

from kedro.pipeline import Node, Pipeline

from her2_kedro.pipelines.ingestion import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Cores folder and whole slides are ingested side by side, then merged and split by patient."""
    return Pipeline(
        [
            Node(
                nodes.ingest_core_folder,
                inputs=[
                    "raw_core_files",
                    "raw_labels",
                    "params:ingestion.image_checks",
                    "params:tiles",
                ],
                outputs=["folder_records", "folder_problems", "folder_payloads"],
                name="ingest_core_folder",
            ),
            Node(
                nodes.ingest_slides,
                inputs=[
                    "raw_slide_files",
                    "raw_slide_map",
                    "params:ingestion.dearray",
                    "params:ingestion.image_checks",
                    "params:tiles",
                ],
                outputs=["slide_records", "slide_problems", "slide_payloads"],
                name="dearray_slides",
            ),
            Node(
                nodes.build_manifest,
                inputs=[
                    "folder_records",
                    "slide_records",
                    "params:ingestion.splits",
                    "params:cohorts",
                ],
                outputs=["core_manifest", "manifest_problems", "accepted_notes"],
                name="build_manifest",
            ),
            Node(
                nodes.build_qc_report,
                inputs=[
                    "core_manifest",
                    "folder_problems",
                    "slide_problems",
                    "manifest_problems",
                    "accepted_notes",
                ],
                outputs=["qc_report", "qc_report_history"],
                name="build_qc_report",
            ),
            Node(
                nodes.collect_accepted_cores,
                inputs=["core_manifest", "qc_report", "folder_payloads", "slide_payloads"],
                outputs="accepted_cores",
                name="write_accepted_cores",
            ),
        ],
        tags=["ingestion"],
    )
