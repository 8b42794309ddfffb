"""Scoring new cores: inbox QC, a checkpoint fed one new core, and the MLflow registry's alias."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from her2_kedro.config import ImageChecks, TileConfig, TorchModelConfig
from her2_kedro.evaluation.study import TASKS
from her2_kedro.modelling.checkpoints import CheckpointError, save_checkpoint
from her2_kedro.modelling.registry import register_checkpoint, resolve_checkpoint
from her2_kedro.modelling.scoring import load_trained, score_core
from her2_kedro.modelling.torch_study import ModelInputs, build_model
from her2_kedro.tma.inbox import check_inbox
from tests.conftest import fake_core

RULE = TileConfig()


def _jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_inbox_keeps_good_cores_and_names_every_rejected_file(tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(_jpeg(fake_core(448, 300, 40)))
    (folder / "good.png").write_bytes(_jpeg(fake_core(448, 300, 40)))  # same stem: clashes
    (folder / "broken.jpg").write_bytes(_jpeg(fake_core(448, 300, 40))[:2000])  # truncated
    (folder / "notes.txt").write_text("not an image")
    files = {p.name: p for p in folder.iterdir()}
    cores, problems = check_inbox(files, ImageChecks(), RULE)
    assert [c.core_id for c in cores] == ["good"]
    assert cores[0].source_file == "good.jpg" and cores[0].width == 448
    assert cores[0].load() == (folder / "good.jpg").read_bytes()
    reasons = {p.core_id: p.reason for p in problems}
    assert set(reasons) == {"good.png", "broken.jpg", "notes.txt"}
    assert "already taken by good.jpg" in reasons["good.png"]
    assert all(p.source == "inbox" for p in problems)


def _trained_checkpoint(tmp_path, task: str, extras: dict | None = None):
    spec = TorchModelConfig(
        name="mil",
        input="tiles",
        arch="attention_mil",
        encoder_weights=None,
        encoder="resnet18",
        params={"hidden_dim": 16},
        bag={"input_size": 32},
    )
    torch.manual_seed(0)
    n = len(TASKS[task].classes)
    model, params = build_model(spec, n, ModelInputs(rule=RULE))
    if extras is None:
        extras = {"spec": spec.model_dump(mode="json"), "tiles": RULE.model_dump(), "run_id": "r1"}
    path = save_checkpoint(
        tmp_path / f"mil.{task}.pt", model, spec.arch, params, task=task, extras=extras
    )
    return path


def test_a_checkpoint_scores_a_new_core_with_attention_over_its_tiles(tmp_path):
    path = _trained_checkpoint(tmp_path, "her2_status")
    trained = load_trained(path, "her2_status")
    assert trained.version == "run:r1"  # the training run names the version
    image = _jpeg(fake_core(448, 448, 0))
    proba, attention = score_core(trained, "new", image)
    assert proba.shape == (2,) and proba.sum() == pytest.approx(1.0, abs=1e-5)
    assert len(attention) == 4  # a 448 px core: four 224 px tissue tiles
    assert attention["attention"].sum() == pytest.approx(1.0, abs=1e-4)
    # the stain transform is applied to the decoded core before tiling
    seen = []
    score_core(trained, "new", image, transform=lambda row, rgb: seen.append(row) or rgb)
    assert seen and seen[0]["core_id"] == "new"


def test_a_checkpoint_without_its_spec_or_of_another_task_is_named(tmp_path):
    bare = _trained_checkpoint(tmp_path, "ihc_score", extras={"run_id": "x"})
    with pytest.raises(CheckpointError, match="mil.ihc_score.pt.*model spec"):
        load_trained(bare, "ihc_score")
    other = _trained_checkpoint(tmp_path, "her2_status")
    with pytest.raises(CheckpointError, match="mil.her2_status.pt"):
        load_trained(other, "ihc_score")


def test_registry_alias_wins_over_the_local_checkpoint(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    local = _trained_checkpoint(tmp_path, "her2_status")
    # without a registered alias: the local file, and it names its own version
    assert resolve_checkpoint("mil", "her2_status", local, "champion") == (local, None)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(local), "models")
    version = register_checkpoint(
        "mil", "her2_status", run.info.run_id, {"test.balanced_accuracy": 0.9}
    )
    assert version == "1"
    client = mlflow.tracking.MlflowClient()
    registered = client.get_model_version("her2_kedro.mil.her2_status", "1")
    assert registered.tags["test.balanced_accuracy"] == "0.9000"
    client.set_registered_model_alias("her2_kedro.mil.her2_status", "champion", "1")
    path, label = resolve_checkpoint("mil", "her2_status", local, "champion")
    assert path != local and path.read_bytes() == local.read_bytes()
    assert label.startswith("registry:her2_kedro.mil.her2_status/1@champion")
    assert run.info.run_id in label
    assert load_trained(path, "her2_status", label).version == label
    assert register_checkpoint("mil", "her2_status", "") is None  # no run, nothing registered


def test_external_cores_as_scanned_are_scored_once_per_model_version(tmp_path, monkeypatch):
    from her2_kedro.config.preprocessing import ThresholdConfig
    from her2_kedro.evaluation import external
    from her2_kedro.modelling import scoring

    path = _trained_checkpoint(tmp_path, "her2_status")
    cores = pd.DataFrame(
        {"core_id": ["x1"], "image": ["x1.jpg"], "five_class": ["2+"], "her2_status": [1]}
    )
    images = {"x1.jpg": lambda: _jpeg(fake_core(448, 448, 0))}
    models = {("mil", "her2_status"): path}
    rows = external.score_as_scanned(cores, images, models, RULE, ThresholdConfig())
    assert list(rows["split"]) == ["external_unnormalised"]
    assert rows.loc[0, "y_true"] == 1 and rows.loc[0, "model_version"] == "run:r1"
    assert rows.loc[0, ["p_0", "p_1"]].sum() == pytest.approx(1.0, abs=1e-5)

    def no_rescoring(*args, **kwargs):
        raise AssertionError("an unchanged model rescored an unchanged core")

    monkeypatch.setattr(scoring, "score_core", no_rescoring)
    again = external.score_as_scanned(cores, images, models, RULE, ThresholdConfig(), done=rows)
    pd.testing.assert_frame_equal(again, rows)


def _inbox_setup(tmp_path, base_params, spec_input: str = "tiles"):
    """An inbox with one good core and one broken file, and the mil checkpoints of both tasks."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "good.jpg").write_bytes(_jpeg(fake_core(448, 448, 0)))
    (inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    models = {}
    for task in ("ihc_score", "her2_status"):
        path = _trained_checkpoint(tmp_path, task)
        if spec_input == "embeddings":  # the spec of a model on the embedding cache
            payload = torch.load(path, weights_only=True)
            payload["extras"]["spec"]["input"] = "embeddings"
            torch.save(payload, path)
        models[path.name] = path
    predict = {"model": "mil", "intensity_model": None, "registry_alias": None, "heatmaps": False}
    return (
        {p.name: p for p in inbox.iterdir()},
        models,
        None,
        None,
        ImageChecks().model_dump(),
        RULE.model_dump(),
        base_params["preprocessing"],
        predict,
    )


def test_score_inbox_loads_each_model_once_and_rejects_only_the_broken_file(
    tmp_path, base_params, monkeypatch
):
    from her2_kedro.modelling import scoring
    from her2_kedro.pipelines.predict import nodes

    loads = []
    real = scoring.load_trained
    monkeypatch.setattr(scoring, "load_trained", lambda *a, **k: loads.append(a) or real(*a, **k))
    nodes._LOADED.clear()
    calls, qc, figures = nodes.score_inbox(*_inbox_setup(tmp_path, base_params))
    assert list(calls["core_id"]) == ["good"]
    assert calls.loc[0, "status_model_version"] == "run:r1"
    assert qc.set_index("core_id").loc["broken.jpg", "status"] == "rejected"
    assert figures == {}  # heatmaps off
    assert len(loads) == 2  # one per task, in the node's process, reused for every core


def test_score_inbox_names_the_missing_encoder_of_a_model_on_embeddings(tmp_path, base_params):
    from her2_kedro.pipelines.predict import nodes

    nodes._LOADED.clear()
    with pytest.raises(FileNotFoundError, match="reads tile embeddings.*pipelines=features"):
        nodes.score_inbox(*_inbox_setup(tmp_path, base_params, "embeddings"))
