"""Gated-attention MIL: shapes, attention, invariances, end-to-end gradients, learning, seeds."""

from __future__ import annotations

import pytest
import torch

from her2_kedro.modelling.attention import AttentionMIL, GatedAttention, build_attention_mil


def _bag(n: int, d: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_gated_attention_layer_sizes() -> None:
    layer = GatedAttention()
    assert layer.V[0].weight.shape == (256, 512)
    assert layer.U[0].weight.shape == (256, 512)
    assert layer.w.weight.shape == (1, 256)
    assert isinstance(layer.V[1], torch.nn.Tanh) and isinstance(layer.U[1], torch.nn.Sigmoid)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_shapes_and_attention_sums_to_one(n_classes: int) -> None:
    model = AttentionMIL(n_classes)
    assert model.classifier.weight.shape == (n_classes, 512)
    for n in (1, 7, 40):
        logits, attention = model(_bag(n, seed=n))
        assert logits.shape == (n_classes,)
        assert attention.shape == (n,)
        assert torch.all(attention >= 0)
        assert torch.isclose(attention.sum(), torch.tensor(1.0), atol=1e-6)


def test_bag_of_one_tile_is_that_tile() -> None:
    model = AttentionMIL(3)
    h = _bag(1)
    logits, attention = model(h)
    assert attention.item() == pytest.approx(1.0)
    assert torch.allclose(logits, model.classifier(h[0]), atol=1e-6)


def test_bag_output_is_permutation_invariant() -> None:
    model = AttentionMIL(4)
    h = _bag(23)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(3))
    logits, attention = model(h)
    logits_p, attention_p = model(h[perm])
    assert torch.allclose(logits, logits_p, atol=1e-5)
    assert torch.allclose(attention[perm], attention_p, atol=1e-6)


def test_leading_batch_of_one_is_accepted_and_bad_shapes_refused() -> None:
    model = AttentionMIL(2)
    h = _bag(5)
    assert torch.allclose(model(h[None]).logits, model(h).logits)
    with pytest.raises(ValueError, match=r"\(N, 512\)"):
        model(torch.randn(5, 100))
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.randn(0, 512))
    with pytest.raises(ValueError, match="no encoder"):
        model(torch.rand(2, 3, 32, 32))


def test_end_to_end_gradient_reaches_the_encoder() -> None:
    torch.manual_seed(0)
    model = build_attention_mil(2, encoder="resnet18", micro_batch=3, grad_checkpoint=True)
    model.train()
    logits, attention = model(torch.rand(5, 3, 32, 32))
    assert logits.shape == (2,) and attention.shape == (5,)
    torch.nn.functional.cross_entropy(logits[None], torch.tensor([1])).backward()
    grad = model.encoder.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_micro_batches_match_one_batch_in_eval() -> None:
    torch.manual_seed(0)
    model = build_attention_mil(3, encoder="resnet18", micro_batch=64).eval()
    tiles = torch.rand(7, 3, 32, 32)
    with torch.no_grad():
        whole = model(tiles)
        model.micro_batch = 3
        parts = model(tiles)
    assert torch.allclose(whole.logits, parts.logits, atol=1e-5)
    assert torch.allclose(whole.attention, parts.attention, atol=1e-6)


def test_checkpointing_matches_plain_forward_and_gradients_in_training() -> None:
    torch.manual_seed(0)
    model = build_attention_mil(3, encoder="resnet18", micro_batch=3).train()
    tiles = torch.rand(7, 3, 32, 32)
    target = torch.tensor([2])
    results = []
    for use_ckpt in (False, True):
        model.grad_checkpoint = use_ckpt
        model.zero_grad()
        logits = model(tiles).logits
        torch.nn.functional.cross_entropy(logits[None], target).backward()
        results.append((logits.detach(), model.encoder.conv1.weight.grad.clone()))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-5)
    assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-6)


def _synthetic_bags(n_bags: int, n_classes: int, d: int, seed: int):
    """Bags of noise where a few tiles carry the class's direction (the others are distractors)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_classes, d, generator=g)
    bags, labels = [], []
    for i in range(n_bags):
        label = i % n_classes
        n = int(torch.randint(6, 14, (1,), generator=g))
        h = torch.randn(n, d, generator=g)
        k = int(torch.randint(1, 4, (1,), generator=g))
        h[:k] += 3 * directions[label]
        bags.append(h[torch.randperm(n, generator=g)])
        labels.append(label)
    return bags, torch.tensor(labels)


def _train(seed: int, steps: int, bags, labels, d: int) -> tuple[AttentionMIL, list[float]]:
    torch.manual_seed(seed)
    model = AttentionMIL(int(labels.max()) + 1, in_dim=d)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-8)
    losses = []
    for step in range(steps):
        i = step % len(bags)
        loss = torch.nn.functional.cross_entropy(model(bags[i]).logits[None], labels[i : i + 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def _accuracy(model: AttentionMIL, bags, labels) -> float:
    with torch.no_grad():
        preds = torch.stack([model(h).logits.argmax() for h in bags])
    return (preds == labels).float().mean().item()


def test_overfits_a_tiny_synthetic_set() -> None:
    d = 64
    bags, labels = _synthetic_bags(8, 4, d, seed=5)
    model, _ = _train(0, 0, bags, labels, d)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-8)
    accuracy = _accuracy(model, bags, labels)
    for _epoch in range(40):  # at most 320 steps; stops once every bag is right
        if accuracy == 1.0:
            break
        for h, y in zip(bags, labels, strict=True):
            loss = torch.nn.functional.cross_entropy(model(h).logits[None], y[None])
            opt.zero_grad()
            loss.backward()
            opt.step()
        accuracy = _accuracy(model, bags, labels)
    assert accuracy == 1.0


def test_training_is_deterministic_with_a_seed() -> None:
    d = 32
    bags, labels = _synthetic_bags(4, 2, d, seed=1)
    m1, losses1 = _train(7, 12, bags, labels, d)
    m2, losses2 = _train(7, 12, bags, labels, d)
    m3, losses3 = _train(8, 12, bags, labels, d)
    assert losses1 == losses2
    assert losses1 != losses3
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_dropout_is_off_by_default_and_active_when_set() -> None:
    h = _bag(9)
    model = AttentionMIL(2).train()
    assert torch.equal(model(h).logits, model(h).logits)
    noisy = AttentionMIL(2, dropout=0.5).train()
    assert not torch.equal(noisy(h).logits, noisy(h).logits)
    noisy.eval()
    assert torch.equal(noisy(h).logits, noisy(h).logits)
