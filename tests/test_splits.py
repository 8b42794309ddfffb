"""Tests for her2_kedro.tma.splits: patient-level, stratified, deterministic splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from her2_kedro.schema import EXTERNAL_SPLIT, FIVE_CLASSES, SPLITS
from her2_kedro.tma.splits import (
    assign_manifest_splits,
    assign_splits,
    patient_class,
    validate_fractions,
)


def cohort(n_patients: int, seed: int, given_fraction: float = 0.0) -> pd.DataFrame:
    """Random cohort: 1-4 cores per patient, mixed classes, some given splits."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        given = rng.choice(["train", "val", "test"]) if rng.random() < given_fraction else None
        for k in range(int(rng.integers(1, 5))):
            rows.append(
                {
                    "core_id": f"P{p}_c{k}",
                    "patient_id": f"P{p}",
                    "five_class": FIVE_CLASSES[int(rng.integers(0, 5))],
                    "split": given if (given is not None and rng.random() < 0.7) else pd.NA,
                }
            )
    return pd.DataFrame(rows, index=pd.RangeIndex(1000, 1000 + len(rows)))


def patients_per_split(table: pd.DataFrame, split: pd.Series) -> pd.Series:
    return (
        table.assign(split=split).dropna(subset=["split"]).groupby("patient_id")["split"].nunique()
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("given_fraction", [0.0, 0.3])
def test_no_patient_in_two_splits(seed: int, given_fraction: float) -> None:
    table = cohort(60, seed, given_fraction)
    split, problems = assign_splits(table, seed=seed)
    assert split.index.equals(table.index)
    assert problems == []  # given splits in `cohort` are consistent per patient
    assert split.notna().all()
    assert set(split) <= {"train", "val", "test"}
    assert (patients_per_split(table, split) == 1).all()
    given = table["split"].notna()
    assert (split[given] == table.loc[given, "split"]).all()


def test_stratified_per_class() -> None:
    # Five classes, 20 patients each (1-3 cores of the same class per patient).
    rows = []
    for ci, cls in enumerate(FIVE_CLASSES):
        for p in range(20):
            for k in range(1 + (p % 3)):
                rows.append(
                    {
                        "core_id": f"{ci}_{p}_{k}",
                        "patient_id": f"{ci}_{p}",
                        "five_class": cls,
                        "split": pd.NA,
                    }
                )
    table = pd.DataFrame(rows)
    split, problems = assign_splits(table, seed=3)
    assert problems == []
    per_patient = table.assign(split=split).drop_duplicates("patient_id")
    counts = per_patient.groupby(["five_class", "split"]).size().unstack(fill_value=0)
    for cls in FIVE_CLASSES:
        assert counts.loc[cls].to_dict() == {"test": 3, "train": 14, "val": 3}


def test_stratified_uneven_classes_proportions() -> None:
    rows = []
    sizes = {"0": 120, "1": 10, "2-": 11, "2+": 17, "3": 33}
    for cls, n in sizes.items():
        rows += [
            {"core_id": f"{cls}_{p}", "patient_id": f"{cls}_{p}", "five_class": cls, "split": pd.NA}
            for p in range(n)
        ]
    table = pd.DataFrame(rows)
    split, _ = assign_splits(table, seed=11)
    counts = table.assign(split=split).groupby(["five_class", "split"]).size().unstack(fill_value=0)
    for cls, n in sizes.items():
        for name, frac in {"train": 0.7, "val": 0.15, "test": 0.15}.items():
            assert abs(counts.loc[cls, name] - frac * n) < 1.0, (
                cls,
                name,
                counts.loc[cls].to_dict(),
            )


def test_tiny_classes_train_first() -> None:
    table = pd.DataFrame(
        [
            {"core_id": "a", "patient_id": "A", "five_class": "2-", "split": pd.NA},
            {"core_id": "b", "patient_id": "B", "five_class": "1", "split": pd.NA},
            {"core_id": "c", "patient_id": "C", "five_class": "1", "split": pd.NA},
        ]
    )
    split, _ = assign_splits(table, fractions={"train": 0.1, "val": 0.45, "test": 0.45}, seed=0)
    assert split.iloc[0] == "train"  # a single-patient class goes to train
    assert sorted(split.iloc[1:]) != ["val", "val"] and "train" in split.iloc[1:].tolist()


def test_given_splits_honoured_and_count_toward_quota() -> None:
    rows = [
        {
            "core_id": f"c{p}",
            "patient_id": f"P{p}",
            "five_class": "0",
            "split": "test" if p < 3 else pd.NA,
        }
        for p in range(20)
    ]
    table = pd.DataFrame(rows)
    split, problems = assign_splits(table, seed=0)
    assert problems == []
    assert (split.iloc[:3] == "test").all()
    counts = split.value_counts().to_dict()
    assert counts == {"train": 14, "val": 3, "test": 3}


def test_partly_given_patient_gets_given_split_for_all_rows() -> None:
    table = pd.DataFrame(
        [
            {"core_id": "a1", "patient_id": "A", "five_class": "3", "split": "Val "},
            {"core_id": "a2", "patient_id": "A", "five_class": "3", "split": pd.NA},
            {"core_id": "b1", "patient_id": "B", "five_class": "3", "split": pd.NA},
        ]
    )
    split, problems = assign_splits(table)
    assert problems == [] and split.tolist()[:2] == ["val", "val"]


def test_conflicting_given_splits_reported() -> None:
    table = pd.DataFrame(
        [
            {"core_id": "a1", "patient_id": "P", "five_class": "0", "split": "train"},
            {"core_id": "a2", "patient_id": "P", "five_class": "0", "split": "test"},
            {"core_id": "a3", "patient_id": "P", "five_class": "0", "split": pd.NA},
            {"core_id": "b1", "patient_id": "Q", "five_class": "0", "split": pd.NA},
        ]
    )
    split, problems = assign_splits(table)
    assert [p.core_id for p in problems] == ["a1", "a2", "a3"]
    assert all("patient P appears in splits train and test" in p.reason for p in problems)
    assert split.iloc[:3].isna().all() and split.iloc[3] == "train"


def test_invalid_split_value_reported() -> None:
    table = pd.DataFrame(
        [{"core_id": "a", "patient_id": "P", "five_class": "0", "split": "holdout"}]
    )
    split, problems = assign_splits(table)
    assert len(problems) == 1 and "invalid split" in problems[0].reason and split.isna().all()


def test_blank_patient_is_own_patient() -> None:
    table = pd.DataFrame(
        [
            {"core_id": f"c{i}", "patient_id": pd.NA, "five_class": "0", "split": pd.NA}
            for i in range(20)
        ]
    )
    split, _ = assign_splits(table)
    assert split.value_counts().to_dict() == {"train": 14, "val": 3, "test": 3}


def test_deterministic_with_seed() -> None:
    table = cohort(80, 1, 0.2)
    a, _ = assign_splits(table, seed=7)
    b, _ = assign_splits(table, seed=7)
    c, _ = assign_splits(table, seed=8)
    assert a.equals(b)
    assert not a.equals(c)
    shuffled = table.sample(frac=1.0, random_state=0)
    d, _ = assign_splits(shuffled, seed=7)
    assert d.reindex(a.index).equals(a)  # row order does not matter


def test_patient_class_majority_and_ties() -> None:
    assert patient_class(["0", "0", "3"]) == "0"
    assert patient_class(["0", "3"]) == "3"
    assert patient_class(["2-", "2+", "1", "1"]) == "1"
    assert patient_class(["2-", "2+"]) == "2+"


@pytest.mark.parametrize(
    "fractions",
    [
        {"train": 0.7, "val": 0.2, "test": 0.2},
        {"train": 1.2, "val": -0.1, "test": -0.1},
        {"train": 0.5, "dev": 0.5},
        {"train": float("nan"), "val": 1.0},
    ],
)
def test_bad_fractions_raise(fractions: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        assign_splits(cohort(5, 0), fractions=fractions)


def test_fractions_zero_and_missing_keys() -> None:
    assert validate_fractions({"train": 0.8, "test": 0.2}) == {
        "train": 0.8,
        "val": 0.0,
        "test": 0.2,
    }
    split, _ = assign_splits(cohort(30, 2), fractions={"train": 0.8, "test": 0.2})
    assert "val" not in set(split)


def test_missing_columns_raise() -> None:
    with pytest.raises(ValueError, match="needs columns"):
        assign_splits(pd.DataFrame({"core_id": ["a"]}))


def test_evaluation_only_cohorts_are_external_and_never_split() -> None:
    table = cohort(60, seed=11, given_fraction=0.3)
    rng = np.random.default_rng(0)
    patients = table["patient_id"].unique()
    external_patients = set(rng.choice(patients, size=15, replace=False))
    table["cohort"] = np.where(table["patient_id"].isin(external_patients), "centre_b", "internal")
    split, problems, notes = assign_manifest_splits(table, seed=3, evaluation_only=["centre_b"])
    held_out = table["cohort"] == "centre_b"
    assert (split[held_out] == EXTERNAL_SPLIT).all()
    assert set(split[~held_out]) <= set(SPLITS)
    # the patient split of the other cohorts is exactly the split of those cohorts alone
    inner, inner_problems = assign_splits(table[~held_out], seed=3)
    pd.testing.assert_series_equal(split[~held_out], inner, check_names=False)
    assert problems == inner_problems == []
    # a split given for an evaluation-only core is overridden, and the QC note says so
    given = table.loc[held_out, "split"].notna()
    overridden = set(table.loc[held_out][given]["core_id"])
    assert overridden and set(notes) == overridden
    for core_id in overridden:
        assert "overridden to 'external'" in notes[core_id] and "'centre_b'" in notes[core_id]


def test_default_evaluation_only_cohort_is_the_config_default() -> None:
    table = cohort(10, seed=2).assign(cohort="internal")
    table.loc[table.index[:3], "cohort"] = "external"
    split, _, _ = assign_manifest_splits(table)
    assert split.iloc[:3].tolist() == [EXTERNAL_SPLIT] * 3
    assert set(split.iloc[3:]) <= set(SPLITS)


def test_external_patient_also_in_training_is_noted() -> None:
    table = pd.DataFrame(
        {
            "core_id": ["a", "b", "c"],
            "patient_id": ["P1", "P1", "P2"],
            "five_class": ["0", "0", "3"],
            "split": [pd.NA] * 3,
            "cohort": ["internal", "external", "internal"],
        }
    )
    split, _, notes = assign_manifest_splits(table)
    assert split.tolist()[1] == EXTERNAL_SPLIT
    assert "not patient-disjoint" in notes["b"]
