"""Dearraying accuracy on synthetic TMA slides: prints cores found and correctly labelled per slide.

Each slide is rendered by the synthetic pipeline's slide writer with a different grid size, rotation
(-5..5 degrees), jitter, missing cores, debris and touching pairs; dearraying then runs with default
parameters (diameter estimated, grid size inferred). A core counts as correctly labelled when the
label the dearrayer gives it is the ground-truth label of the core whose centre is within a quarter
pitch. The estimated core diameter (true 300 px) and the rejected blobs (against the debris specks
drawn) are printed too. Run: .venv/bin/python benchmarks/dearray_accuracy.py [--slides 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from her2_kedro.synthetic.render import CoreSpec, render_core
from her2_kedro.synthetic.slide import SlideSpec, core_label, write_synthetic_slide
from her2_kedro.tma.dearray import DearrayConfig, dearray_slide
from her2_kedro.tma.wsi import open_slide


def one_slide(index: int, folder: Path) -> dict:
    rng = np.random.default_rng(index)
    n_rows, n_cols = int(rng.integers(3, 9)), int(rng.integers(4, 13))
    labels = [core_label(r, c) for r in range(n_rows) for c in range(n_cols)]
    n_missing = int(rng.integers(0, max(1, len(labels) // 8)))
    spec = SlideSpec(
        n_rows=n_rows,
        n_cols=n_cols,
        core_diameter_px=300,
        pitch_px=int(rng.integers(340, 420)),
        rotation_deg=float(rng.uniform(-5, 5)),
        jitter_px=float(rng.uniform(0, 12)),
        missing=tuple(rng.choice(labels, size=n_missing, replace=False)),
        n_debris=int(rng.integers(0, 12)),
        n_touching=int(rng.integers(0, 2)),
    )
    scores = rng.integers(0, 4, size=len(labels))

    def core(label: str) -> np.ndarray:
        score = int(scores[labels.index(label)])
        spec_ = CoreSpec(
            ihc_score=score,
            her2_status=int(score == 3),
            status_cue=False,
            size=323,
            cell_diameter_px=14,
        )
        return render_core(spec_, np.random.default_rng([index, labels.index(label)]))

    path = folder / f"slide_{index}.tif"
    layout = write_synthetic_slide(path, spec, core, np.random.default_rng([index, 1]))
    truth = layout[layout["present"]]
    with open_slide(path) as reader:
        result = dearray_slide(reader, DearrayConfig())
    correct = 0
    for c in result.cores:
        d = np.hypot(truth["cx"] - c.cx, truth["cy"] - c.cy)
        nearest = truth.iloc[int(np.argmin(d))]
        correct += int(d.min() < spec.pitch_px / 4 and nearest["core"] == c.label)
    true_missing = set(spec.missing)
    return {
        "grid": f"{n_rows}x{n_cols}",
        "rotation": spec.rotation_deg,
        "present": len(truth),
        "found": len(result.cores),
        "correct": correct,
        "missing_true": len(true_missing),
        "missing_reported_right": len(true_missing & set(result.missing)),
        "missing_reported": len(result.missing),
        "diameter": result.diameter_px,
        "rejected": len(result.rejected),
        "debris": spec.n_debris,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=8)
    args = parser.parse_args()
    totals = np.zeros(3, dtype=int)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.slides):
            t0 = time.perf_counter()
            r = one_slide(i, Path(tmp))
            totals += [r["present"], r["found"], r["correct"]]
            print(
                f"slide {i}: grid {r['grid']:>5s}, rotation {r['rotation']:+.1f} deg: "
                f"{r['found']}/{r['present']} found, {r['correct']} correctly labelled; "
                f"empty positions {r['missing_reported_right']}/{r['missing_true']} reported "
                f"({r['missing_reported']} reported in all); diameter {r['diameter']:.0f} px "
                f"(true 300); {r['rejected']} rejected ({r['debris']} debris specks) "
                f"[{time.perf_counter() - t0:.1f} s]"
            )
    present, found, correct = totals
    print(
        f"TOTAL: {found}/{present} cores found ({found / present:.1%}), "
        f"{correct}/{present} correctly labelled ({correct / present:.1%})"
    )


if __name__ == "__main__":
    main()
