"""How hard is the synthetic cohort for the paper's staining-intensity baseline?

Renders a balanced synthetic cohort (classes 0, 1, 2-, 2+, 3 equally likely per patient, the
default artefact rates, internal stains), computes the paper's descriptor per core (max over kept
224 px tiles of the mean rgb2hed DAB, via ``her2_kedro.features.intensity.core_features`` and the paper's
``TileRule``), and fits ``LogisticRegression(class_weight="balanced")`` on the standardised
feature for the IHC score (0-3) and the HER2 status, on a patient-level 70/30 split. Prints the
per-class descriptor (mean +- sd), the balanced accuracies of that split, and their mean +- sd over
repeated patient-level 70/30 splits (a single 90-core test set is noisy).

Paper (real cores): balanced accuracy 0.6876 (IHC score) and 0.8457 (HER2 status) for this
baseline; 0.8249 / 0.9429 for the attention-MIL CNN.

Run: .venv/bin/python benchmarks/synthetic_difficulty.py [--cores 300] [--size 448]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupShuffleSplit
from sklearn.preprocessing import StandardScaler

from her2_kedro.features.intensity import core_features
from her2_kedro.imaging.tiling import TileRule
from her2_kedro.synthetic.cohort import BALANCED_PRIORS, render_cohort, sample_cohort

CLASS_NAMES = ["0", "1", "2-", "2+", "3"]


def measure(
    n_cores: int, size: int, cell_diameter_px: float, seed: int, cores_per_patient: int
) -> pd.DataFrame:
    """The cohort table with a ``max_mean_dab`` column (one rendered core at a time)."""
    table = sample_cohort(
        n_cores // cores_per_patient, cores_per_patient, BALANCED_PRIORS, seed=seed
    )
    rule = TileRule()
    values = []
    for name, jpeg in render_cohort(table, size=size, cell_diameter_px=cell_diameter_px, seed=seed):
        rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        values.append(core_features(rgb, name, rule)[1]["max_mean_dab"])
    return table.assign(max_mean_dab=values)


def fit_eval(
    table: pd.DataFrame, train: np.ndarray, test: np.ndarray
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Balanced accuracies (IHC score, HER2 status) of the one-feature logistic regression, and the
    test confusion counts: true five-class label (0, 1, 2-, 2+, 3) x predicted score / status."""
    x = table[["max_mean_dab"]].to_numpy(float)
    scaler = StandardScaler().fit(x[train])
    xs = scaler.transform(x)
    out, confusions = [], []
    for target, labels in (("ihc-score", [0, 1, 2, 3]), ("her2-status", [0, 1])):
        y = table[target].to_numpy()
        model = LogisticRegression(class_weight="balanced").fit(xs[train], y[train])
        pred = model.predict(xs[test])
        out.append(balanced_accuracy_score(y[test], pred))
        five = pd.Categorical(table["class"].to_numpy()[test], categories=CLASS_NAMES).codes
        counts = np.zeros((len(CLASS_NAMES), len(labels)))
        np.add.at(counts, (five, np.searchsorted(labels, pred)), 1)
        confusions.append(counts)
    return out[0], out[1], confusions[0], confusions[1]


def _print_confusion(title: str, counts: np.ndarray, columns: list[str]) -> None:
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    print(f"{title} (rows: true class, share predicted; pooled over splits)")
    print("        " + "".join(f"{c:>7}" for c in columns))
    for name, r in zip(CLASS_NAMES, rows, strict=True):
        print(f"  {name:>4}  " + "".join(f"{v:7.2f}" for v in r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=300)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--cell-diameter", type=float, default=20.0)
    ap.add_argument("--cores-per-patient", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=50, help="repeated patient-level splits")
    args = ap.parse_args()

    t0 = time.perf_counter()
    table = measure(args.cores, args.size, args.cell_diameter, args.seed, args.cores_per_patient)
    elapsed = time.perf_counter() - t0
    table = table[np.isfinite(table["max_mean_dab"])].reset_index(drop=True)
    cls = np.where(
        table["ihc-score"] == 2,
        np.where(table["her2-status"] == 1, "2+", "2-"),
        table["ihc-score"].astype(str),
    )
    table["class"] = cls
    print(
        f"{len(table)} cores of {args.size} px (cell {args.cell_diameter:g} px), "
        f"{table['patient_id'].nunique()} patients, rendered + measured in {elapsed:.1f} s"
    )
    print("max-mean-DAB (rgb2hed units) per class:")
    for c in ("0", "1", "2-", "2+", "3"):
        v = table.loc[table["class"] == c, "max_mean_dab"]
        print(f"  {c:>2}: {v.mean():.4f} +- {v.std():.4f}  (n={len(v)})")
    for s in range(4):
        v = table.loc[table["ihc-score"] == s, "max_mean_dab"]
        print(f"  score {s}: {v.mean():.4f} +- {v.std():.4f}")

    groups = table["patient_id"].to_numpy()
    splitter = GroupShuffleSplit(n_splits=args.repeats, test_size=0.3, random_state=args.seed)
    results = [fit_eval(table, tr, te) for tr, te in splitter.split(table, groups=groups)]
    scores = np.array([r[:2] for r in results])
    print(
        f"patient-level 70/30 split #0: balanced accuracy IHC score {scores[0, 0]:.4f}, "
        f"HER2 status {scores[0, 1]:.4f}"
    )
    print(
        f"over {args.repeats} splits: IHC score {scores[:, 0].mean():.4f} +- {scores[:, 0].std():.4f}, "
        f"HER2 status {scores[:, 1].mean():.4f} +- {scores[:, 1].std():.4f}"
    )
    _print_confusion("IHC score", sum(r[2] for r in results), ["0", "1", "2", "3"])
    _print_confusion("HER2 status", sum(r[3] for r in results), ["neg", "pos"])
    print("paper (real cores, this baseline): IHC score 0.6876, HER2 status 0.8457")


if __name__ == "__main__":
    main()
