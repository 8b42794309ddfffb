"""Time scikit-image's rgb2hed against her2_kedro.imaging.stain.rgb_to_hed / dab_channel on 5468^2 cores.

Uses the real cores in ../shared/data/real_cores/*.jpg when present, else one synthetic
5468x5468 image. Prints wall times, speed ratios, the largest errors versus rgb2hed and peak
memory of each method (tracemalloc peak during one call in a fresh subprocess, output
included; numpy reports its buffers to tracemalloc). Prints only; asserts nothing.

    .venv/bin/python benchmarks/deconvolution_benchmark.py [--repeats 2] [--max-cores 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))
REAL_CORES = PROJECT.parent / "shared" / "data" / "real_cores"
SIDE = 5468


def load(path: str) -> np.ndarray:
    """A core as uint8 RGB, or a synthetic IHC-like 5468^2 image when path is 'synthetic'."""
    if path == "synthetic":
        rng = np.random.default_rng(0)
        small = rng.integers(40, 256, size=(SIDE // 4 + 1, SIDE // 4 + 1, 3), dtype=np.uint8)
        return np.ascontiguousarray(np.repeat(np.repeat(small, 4, 0), 4, 1)[:SIDE, :SIDE])
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _run(method: str, rgb: np.ndarray):
    from skimage.color import rgb2hed

    from her2_kedro.imaging.stain import dab_channel, rgb_to_hed

    if method == "rgb2hed":
        return rgb2hed(rgb)
    if method == "rgb_to_hed":
        return rgb_to_hed(rgb)
    if method == "dab_channel":
        return dab_channel(rgb)
    raise ValueError(method)


def child(method: str, path: str) -> None:
    """Subprocess entry: peak traced memory (MiB) of one call, output included, as JSON."""
    rgb = load(path)
    import skimage.color  # noqa: F401

    import her2_kedro.imaging.stain as stain

    if method == "dab_channel":
        stain._rgb24_table(None, 2)  # the cached 64 MiB table is a one-off, reported apart
    tracemalloc.start()
    result = _run(method, rgb)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"peak_mib": peak / 2**20, "output_mib": result.nbytes / 2**20}))


def peak_memory(method: str, path: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, path],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(method: str, rgb: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = _run(method, rgb)
        best = min(best, time.perf_counter() - t)
    return best, result


def errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max absolute error, max relative error where |want| > 1e-3)."""
    diff = np.abs(got.astype(np.float64) - want)
    big = np.abs(want) > 1e-3
    rel = float((diff[big] / np.abs(want[big])).max()) if big.any() else 0.0
    return float(diff.max()), rel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-cores", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    paths = sorted(str(p) for p in REAL_CORES.glob("*.jpg"))[: args.max_cores]
    if not paths:
        print(f"no real cores under {REAL_CORES}; using a synthetic {SIDE}x{SIDE} image")
        paths = ["synthetic"]
    from her2_kedro.imaging.stain import dab_channel

    t = time.perf_counter()
    dab_channel(np.zeros((2048, 1024, 3), np.uint8))  # builds the cached 2**24 table
    print(f"one-off build of the 64 MiB DAB colour table: {time.perf_counter() - t:.3f} s")
    header = (
        f"{'core':12s} {'rgb2hed s':>9s} {'rgb_to_hed s':>12s} {'dab s':>7s} "
        f"{'x hed':>6s} {'x dab':>6s} {'hed abs':>9s} {'hed rel':>9s} {'dab abs':>9s} {'dab rel':>9s}"
    )
    print(header)
    ratios_hed, ratios_dab = [], []
    for path in paths:
        rgb = load(path)
        t_ref, ref = timed("rgb2hed", rgb, args.repeats)
        t_hed, hed = timed("rgb_to_hed", rgb, args.repeats)
        t_dab, dab = timed("dab_channel", rgb, args.repeats)
        hed_abs, hed_rel = errors(hed, ref)
        dab_abs, dab_rel = errors(dab, ref[..., 2])
        del ref, hed, dab
        ratios_hed.append(t_ref / t_hed)
        ratios_dab.append(t_ref / t_dab)
        print(
            f"{Path(path).name[:12]:12s} {t_ref:9.3f} {t_hed:12.3f} {t_dab:7.3f} "
            f"{t_ref / t_hed:6.1f} {t_ref / t_dab:6.1f} {hed_abs:9.2e} {hed_rel:9.2e} "
            f"{dab_abs:9.2e} {dab_rel:9.2e}"
        )
    print(
        f"speed-up (median over {len(paths)}): rgb_to_hed {np.median(ratios_hed):.1f}x, "
        f"dab_channel {np.median(ratios_dab):.1f}x"
    )
    if not args.no_memory:
        for method in ("rgb2hed", "rgb_to_hed", "dab_channel"):
            mem = peak_memory(method, paths[0])
            print(
                f"peak memory {method:12s}: {mem['peak_mib']:7.0f} MiB, of which output "
                f"{mem['output_mib']:5.0f} MiB  ({Path(paths[0]).name[:12]})"
            )


if __name__ == "__main__":
    main()
