"""Deployment as Kedro documents it: the pipelines exported as an Airflow DAG by kedro-airflow,
one task per group of nodes that hand data over in memory."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT

pytestmark = pytest.mark.slow


def _task_groups(dag: str) -> list[list[str]]:
    """The node names of each ``_run_kedro_node(node_names=[...])`` call of an exported DAG."""
    groups = []
    for call in ast.walk(ast.parse(dag)):
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "_run_kedro_node":
            for keyword in call.keywords:
                if keyword.arg == "node_names":
                    groups.append([ast.literal_eval(e) for e in keyword.value.elts])
    return groups


def test_kedro_airflow_exports_one_task_per_model_and_task(tmp_path: Path):
    kedro = Path(sys.executable).with_name("kedro")
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    result = subprocess.run(
        [
            str(kedro),
            "airflow",
            "create",
            "--pipelines=mil",
            "--group-by=memory",
            f"--target-dir={tmp_path}",
        ],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    dag = (tmp_path / "her2_kedro_mil_dag.py").read_text()
    groups = _task_groups(dag)
    flat = [name for group in groups for name in group]
    assert len(flat) == len(set(flat))  # every node in exactly one task
    # each model x task trains and is scored in tasks of its own (results persisted, not in memory)
    for model in ("mil", "mil_cached"):
        for task in ("ihc_score", "her2_status"):
            assert [f"{model}.{task}.train_model"] in groups
            assert [f"{model}.{task}.evaluate_model"] in groups
    assert ["train_encoder"] in groups and ["embed_cores"] in groups
    assert ["collect_mil_reports"] in groups
    assert "from airflow.sdk import dag, task" in dag  # Airflow 3's TaskFlow API
