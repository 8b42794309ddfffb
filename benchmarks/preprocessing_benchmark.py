"""Preprocessing benchmark on the five real cores (../shared/data/real_cores): prints, asserts nothing.

1. Throughput and peak memory of preprocessing (decode, tile index, DAB deconvolution, intensity and
   intensity+ features) per core, without and with Macenko normalisation to a reference estimated
   from the cores' own tiles; each mode runs in a fresh subprocess so its peak RSS is its own.
2. Leave-one-out intensity-LR on the paper's single feature (max-mean-DAB): for each core, fit
   LogisticRegression(class_weight="balanced") on the other four and predict the held-out one; prints
   the HER2-status and IHC-score balanced accuracy. Five cores only show that the path works on real
   tissue; the numbers mean nothing statistically.

Run: .venv/bin/python benchmarks/preprocessing_benchmark.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REAL_CORES = HERE.parent.parent / "shared" / "data" / "real_cores"


def _child(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def step(mode: str) -> dict:
    import numpy as np
    import pandas as pd

    from her2_kedro.features.intensity import IntensityThresholds, core_features
    from her2_kedro.features.preprocess import decode_rgb
    from her2_kedro.imaging.normalisation import (
        check_stain_vectors,
        estimate_stain_vectors,
        normalise,
    )
    from her2_kedro.imaging.tiling import TileRule, read_tile

    rule, thresholds = TileRule(), IntensityThresholds()
    labels = pd.read_csv(REAL_CORES / "labels.csv")
    reference = None
    if mode == "normalised":
        tiles = []
        for name in labels["filename"]:
            rgb = decode_rgb((REAL_CORES / name).read_bytes())
            index, _ = core_features(rgb, name, rule, thresholds)
            best = index.sort_values("tissue_fraction", ascending=False).head(64)
            tiles += [read_tile(rgb, int(t.x), int(t.y), 224).copy() for t in best.itertuples()]
        reference, _ = check_stain_vectors(estimate_stain_vectors(tiles))
    rows, seconds = [], []
    for name in labels["filename"]:
        t0 = time.perf_counter()
        rgb = decode_rgb((REAL_CORES / name).read_bytes())
        if reference is not None:
            rgb = normalise(rgb, None, reference)
        index, features = core_features(rgb, name, rule, thresholds)
        seconds.append(time.perf_counter() - t0)
        rows.append({"filename": name, "n_tiles": len(index), **features})
    return {
        "rows": json.loads(pd.DataFrame(rows).to_json(orient="records")),
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "median_s": float(np.median(seconds)),
    }


def leave_one_out(features, labels) -> dict[str, float]:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = features["max_mean_dab"].to_numpy().reshape(-1, 1)
    out = {}
    for task, column in (("her2_status", "her2-status"), ("ihc_score", "ihc-score")):
        y = labels[column].to_numpy()
        predicted = []
        for i in range(len(y)):
            train = np.arange(len(y)) != i
            model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
            model.fit(x[train], y[train])
            predicted.append(model.predict(x[i : i + 1])[0])
        out[task] = balanced_accuracy_score(y, predicted)
        out[f"{task}_predicted"] = [int(p) for p in predicted]
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(step(sys.argv[2])))
        return
    if not (REAL_CORES / "labels.csv").is_file():
        print(f"skipped: {REAL_CORES} not available")
        return
    import pandas as pd

    labels = pd.read_csv(REAL_CORES / "labels.csv")
    for mode in ("plain", "normalised"):
        res = _child(mode)
        rate = len(res["seconds"]) / sum(res["seconds"])
        print(
            f"preprocessing ({mode}): {rate:.2f} cores/s, median {res['median_s']:.2f} s per 5468 px "
            f"core, peak RSS {res['peak_rss_mb']:.0f} MB"
        )
        features = pd.DataFrame(res["rows"])
        for row, label in zip(
            features.itertuples(index=False), labels.itertuples(index=False), strict=True
        ):
            print(
                f"  {row.filename[:12]}  score {label[1]} status {label[2]}  tiles {row.n_tiles:4d}  "
                f"max_mean_dab {row.max_mean_dab:.4f}  pos_frac_weak {row.pos_frac_weak:.3f}"
            )
        loo = leave_one_out(features, labels)
        print(
            f"  leave-one-out intensity LR (max_mean_dab): HER2 status balanced accuracy "
            f"{loo['her2_status']:.3f} (predicted {loo['her2_status_predicted']}), IHC score "
            f"{loo['ihc_score']:.3f} (predicted {loo['ihc_score_predicted']})"
        )


if __name__ == "__main__":
    main()
