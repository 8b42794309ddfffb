"""Ingestion benchmark: prints throughput, time ratios and peak memory; asserts nothing.

1. Real cores (../shared/data/real_cores, 5468 px JPEGs; skipped where absent): time to decode each
   core with PIL versus time to ingest it (decode-verify, convert, blank-core rule, content hash), and
   the ratio (target: ingest <= 1.5x decode); ingestion throughput and peak RSS of the whole folder run.
2. Dearraying: a synthetic pyramidal slide of 8 x 12 cores at >= 20 000 x 30 000 px is written once
   (cached under benchmarks/results/), then a fresh process dearrays it and extracts every core;
   prints wall time, peak RSS (target < 2 GB) and how many cores were found and correctly labelled.

Each measurement runs in its own subprocess so that peak RSS belongs to that step alone.
Run: .venv/bin/python benchmarks/ingestion_benchmark.py [--rows 8 --cols 12 --pitch 2500]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
REAL_CORES = PROJECT.parent / "shared" / "data" / "real_cores"
RESULTS = HERE / "results"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(step: str, *args: str) -> dict:
    """Run one step in a fresh interpreter and return the JSON it prints."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", step, *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ child steps
def step_decode_vs_ingest(folder: str, repeats: str) -> dict:
    import numpy as np
    from PIL import Image

    from her2_kedro.config import ImageChecks
    from her2_kedro.tma.qc.images import check_image

    Image.MAX_IMAGE_PIXELS = None
    checks = ImageChecks()
    rows = []
    for path in sorted(Path(folder).glob("*.jpg")):
        data = path.read_bytes()
        decode, ingest = [], []
        for _ in range(int(repeats)):
            t0 = time.perf_counter()
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            decode.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            checked = check_image(data, path.name, checks)
            ingest.append(time.perf_counter() - t0)
            assert checked.ok, checked.reason
        rows.append({"core": path.name, "decode_s": min(decode), "ingest_s": min(ingest)})
    return {"rows": rows, "peak_rss_mb": _peak_rss_mb()}


def step_ingest_folder(folder: str) -> dict:
    import pandas as pd

    from her2_kedro.config import ImageChecks
    from her2_kedro.tma.ingest import ingest_core_folder

    files = {p.name: p for p in sorted(Path(folder).glob("*.jpg"))}
    labels = pd.read_csv(Path(folder) / "labels.csv", dtype=str)
    t0 = time.perf_counter()
    result = ingest_core_folder(files, labels, None, ImageChecks())
    for write in result.payloads.values():  # what the catalog does when it saves the cores
        write()
    elapsed = time.perf_counter() - t0
    return {
        "cores": len(result.records),
        "problems": [p.reason for p in result.problems],
        "seconds": elapsed,
        "peak_rss_mb": _peak_rss_mb(),
    }


def step_write_slide(path: str, rows: str, cols: str, pitch: str, diameter: str) -> dict:
    import numpy as np

    from her2_kedro.synthetic.cohort import BALANCED_PRIORS, sample_cohort
    from her2_kedro.synthetic.render import CoreSpec, render_core
    from her2_kedro.synthetic.slide import SlideSpec, write_synthetic_slide

    n_rows, n_cols = int(rows), int(cols)
    labels = [f"{chr(65 + r)}-{c + 1}" for r in range(n_rows) for c in range(n_cols)]
    rng = np.random.default_rng(3)
    missing = tuple(rng.choice(labels, size=3, replace=False))
    spec = SlideSpec(
        n_rows=n_rows,
        n_cols=n_cols,
        core_diameter_px=int(diameter),
        pitch_px=int(pitch),
        rotation_deg=1.5,
        missing=missing,
        n_debris=15,
    )
    table = sample_cohort(len(labels), 1, BALANCED_PRIORS, seed=3)
    by_label = dict(zip(labels, table.to_dict("records"), strict=True))
    side = int(round(int(diameter) / 0.93))

    def core(label: str):
        row = by_label[label]
        core_spec = CoreSpec(
            ihc_score=int(row["ihc-score"]),
            her2_status=int(row["her2-status"]),
            status_cue=bool(row["status_cue"]),
            size=side,
            cell_diameter_px=40,
        )
        return render_core(core_spec, np.random.default_rng(labels.index(label)))

    t0 = time.perf_counter()
    layout = write_synthetic_slide(Path(path), spec, core, np.random.default_rng(5))
    truth = {r.core: [r.cx, r.cy] for r in layout.itertuples(index=False) if r.present}
    Path(path).with_suffix(".truth.json").write_text(json.dumps(truth))
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_rss_mb()}


def step_dearray(path: str) -> dict:
    import numpy as np

    from her2_kedro.tma.dearray import DearrayConfig, dearray_slide, extract_core
    from her2_kedro.tma.wsi import open_slide

    truth = json.loads(Path(path).with_suffix(".truth.json").read_text())
    params = DearrayConfig()
    t0 = time.perf_counter()
    with open_slide(Path(path)) as reader:
        size = reader.dimensions
        result = dearray_slide(reader, params)
        t_grid = time.perf_counter() - t0
        for core in result.cores:
            rgb = extract_core(reader, core, params)
            del rgb
    elapsed = time.perf_counter() - t0
    found = {c.label: (c.cx, c.cy) for c in result.cores}
    correct = sum(
        1
        for label, (x, y) in found.items()
        if label in truth
        and np.hypot(x - truth[label][0], y - truth[label][1]) < result.pitch_px / 4
    )
    return {
        "slide_px": list(size),
        "true_cores": len(truth),
        "found": len(found),
        "correctly_labelled": correct,
        "missing_reported": len(result.missing),
        "rejected_blobs": len(result.rejected),
        "grid_seconds": t_grid,
        "seconds": elapsed,
        "peak_rss_mb": _peak_rss_mb(),
    }


STEPS = {
    "decode_vs_ingest": step_decode_vs_ingest,
    "ingest_folder": step_ingest_folder,
    "write_slide": step_write_slide,
    "dearray": step_dearray,
}


# ------------------------------------------------------------------ driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--cols", type=int, default=12)
    parser.add_argument("--pitch", type=int, default=2500, help="grid pitch, level-0 px")
    parser.add_argument("--diameter", type=int, default=2100, help="core diameter, level-0 px")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        step, *rest = args.child
        print(json.dumps(STEPS[step](*rest)))
        return

    print("== Real cores:", REAL_CORES)
    if REAL_CORES.is_dir():
        res = _child("decode_vs_ingest", str(REAL_CORES), str(args.repeats))
        for row in res["rows"]:
            ratio = row["ingest_s"] / row["decode_s"]
            print(
                f"  {row['core'][:40]:40s} decode {row['decode_s']:.3f} s  ingest {row['ingest_s']:.3f} s  ratio {ratio:.2f}x"
            )
        ratios = [r["ingest_s"] / r["decode_s"] for r in res["rows"]]
        print(
            f"  ingest/decode ratio: median {sorted(ratios)[len(ratios) // 2]:.2f}x, max {max(ratios):.2f}x (target <= 1.5x)"
        )
        res = _child("ingest_folder", str(REAL_CORES))
        print(
            f"  folder ingestion: {res['cores']} cores in {res['seconds']:.2f} s "
            f"({res['cores'] / res['seconds']:.2f} cores/s), peak RSS {res['peak_rss_mb']:.0f} MB; "
            f"problems: {res['problems'] or 'none'}"
        )
    else:
        print("  skipped: folder absent")

    RESULTS.mkdir(exist_ok=True)
    slide = RESULTS / f"slide_{args.rows}x{args.cols}_p{args.pitch}_d{args.diameter}.tif"
    print(f"== Dearraying a synthetic {args.rows} x {args.cols} slide: {slide.name}")
    if not slide.with_suffix(".truth.json").is_file():
        res = _child(
            "write_slide",
            str(slide),
            str(args.rows),
            str(args.cols),
            str(args.pitch),
            str(args.diameter),
        )
        print(
            f"  written in {res['seconds']:.1f} s (peak RSS of the writer {res['peak_rss_mb']:.0f} MB)"
        )
    res = _child("dearray", str(slide))
    w, h = res["slide_px"]
    print(f"  slide {w} x {h} px ({w * h / 1e6:.0f} Mpx), file {slide.stat().st_size / 1e6:.0f} MB")
    print(
        f"  cores: {res['found']} found / {res['true_cores']} present, {res['correctly_labelled']} correctly "
        f"labelled; {res['missing_reported']} empty positions reported; {res['rejected_blobs']} blobs rejected"
    )
    print(
        f"  grid fit {res['grid_seconds']:.2f} s, grid + extraction of every core {res['seconds']:.1f} s, "
        f"peak RSS {res['peak_rss_mb']:.0f} MB (target < 2048 MB)"
    )


if __name__ == "__main__":
    main()
