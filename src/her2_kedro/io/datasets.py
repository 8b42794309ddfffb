"""The dataset classes under their former single-module path.

They live in ``raw_inputs`` (raw folders and label tables), ``synthetic_cohort`` (the demo
cohort writer) and ``outputs`` (files the pipelines write). This module re-exports them so that a
catalog written against ``her2_kedro.io.datasets.<Class>`` (a user's ``conf/local``, for one)
keeps loading; the project's own catalogs name the defining modules.
"""

from her2_kedro.io.outputs import BytesDataset, FiguresDataset, OptionalCSVDataset
from her2_kedro.io.raw_inputs import (
    DELIMITERS,
    FileListingDataset,
    LabelTable,
    LabelTableDataset,
    sniff_delimiter,
)
from her2_kedro.io.synthetic_cohort import (
    MARKER,
    SyntheticCohort,
    SyntheticCohortDataset,
    file_sha256,
)

__all__ = [
    "DELIMITERS",
    "MARKER",
    "BytesDataset",
    "FiguresDataset",
    "FileListingDataset",
    "LabelTable",
    "LabelTableDataset",
    "OptionalCSVDataset",
    "SyntheticCohort",
    "SyntheticCohortDataset",
    "file_sha256",
    "sniff_delimiter",
]
