"""Patient-level train/val/test splits, stratified by the paper's five classes.

A patient never appears in two splits. Splits given in the label table are honoured (and count
toward each class's quota); the remaining patients are assigned deterministically from a seed.
Cores of evaluation-only cohorts (``cohorts.evaluation_only``) get the split ``external`` and take
no part in the patient split (`assign_manifest_splits`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from her2_kedro.config.shared import CohortsConfig
from her2_kedro.schema import EXTERNAL_SPLIT, FIVE_CLASSES, SPLITS, QCProblem

DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}


def validate_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Check split fractions (keys among train/val/test, non-negative, sum to 1) and fill missing keys with 0."""
    unknown = sorted(set(fractions) - set(SPLITS))
    if unknown:
        raise ValueError(
            f"unknown split name(s) {unknown} in fractions; expected keys among {list(SPLITS)}"
        )
    out = {s: float(fractions.get(s, 0.0)) for s in SPLITS}
    bad = {s: f for s, f in out.items() if not math.isfinite(f) or f < 0}
    if bad:
        raise ValueError(f"split fractions must be finite and non-negative, got {bad}")
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions must sum to 1 (within 1e-6), got {total!r} from {dict(fractions)}"
        )
    return out


def _class_rank(label: object) -> tuple[int, str]:
    text = str(label)
    return (FIVE_CLASSES.index(text), text) if text in FIVE_CLASSES else (len(FIVE_CLASSES), text)


def patient_class(classes: list[object]) -> str:
    """A patient's stratum: its most frequent five class; ties go to the higher class."""
    counts = Counter(str(c) for c in classes)
    return max(counts, key=lambda c: (counts[c], _class_rank(c)))


def _norm_split(value: object) -> str | None:
    if value is None or (not isinstance(value, str) and pd.isna(value)):  # type: ignore[arg-type]
        return None
    text = str(value).strip().lower()
    return text or None


def assign_splits(
    table: pd.DataFrame,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    *,
    source: str = "splits",
) -> tuple[pd.Series, list[QCProblem]]:
    """Split per row (index-aligned; NA for rejected rows) with patients never in two splits.

    `table` needs `core_id`, `patient_id`, `five_class`, `split` (may be NA). Given splits are kept;
    a patient with different given splits (or an invalid split value) is rejected with one problem
    per row. Other patients are assigned per class so each class's patients (given ones included)
    approach the fractions: one at a time, in seeded random order, to the split furthest below its
    target (the class's train split first gets one patient when it has none and train > 0).
    """
    fr = validate_fractions(fractions)
    missing = [
        c for c in ("core_id", "patient_id", "five_class", "split") if c not in table.columns
    ]
    if missing:
        raise ValueError(f"assign_splits needs columns {missing}")

    result = pd.Series(pd.NA, index=table.index, dtype=object, name="split")
    problems: list[QCProblem] = []
    core_ids = [str(c) for c in table["core_id"]]
    patients = [
        str(p).strip()
        if _norm_split(p) is not None  # blank or NA patient id
        else f"__core__{c}"  # blank patient: own patient
        for p, c in zip(table["patient_id"], core_ids, strict=True)
    ]
    given = [_norm_split(s) for s in table["split"]]
    classes = list(table["five_class"])

    rows_of: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        rows_of.setdefault(p, []).append(i)

    patient_split: dict[str, str | None] = {}
    stratum: dict[str, str] = {}
    for p, rows in rows_of.items():
        splits = {given[i] for i in rows if given[i] is not None}
        invalid = sorted(s for s in splits if s not in SPLITS)
        shown = p.removeprefix("__core__")
        if invalid or len(splits) > 1:
            if invalid:
                reason = f"patient {shown} has invalid split value(s) {invalid} (expected train, val or test)"
            else:
                names = " and ".join(s for s in SPLITS if s in splits)
                reason = f"patient {shown} appears in splits {names}; all its rows rejected"
            problems += [QCProblem(source, core_ids[i], reason) for i in rows]
            continue
        patient_split[p] = next(iter(splits)) if splits else None
        stratum[p] = patient_class([classes[i] for i in rows])

    rng = np.random.default_rng(seed)
    for cls in sorted(set(stratum.values()), key=_class_rank):
        members = sorted(p for p in stratum if stratum[p] == cls)
        counts = Counter(patient_split[p] for p in members if patient_split[p] is not None)
        targets = {s: fr[s] * len(members) for s in SPLITS}
        todo = [
            members[k] for k in rng.permutation(len(members)) if patient_split[members[k]] is None
        ]
        for p in todo:
            if fr["train"] > 0 and counts["train"] == 0:
                choice = "train"
            else:
                choice = max(
                    SPLITS, key=lambda s: (targets[s] - counts[s], fr[s], -SPLITS.index(s))
                )
            patient_split[p] = choice
            counts[choice] += 1

    for p, split in patient_split.items():
        for i in rows_of[p]:
            result.iloc[i] = split
    return result, problems


def assign_manifest_splits(
    table: pd.DataFrame,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    evaluation_only: Iterable[str] | None = None,
) -> tuple[pd.Series, list[QCProblem], dict[str, str]]:
    """Splits of the manifest: evaluation-only cohorts get ``external``, the others are split by patient.

    Cores whose ``cohort`` is evaluation-only never train or select a model, whatever the label
    table says: a train/val/test split given for one is overridden to ``external`` with a note
    (the core is still good for evaluation, so it is kept rather than rejected). Patient-level
    stratified splitting (`assign_splits`) runs over the other cohorts only. Returns the split per
    row (NA for rejected rows), the problems, and notes by core id for the QC report.
    """
    held_out = set(CohortsConfig().evaluation_only if evaluation_only is None else evaluation_only)
    external = table["cohort"].astype(str).isin(held_out).to_numpy()
    result = pd.Series(pd.NA, index=table.index, dtype=object, name="split")
    notes: dict[str, str] = {}
    training_patients = {str(p) for p in table.loc[~external, "patient_id"]}
    for i in np.flatnonzero(external):
        row = table.iloc[i]
        given = _norm_split(row["split"])
        reasons = []
        if given is not None and given != EXTERNAL_SPLIT:
            reasons.append(
                f"split {given!r} from the label table overridden to '{EXTERNAL_SPLIT}': "
                f"cohort {row['cohort']!r} is evaluation-only (cohorts.evaluation_only)"
            )
        if str(row["patient_id"]) in training_patients:
            reasons.append(
                f"patient {row['patient_id']} also has cores in a training cohort "
                "(the external evaluation is not patient-disjoint)"
            )
        if reasons:
            notes[str(row["core_id"])] = "; ".join(reasons)
        result.iloc[i] = EXTERNAL_SPLIT
    if (~external).any():
        inner = table.loc[~external]
        split, problems = assign_splits(inner, fractions=fractions, seed=seed)
        result.loc[inner.index] = split
    else:
        problems = []
    return result, problems, notes
