"""Names shared by every stage: label classes, splits, cohorts and the columns of the data contract.

One definition each, so that ingestion, preprocessing, the models and the reports agree on what a
class, a split or a column is called (README, "Data contract").
"""

from __future__ import annotations

from dataclasses import dataclass

#: The paper's five label classes: IHC score, with score 2 split by its ISH-derived HER2 status.
FIVE_CLASSES: tuple[str, ...] = ("0", "1", "2-", "2+", "3")
#: IHC score and HER2 status of each of the five classes.
SCORE_OF_CLASS: dict[str, int] = {"0": 0, "1": 1, "2-": 2, "2+": 2, "3": 3}
STATUS_OF_CLASS: dict[str, int] = {"0": 0, "1": 0, "2-": 0, "2+": 1, "3": 1}
#: Class counts of the paper's full training list (1281 cores), the "paper" class priors.
PAPER_CLASS_COUNTS: dict[str, float] = {"0": 1094, "1": 34, "2-": 14, "2+": 46, "3": 93}

#: Patient-level splits a label table may name; evaluation-only cohorts get EXTERNAL_SPLIT.
SPLITS: tuple[str, ...] = ("train", "val", "test")
EXTERNAL_SPLIT = "external"
DEFAULT_COHORT = "internal"

#: data/02_intermediate/core_manifest.parquet
MANIFEST_COLUMNS: list[str] = [
    "core_id",
    "source",
    "filename",
    "patient_id",
    "ihc_score",
    "her2_status",
    "five_class",
    "split",
    "cohort",
    "width",
    "height",
    "content_hash",
    "image",
]
#: data/04_feature/tile_index.parquet
TILE_COLUMNS: list[str] = ["core_id", "x", "y", "tissue_fraction"]
#: data/08_reporting/metrics.csv: the key columns, then the metrics
METRIC_NAMES: list[str] = [
    "n",
    "balanced_accuracy",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "auroc",
]
METRIC_KEY_COLUMNS: list[str] = ["model", "task", "split"]
#: Where a metrics / predictions row came from: the MLflow run id and the core_manifest version
PROVENANCE_COLUMNS: list[str] = ["run_id", "manifest_version"]
METRIC_COLUMNS: list[str] = [*METRIC_KEY_COLUMNS, *METRIC_NAMES, *PROVENANCE_COLUMNS]

#: data/02_intermediate/qc_report.csv
QC_COLUMNS: list[str] = ["source", "core_id", "status", "reason"]
ACCEPTED = "accepted"
REJECTED = "rejected"


@dataclass(frozen=True)
class QCProblem:
    """One rejected input: where it came from, which file/core it concerns, and why.

    `source` names the input ("cores", "labels.csv", "slides/slide1.tif", "slide_map.csv"),
    `core_id` the file name or core id concerned ("" when none), `reason` the problem in words.
    """

    source: str
    core_id: str
    reason: str
