"""The GPU benchmark script is only measured where a GPU is lent; its CPU mode keeps it working
(every section runs, and its smoke checks compare the torch path with the numpy one)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import PROJECT

pytestmark = pytest.mark.slow


def test_gpu_benchmark_runs_on_the_cpu_and_its_smoke_checks_pass():
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_benchmark.py", "--device", "cpu", "--quick"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for section in ("a.", "b.", "c.", "d.", "e.", "f.", "g."):
        assert f"\n{section} " in out, f"section {section} missing"
    assert "every smoke check passed" in out
    assert "FAIL" not in out
