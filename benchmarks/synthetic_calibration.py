"""How close is the synthetic cohort to real tissue in colour, scale and staining intensity?

Measures the five labelled real cores in ``../shared/data/real_cores`` (labels from its
``labels.csv`` only) and a balanced synthetic cohort rendered with the ``conf/base`` core size and
cell diameter, with the project's own feature code (``her2_kedro.features.intensity.core_features``: the
paper's max-mean-DAB and the intensity+ set), and prints side by side, per class (0, 1, 2-, 2+,
3): the single real value and the synthetic median with its 10-90 % range. Then it trains the
intensity logistic regressions (``fit_intensity_lr``; feature sets ``intensity`` and
``intensity_plus``) on the synthetic cores and prints the IHC-score and HER2-status balanced
accuracy on the real cores, a nuclear size estimate (equivalent diameter of haematoxylin-dense
blobs, px) on both, and per class how many of the real core's intensity+ features fall inside the
synthetic 10-90 % range of its class. Prints figures only; asserts nothing. Skips with a message
where the real cores are absent.

Run: PYTHONPATH=src .venv/bin/python benchmarks/synthetic_calibration.py [--cores 150]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image
from scipy import ndimage
from sklearn.metrics import balanced_accuracy_score

from her2_kedro.features.intensity import INTENSITY_PLUS_FEATURES, core_features
from her2_kedro.imaging.stain import stain_channel
from her2_kedro.modelling.intensity_lr import fit_intensity_lr
from her2_kedro.synthetic.cohort import BALANCED_PRIORS, render_cohort, sample_cohort

REPO = Path(__file__).resolve().parents[1]
REAL_CORES = REPO.parent / "shared/data/real_cores"
CLASSES = ["0", "1", "2-", "2+", "3"]
#: Real cores are measured for nuclear size on a central crop of this side (px), to bound time.
NUCLEUS_CROP = 2048


def nuclear_diameter_px(rgb: np.ndarray) -> float:
    """Median equivalent diameter (px) of haematoxylin-dense blobs: a simple, scale-true estimate.

    Haematoxylin (rgb2hed) smoothed with sigma 3 px, thresholded at its 75th percentile over
    tissue, opened, holes filled; blobs of >= 80 px area count. Biased low (vesicular nuclei
    split into pieces) but identically so on real and synthetic cores.
    """
    h = ndimage.gaussian_filter(stain_channel(rgb, 0), 3.0)
    tissue = rgb.astype(np.float32) @ np.array([0.2989, 0.587, 0.114], np.float32) <= 220
    if not tissue.any():
        return float("nan")
    mask = ndimage.binary_opening(h > np.percentile(h[tissue], 75), iterations=2)
    labels, _ = ndimage.label(ndimage.binary_fill_holes(mask))
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas >= 80]
    return float(np.median(2.0 * np.sqrt(areas / np.pi))) if areas.size else float("nan")


def five_class(table: pd.DataFrame) -> np.ndarray:
    """The paper's five training classes from the score and status columns."""
    score = table["ihc-score"].astype(int).astype(str)
    plus = np.where(table["her2-status"].astype(int) == 1, "2+", "2-")
    return np.where(score == "2", plus, score)


def measure_real(root: Path) -> pd.DataFrame:
    """Features, nuclear size and labels (from labels.csv) of each real core."""
    Image.MAX_IMAGE_PIXELS = None  # the real cores are 5468 px JPEGs from a trusted folder
    labels = pd.read_csv(root / "labels.csv")
    rows = []
    for row in labels.to_dict("records"):
        rgb = np.asarray(Image.open(root / row["filename"]).convert("RGB"))
        feats = core_features(rgb, str(row["filename"]))[1]
        c0 = max(0, (min(rgb.shape[:2]) - NUCLEUS_CROP) // 2)
        crop = rgb[c0 : c0 + NUCLEUS_CROP, c0 : c0 + NUCLEUS_CROP]
        feats["nuclear_diameter_px"] = nuclear_diameter_px(crop)
        rows.append({**row, **feats})
    out = pd.DataFrame(rows)
    return out.assign(**{"class": five_class(out)})


def measure_synthetic(n_cores: int, size: int, cell_diameter_px: float, seed: int) -> pd.DataFrame:
    """A balanced internal-centre synthetic cohort (one core per patient), rendered and measured."""
    table = sample_cohort(n_cores, 1, BALANCED_PRIORS, seed=seed)
    rows = []
    for name, jpeg in render_cohort(table, size=size, cell_diameter_px=cell_diameter_px, seed=seed):
        rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        feats = core_features(rgb, name)[1]
        feats["nuclear_diameter_px"] = nuclear_diameter_px(rgb)
        rows.append(feats)
    out = pd.concat([table.reset_index(drop=True), pd.DataFrame(rows)], axis=1)
    out = out[np.isfinite(out["max_mean_dab"])].reset_index(drop=True)
    return out.assign(**{"class": five_class(out)})


def print_calibration(real: pd.DataFrame, synth: pd.DataFrame, features: list[str]) -> None:
    """Per class and feature: the real core's value, then synthetic median [10 %, 90 %]; then, per
    class, how many of the intensity+ features of the real core fall inside the synthetic 10-90 %
    range of its class (and inside its min-max range: such a core is drawn at all)."""
    print("\nper class: real value | synthetic median [p10, p90] (n synthetic)")
    inside = {c: [0, 0, 0] for c in CLASSES}  # inside p10-p90, inside min-max, features compared
    for feat in [*features, "nuclear_diameter_px"]:
        print(f"  {feat}")
        for cls in CLASSES:
            r = real.loc[real["class"] == cls, feat]
            s = synth.loc[synth["class"] == cls, feat].dropna()
            real_txt = ", ".join(f"{v:.4f}" for v in r) if len(r) else "-"
            if len(s):
                p10, p50, p90 = np.percentile(s, [10, 50, 90])
                syn_txt = f"{p50:.4f} [{p10:.4f}, {p90:.4f}] (n={len(s)})"
                if feat in features:
                    for v in r:
                        inside[cls][0] += int(p10 <= v <= p90)
                        inside[cls][1] += int(s.min() <= v <= s.max())
                        inside[cls][2] += 1
            else:
                syn_txt = "-"
            print(f"    {cls:>2}: real {real_txt:>8} | synthetic {syn_txt}")
    print("\nreal intensity+ features inside the synthetic range of their class")
    for cls, (n10, nall, n) in inside.items():
        print(f"  {cls:>2}: {n10}/{n} inside p10-p90, {nall}/{n} inside min-max")
    total = np.sum(list(inside.values()), axis=0)
    print(f"  all: {total[0]}/{total[2]} inside p10-p90, {total[1]}/{total[2]} inside min-max")


def print_transfer(real: pd.DataFrame, synth: pd.DataFrame, feature_sets: dict) -> None:
    """Balanced accuracy on the real cores of intensity models trained on the synthetic ones."""
    print("\nsynthetic-trained intensity LR (C=1) on the real cores: balanced accuracy")
    for model, feats in feature_sets.items():
        for target in ("ihc-score", "her2-status"):
            lr = fit_intensity_lr(synth[feats], synth[target].to_numpy(int))
            pred = lr.predict(real[feats])
            acc = balanced_accuracy_score(real[target].to_numpy(int), pred)
            print(f"  {model:>15} {target:>12}: {acc:.3f}  (predicted {list(map(int, pred))})")
    print(
        f"  real truth: ihc-score {list(real['ihc-score'])}, her2-status {list(real['her2-status'])}"
    )


def _conf(name: str) -> dict:
    """A parameters file of conf/base as a dict (empty when absent)."""
    path = REPO / "conf/base" / name
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def main() -> None:
    syn = _conf("parameters_synthetic.yml").get("synthetic", {})
    models = _conf("parameters_intensity.yml").get("intensity_study", {}).get("models", {})
    plus = models.get("intensity_plus", {}).get("features", INTENSITY_PLUS_FEATURES)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=150)
    ap.add_argument("--size", type=int, default=int(syn.get("core_size", 672)))
    ap.add_argument("--cell-diameter", type=float, default=float(syn.get("cell_diameter_px", 70)))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (REAL_CORES / "labels.csv").exists():
        print(f"skipped: no real cores at {REAL_CORES} (needs ../shared/data/real_cores)")
        return
    t0 = time.perf_counter()
    real = measure_real(REAL_CORES)
    t1 = time.perf_counter()
    synth = measure_synthetic(args.cores, args.size, args.cell_diameter, args.seed)
    t2 = time.perf_counter()
    print(
        f"{len(real)} real cores measured in {t1 - t0:.1f} s; {len(synth)} synthetic cores of "
        f"{args.size} px (cell {args.cell_diameter:g} px) rendered + measured in {t2 - t1:.1f} s"
    )
    print_calibration(real, synth, list(plus))
    print_transfer(real, synth, {"intensity": ["max_mean_dab"], "intensity_plus": list(plus)})


if __name__ == "__main__":
    main()
