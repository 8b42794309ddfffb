"""Labelled synthetic cohorts: who is in the study (a table) and their core images (JPEG bytes).

Labels follow the paper's five training classes 0, 1, 2-, 2+, 3 (score 2 split by ISH status).
A patient's class is drawn from the priors and shared by all the patient's cores (multi-spot
TMA). The simulated HER2 status is 0 for classes 0, 1, 2- and 1 for 2+, 3.

Status cue (see ``staining`` for what it looks like): present with probability
``status_cue_strength`` for 2+ and 3 (amplified tumours) and ``1 - status_cue_strength`` for
2-, 0 and 1, drawn per patient, so within score 2 the cue predicts the ISH result with
accuracy ``status_cue_strength`` while intensity does not.

Per-core nuisances, drawn independently of every label and recorded in the table so each core can
be re-rendered exactly: ``dab_gain`` (staining run and section thickness scale the DAB of a core,
log-normal with median 1 and log-sd ``dab_gain_sd``), ``tumour_fraction`` (tumour share of the
core's tissue, uniform on ``tumour_fraction_range``) and ``focal`` (stained cells clustered in a
patch, with probability ``focal_rate``). They make the paper's max-mean-DAB descriptor overlap
between scores as on real cores, while the score itself stays defined by the staining pattern.
They are drawn from their own generator, so the other columns do not depend on them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd

from her2_kedro.imaging.pixels import encode_jpeg
from her2_kedro.schema import FIVE_CLASSES, PAPER_CLASS_COUNTS, SCORE_OF_CLASS, STATUS_OF_CLASS
from her2_kedro.synthetic.optics import EXTERNAL_STAINS, INTERNAL_STAINS
from her2_kedro.synthetic.render import CoreSpec, render_core
from her2_kedro.synthetic.staining import DAB_GAIN_SD, FOCAL_RATE, TUMOUR_FRACTION_RANGE

CLASSES = FIVE_CLASSES
BALANCED_PRIORS: dict[str, float] = {c: 1.0 for c in CLASSES}
PAPER_PRIORS = PAPER_CLASS_COUNTS
DEFAULT_ARTEFACT_RATES: dict[str, float] = {"tear": 0.1, "fold": 0.1, "partial": 0.1, "blur": 0.1}

_SCORE = SCORE_OF_CLASS
_STATUS = STATUS_OF_CLASS
COLUMNS: tuple[str, ...] = (
    "filename",
    "patient_id",
    "ihc-score",
    "her2-status",
    "cohort",
    "status_cue",
    "tear",
    "fold",
    "partial",
    "blur_sigma",
    "jpeg_quality",
    "dab_gain",
    "tumour_fraction",
    "focal",
)


def _normalised_priors(class_priors: Mapping[str, float]) -> np.ndarray:
    """Class probabilities in ``CLASSES`` order; unknown classes or a zero total are errors."""
    unknown = set(class_priors) - set(CLASSES)
    if unknown:
        raise ValueError(f"unknown classes in priors: {sorted(unknown)}; expected {CLASSES}")
    p = np.array([float(class_priors.get(c, 0.0)) for c in CLASSES])
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError("class priors must be non-negative with a positive total")
    return p / p.sum()


def _core_range(cores_per_patient: int | tuple[int, int]) -> tuple[int, int]:
    """(min, max) cores per patient from a count or an inclusive range; bad ranges are errors."""
    if isinstance(cores_per_patient, int):
        lo = hi = cores_per_patient
    else:
        lo, hi = (int(v) for v in cores_per_patient)
    if lo < 1 or hi < lo:
        raise ValueError(f"bad cores_per_patient: {cores_per_patient}")
    return lo, hi


def _check_rates(
    external_fraction: float,
    status_cue_strength: float,
    dab_gain_sd: float,
    tumour_fraction_range: tuple[float, float],
    focal_rate: float,
) -> None:
    """Reject probabilities outside [0, 1], a negative gain sd or a bad tumour-fraction range."""
    if not 0.0 <= external_fraction <= 1.0 or not 0.0 <= status_cue_strength <= 1.0:
        raise ValueError("external_fraction and status_cue_strength must lie in [0, 1]")
    tf_lo, tf_hi = (float(v) for v in tumour_fraction_range)
    if not dab_gain_sd >= 0 or not 0.0 <= tf_lo <= tf_hi <= 1.0 or not 0.0 <= focal_rate <= 1.0:
        raise ValueError(
            "need dab_gain_sd >= 0, 0 <= tumour_fraction_range[0] <= [1] <= 1 and focal_rate in [0, 1]"
        )


def sample_cohort(
    n_patients: int,
    cores_per_patient: int | tuple[int, int],
    class_priors: Mapping[str, float],
    seed: int,
    external_fraction: float = 0.0,
    status_cue_strength: float = 0.9,
    artefact_rates: Mapping[str, float] | None = None,
    dab_gain_sd: float = DAB_GAIN_SD,
    tumour_fraction_range: tuple[float, float] = TUMOUR_FRACTION_RANGE,
    focal_rate: float = FOCAL_RATE,
) -> pd.DataFrame:
    """Draw a labelled cohort table (one row per core) whose file names carry no label.

    ``cores_per_patient`` is a fixed count or an inclusive (min, max) range; a fraction
    ``external_fraction`` of patients comes from the external centre (other stains). Per core,
    ``dab_gain`` ~ exp(N(0, ``dab_gain_sd``)) (0 disables it), ``tumour_fraction`` ~
    U(``tumour_fraction_range``) and ``focal`` ~ Bernoulli(``focal_rate``), all independent of
    the labels (defaults: ``staining.DAB_GAIN_SD``, ``TUMOUR_FRACTION_RANGE``, ``FOCAL_RATE``).
    """
    if n_patients < 1:
        raise ValueError("n_patients must be >= 1")
    lo, hi = _core_range(cores_per_patient)
    _check_rates(
        external_fraction, status_cue_strength, dab_gain_sd, tumour_fraction_range, focal_rate
    )
    rates = {**DEFAULT_ARTEFACT_RATES, **{k: float(v) for k, v in (artefact_rates or {}).items()}}
    rng = np.random.default_rng(seed)
    classes = rng.choice(len(CLASSES), size=n_patients, p=_normalised_priors(class_priors))
    external = np.zeros(n_patients, dtype=bool)
    external[rng.permutation(n_patients)[: int(round(external_fraction * n_patients))]] = True
    n_cores = rng.integers(lo, hi + 1, size=n_patients)
    cue_u = rng.random(n_patients)
    patient_ids = rng.permutation(n_patients)  # ids unrelated to class order

    rows: list[dict[str, object]] = []
    for i in range(n_patients):
        cls = CLASSES[classes[i]]
        status = _STATUS[cls]
        cue = bool(cue_u[i] < (status_cue_strength if status == 1 else 1.0 - status_cue_strength))
        for _ in range(int(n_cores[i])):
            blur = bool(rng.random() < rates.get("blur", 0.0))
            rows.append(
                {
                    "patient_id": f"P{patient_ids[i]:05d}",
                    "ihc-score": _SCORE[cls],
                    "her2-status": status,
                    "cohort": "external" if external[i] else "internal",
                    "status_cue": cue,
                    "tear": bool(rng.random() < rates.get("tear", 0.0)),
                    "fold": bool(rng.random() < rates.get("fold", 0.0)),
                    "partial": bool(rng.random() < rates.get("partial", 0.0)),
                    "blur_sigma": float(rng.uniform(1.0, 3.0)) if blur else 0.0,
                    "jpeg_quality": int(rng.integers(70, 96)),
                }
            )
    order = rng.permutation(len(rows))  # shuffle so row order (and file number) hides the class
    table = pd.DataFrame([rows[j] for j in order])
    table.insert(0, "filename", [f"core_{k:05d}.jpg" for k in range(len(table))])
    nuisance = np.random.default_rng([int(seed), 1])  # own stream: other columns unchanged
    table["dab_gain"] = np.exp(nuisance.normal(0.0, float(dab_gain_sd), len(table)))
    table["tumour_fraction"] = nuisance.uniform(*map(float, tumour_fraction_range), len(table))
    table["focal"] = nuisance.random(len(table)) < float(focal_rate)
    table = table.astype(
        {"ihc-score": int, "her2-status": int, "jpeg_quality": int, "blur_sigma": float}
    )
    return table.loc[:, list(COLUMNS)]


def _optional(row: Mapping[str, object], key: str, cast):
    """``cast(row[key])``, or None (drawn by the renderer) where the column is absent or NaN."""
    value = row.get(key)
    return None if value is None or pd.isna(value) else cast(value)


def core_spec_from_row(row: Mapping[str, object], size: int, cell_diameter_px: float) -> CoreSpec:
    """Build the ``CoreSpec`` of one cohort-table row (external rows get the external stains).

    Tables without the ``dab_gain`` / ``tumour_fraction`` / ``focal`` columns (older tables) leave
    those to the renderer, which draws them from the core's generator.
    """
    return CoreSpec(
        ihc_score=int(row["ihc-score"]),
        her2_status=int(row["her2-status"]),
        status_cue=bool(row["status_cue"]),
        size=int(size),
        cell_diameter_px=float(cell_diameter_px),
        stains=EXTERNAL_STAINS if row["cohort"] == "external" else INTERNAL_STAINS,
        tear=bool(row["tear"]),
        fold=bool(row["fold"]),
        partial=bool(row["partial"]),
        blur_sigma=float(row["blur_sigma"]),
        dab_gain=_optional(row, "dab_gain", float),
        tumour_fraction=_optional(row, "tumour_fraction", float),
        focal=_optional(row, "focal", bool),
    )


def row_seed(seed: int, row_index: int) -> np.random.Generator:
    """Independent generator of one row, so any single core can be re-rendered alone."""
    return np.random.default_rng([int(seed), int(row_index)])


def render_cohort(
    table: pd.DataFrame, size: int, cell_diameter_px: float, seed: int
) -> Iterator[tuple[str, bytes]]:
    """Lazily yield (filename, JPEG bytes) for each row of a cohort table, one core at a time."""
    for i, row in enumerate(table.to_dict("records")):
        spec = core_spec_from_row(row, size, cell_diameter_px)
        rgb = render_core(spec, row_seed(seed, i))
        yield str(row["filename"]), encode_jpeg(rgb, int(row["jpeg_quality"]))
