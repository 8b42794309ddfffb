"""`init_head`: end-to-end attention MIL on the trained trunk starts from the head a model on that
trunk's cached embeddings learnt (linear probing, then fine-tuning)."""

from __future__ import annotations

import pytest
import torch

from her2_kedro.config import TorchModelConfig, TorchStudyParams
from her2_kedro.modelling.attention import build_attention_mil
from her2_kedro.modelling.checkpoints import CheckpointError, load_head, save_checkpoint
from her2_kedro.modelling.encoders import build_encoder
from her2_kedro.modelling.torch_study import ModelInputs, build_model
from her2_kedro.pipelines.models.pipeline import create_pipeline

TASKS = {"ihc_score": {"name": "ihc_score", "target": "ihc_score"}}


def _models(**mil_overrides) -> dict:
    mil = {
        "name": "mil",
        "input": "tiles",
        "arch": "attention_mil",
        "encoder_weights": "trained",
        "init_head": "mil_cached",
        "params": {"hidden_dim": 16},
    }
    mil.update(mil_overrides)
    cached = {
        "name": "mil_cached",
        "input": "embeddings",
        "arch": "attention_mil",
        "params": {"hidden_dim": 16},
    }
    return {"mil": mil, "mil_cached": cached}


@pytest.fixture
def trained(tmp_path):
    """A trained trunk's checkpoint and a cached-embedding head trained on it (random weights)."""
    torch.manual_seed(0)
    trunk = build_encoder("resnet18")[0]
    encoder = save_checkpoint(tmp_path / "encoder.pt", trunk, "encoder", {"name": "resnet18"})
    params = {"n_classes": 4, "in_dim": 512, "hidden_dim": 16}
    head = build_attention_mil(**params)
    for p in head.parameters():  # far from any fresh initialisation
        torch.nn.init.normal_(p, std=0.3)
    path = save_checkpoint(tmp_path / "mil_cached.ihc_score.pt", head, "attention_mil", params)
    return encoder, path, head


def test_warm_started_model_scores_a_bag_as_the_head_scores_its_cached_embeddings(trained):
    encoder, head_path, head = trained
    spec = TorchModelConfig.model_validate(_models()["mil"])
    model, _ = build_model(spec, 4, ModelInputs(encoder_path=encoder, head_path=head_path))
    model.eval()
    tiles = torch.rand(5, 3, 32, 32)
    with torch.inference_mode():
        embeddings = model.encoder(tiles).flatten(1)  # what the embedding cache holds
        end_to_end = model(tiles)
        cached = head.eval()(embeddings)
    assert torch.allclose(end_to_end.logits, cached.logits, atol=1e-5)
    assert torch.allclose(end_to_end.attention, cached.attention, atol=1e-6)


def test_the_head_is_copied_and_the_trunk_kept(trained):
    encoder, head_path, head = trained
    model = build_attention_mil(4, encoder="resnet18", encoder_weights=str(encoder), hidden_dim=16)
    trunk_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    copied = load_head(model, head_path)
    assert copied == sorted(head.state_dict())  # every parameter of the head, nothing else
    for name, value in head.state_dict().items():
        assert torch.equal(model.state_dict()[name], value)
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(value, trunk_before[name])


def test_without_init_head_the_head_is_fresh(trained):
    encoder, head_path, head = trained
    spec = TorchModelConfig.model_validate(_models(init_head=None)["mil"])
    model, _ = build_model(spec, 4, ModelInputs(encoder_path=encoder, head_path=head_path))
    assert not torch.equal(model.classifier.weight, head.classifier.weight)


def test_a_head_of_another_size_or_architecture_is_refused_with_its_file(trained, tmp_path):
    encoder, head_path, _ = trained
    five = build_attention_mil(5, encoder="resnet18", encoder_weights=str(encoder), hidden_dim=16)
    with pytest.raises(CheckpointError, match=r"mil_cached\.ihc_score\.pt.*classifier\.weight"):
        load_head(five, head_path)
    wide = build_attention_mil(4, encoder="resnet18", encoder_weights=str(encoder), hidden_dim=32)
    with pytest.raises(CheckpointError, match=r"attention\.V\.0\.weight"):
        load_head(wide, head_path)
    with pytest.raises(CheckpointError, match=r"encoder\.pt: a head comes from an attention_mil"):
        load_head(wide, encoder)
    spec = TorchModelConfig.model_validate(_models()["mil"])
    with pytest.raises(ValueError, match="init_head is 'mil_cached' but no checkpoint"):
        build_model(spec, 4, ModelInputs(encoder_path=encoder))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"init_head": "clam"}, "is not a model of this study"),
        ({"init_head": "mil"}, "must be an attention_mil model on embeddings"),
        ({"encoder_weights": None}, "only an end-to-end model"),
        ({"labels": "five_class"}, "trains on labels 'task', mil on 'five_class'"),
        ({"params": {"hidden_dim": 8}}, "hidden_dim differs"),
    ],
)
def test_a_head_that_cannot_fit_is_refused_when_the_study_is_read(change, message):
    with pytest.raises(ValueError, match=message):
        TorchStudyParams.model_validate({"tasks": TASKS, "models": _models(**change)})


def test_the_pipeline_trains_the_end_to_end_model_after_the_head_it_starts_from():
    study = TorchStudyParams.model_validate({"tasks": TASKS, "models": _models()})
    pipeline = create_pipeline("mil", study)
    train = next(n for n in pipeline.nodes if n.name == "mil.ihc_score.train_model")
    assert "mil_cached.ihc_score.checkpoint" in train.inputs
    evaluate = next(n for n in pipeline.nodes if n.name == "mil.ihc_score.evaluate_model")
    assert "mil_cached.ihc_score.checkpoint" not in evaluate.inputs
    order = [n.name for n in pipeline.nodes]  # Kedro's topological order
    assert order.index("mil_cached.ihc_score.train_model") < order.index(
        "mil.ihc_score.train_model"
    )


def test_a_torchrun_job_reads_the_head_checkpoint_where_the_node_found_it(trained, tmp_path):
    import json

    import pandas as pd

    from her2_kedro.pipelines.models import torchrun_job

    encoder, head_path, _ = trained
    table = pd.DataFrame({"core_id": ["a", "b"], "split": ["train", "val"]})
    job_dir = torchrun_job.write_job(
        tmp_path / "job",
        model=_models()["mil"],
        task=TASKS["ihc_score"],
        tiles={},
        cohorts={},
        table=table,
        sources={"encoder_checkpoint": encoder, "head_checkpoint": head_path},
        mlflow={},
    )
    job = json.loads((job_dir / torchrun_job.JOB_FILE).read_text())
    sources = torchrun_job.read_sources(job_dir, job)
    assert sources["head_checkpoint"] == head_path.resolve()
    assert sources["encoder_checkpoint"] == encoder.resolve()
