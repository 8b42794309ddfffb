"""torchmil aggregators (TransMIL, DSMIL) behind our interface: n_classes logits, attention summing
to 1, small bags, DSMIL's two-stream loss, learning through the shared loop, seeds, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from her2_kedro.modelling.aggregators import DSMILOutput, TorchmilAggregator
from her2_kedro.modelling.checkpoints import load_checkpoint, save_checkpoint
from her2_kedro.modelling.training import train
from tests.test_clam import DIM, fit_config, planted_bags

KWARGS = {"transmil": {"att_dim": 16, "n_heads": 2}, "dsmil": {"att_dim": 16}}
NAMES = sorted(KWARGS)


def _bag(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


def _params(name: str, n_classes: int) -> dict:
    return {"name": name, "n_classes": n_classes, "in_dim": DIM, **KWARGS[name]}


def _model(name: str, n_classes: int = 4, seed: int = 0) -> TorchmilAggregator:
    torch.manual_seed(seed)
    return TorchmilAggregator(**_params(name, n_classes))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_classes", [2, 4])
def test_n_classes_logits_and_attention_sums_to_one(name: str, n_classes: int) -> None:
    model = _model(name, n_classes).eval()
    for n in (1, 2, 3, 7, 20):
        out = model(_bag(n, seed=n))
        assert out.logits.shape == (n_classes,)
        assert out.attention.shape == (n,)
        assert torch.all(out.attention >= 0)
        assert torch.isclose(out.attention.sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(model(_bag(6)[None]).logits, model(_bag(6)).logits)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_refused(name: str) -> None:
    model = _model(name)
    with pytest.raises(ValueError, match=r"\(N, 32\)"):
        model(torch.randn(5, 7))
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.randn(0, DIM))
    with pytest.raises(ValueError, match="n_classes"):
        TorchmilAggregator(name, 1, DIM)
    with pytest.raises(ValueError, match="unknown"):
        TorchmilAggregator("abmil", 2, DIM)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_small_bags_give_finite_loss_and_gradients(name: str, n: int) -> None:
    model = _model(name).train()
    loss = model.training_loss(model(_bag(n, seed=n)), torch.tensor([2]))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_dsmil_streams_attention_and_loss() -> None:
    model = _model("dsmil", 3).eval()
    bag = _bag(9)
    out = model(bag)
    assert isinstance(out, DSMILOutput)
    inner = model.model
    instance_logits = inner.inst_classifier(bag)  # (N, 3)
    assert torch.allclose(out.max_instance_logits, instance_logits.max(0).values, atol=1e-6)
    assert torch.allclose(out.logits, 0.5 * (out.bag_logits + out.max_instance_logits))
    # the attention shown is the predicted class's: queries matched with its critical instance
    c = int(out.logits.argmax())
    q = inner.q_nn(bag)
    critical = int(instance_logits[:, c].argmax())
    expected = torch.softmax(q @ q[critical] / q.shape[1] ** 0.5, dim=0)
    assert torch.allclose(out.attention, expected, atol=1e-6)
    target = torch.tensor([1])
    loss = 0.5 * (
        F.cross_entropy(out.bag_logits[None], target)
        + F.cross_entropy(out.max_instance_logits[None], target)
    )
    assert torch.allclose(model.training_loss(out, target), loss)


def test_transmil_loss_is_cross_entropy() -> None:
    model = _model("transmil", 3).eval()
    out = model(_bag(5))
    target = torch.tensor([0])
    assert torch.equal(model.training_loss(out, target), F.cross_entropy(out.logits[None], target))


@pytest.mark.parametrize("name", NAMES)
def test_overfits_a_tiny_set_through_the_training_loop(name: str) -> None:
    bags = planted_bags(12, 3)
    model = _model(name, 3)
    result = train(model, bags, bags, fit_config(), progress=False)
    model.eval()
    with torch.no_grad():
        hits = [int(model(b.tiles).logits.argmax()) == b.label for b in bags]
    assert all(hits)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_weights(name: str) -> None:
    bags = planted_bags(6, 2)
    runs = [
        train(_model(name, 2), bags, bags, fit_config(max_epochs=2), progress=False)
        for _ in range(2)
    ]
    a, b = runs[0].state_dict, runs[1].state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(tmp_path, name: str) -> None:
    model = _model(name, 4)
    model.training_loss(model(_bag(6)), torch.tensor([0])).backward()
    torch.optim.Adam(model.parameters()).step()
    path = save_checkpoint(tmp_path / f"{name}.pt", model, "torchmil", _params(name, 4))
    loaded = load_checkpoint(path, expected_arch="torchmil", expected={"name": name})
    model.eval()
    bag = _bag(9, seed=3)
    assert torch.equal(model(bag).logits, loaded.model(bag).logits)
    assert torch.equal(model(bag).attention, loaded.model(bag).attention)
