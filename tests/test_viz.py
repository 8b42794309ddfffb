"""Lineage: `kedro viz build` exports every registered pipeline, with datasets in their layers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from her2_kedro.pipeline_registry import register_pipelines
from tests.conftest import PROJECT

pytestmark = pytest.mark.slow


def test_kedro_viz_build_lists_every_pipeline(tmp_path):
    # a copy of the project's settings, so the export lands in tmp_path/build, not in the repo
    shutil.copy(PROJECT / "pyproject.toml", tmp_path)
    shutil.copytree(PROJECT / "conf" / "base", tmp_path / "conf" / "base")
    (tmp_path / "conf" / "local").mkdir()
    (tmp_path / "src").mkdir()
    kedro = Path(sys.executable).with_name("kedro")
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    done = subprocess.run(
        [str(kedro), "viz", "build"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    api = tmp_path / "build" / "api"
    exported = {p.name for p in (api / "pipelines").iterdir()}
    assert exported == set(register_pipelines())
    predict = json.loads((api / "pipelines" / "predict").read_text())
    layers = {n["name"]: n.get("layer") for n in predict["nodes"] if n["type"] == "data"}
    assert layers["inbox_files"] == "raw"
    assert layers["scored_inbox_predictions"] == "model_output"
    assert layers["report_html"] == "reporting"
    assert {t["id"] for t in predict["tags"]} >= {"predict", "reporting"}
