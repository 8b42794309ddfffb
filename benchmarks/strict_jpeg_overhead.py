"""Cost of the strict JPEG check (simplejpeg at 1/8 scale) against the whole QC decode of a core.

Usage: PYTHONPATH=src python benchmarks/strict_jpeg_overhead.py [folder of JPEG cores] [repeats]
Prints, per core, the median seconds of check_image (which includes the strict check) and of the
strict check alone, and the overhead as a fraction of check_image without it.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from her2_kedro.tma.qc import images


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(folder: str = "../shared/data/real_cores", repeats: str = "5") -> None:
    n = int(repeats)
    total_check = total_strict = 0.0
    paths = sorted(Path(folder).glob("*.jpg"))
    if not paths:
        print(f"no JPEG cores in {folder}: strict-decode benchmark skipped")
        return
    for path in paths:
        data = path.read_bytes()
        full = _median_seconds(lambda d=data, name=path.name: images.check_image(d, name), n)
        strict = _median_seconds(lambda d=data: images._jpeg_strict_check(d), n)
        total_check += full
        total_strict += strict
        print(f"{path.name[:12]:12s}  check_image {full:6.3f} s  strict check {strict:6.3f} s")
    overhead = total_strict / (total_check - total_strict)
    print(
        f"strict-decode overhead: {total_strict:.3f} s on top of {total_check - total_strict:.3f} s"
        f" = {overhead:.0%} of the QC decode without it"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
