"""Quality control: decode-verify core images, validate label tables, and report every problem."""

from her2_kedro.qc.images import (
    CheckedImage,
    ImageCheckParams,
    check_image,
    content_hash,
    has_tissue_tile,
)
from her2_kedro.qc.labels import (
    FIVE_CLASSES,
    SPLITS,
    five_class,
    normalise_core_label,
    safe_relative_path,
    slide_stem,
    validate_labels,
    validate_slide_map,
)
from her2_kedro.qc.report import (
    ACCEPTED,
    QC_COLUMNS,
    REJECTED,
    QCProblem,
    accepted_reason,
    qc_table,
)

__all__ = [
    "ACCEPTED",
    "FIVE_CLASSES",
    "QC_COLUMNS",
    "REJECTED",
    "SPLITS",
    "CheckedImage",
    "ImageCheckParams",
    "QCProblem",
    "accepted_reason",
    "check_image",
    "content_hash",
    "five_class",
    "has_tissue_tile",
    "normalise_core_label",
    "qc_table",
    "safe_relative_path",
    "slide_stem",
    "validate_labels",
    "validate_slide_map",
]
