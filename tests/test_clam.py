"""CLAM-SB / CLAM-MB: shapes, attention, small bags, instance pseudo-labels, loss weighting,
learning through the shared loop, seeds, checkpoints, and torchmil's binary CLAM as a reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from her2_kedro.config.mil import TrainingConfig
from her2_kedro.modelling.bags import Bag
from her2_kedro.modelling.checkpoints import load_checkpoint, save_checkpoint
from her2_kedro.modelling.clam import (
    CLAM,
    CLAMOutput,
    build_clam,
    instance_targets,
    smooth_top1_svm_loss,
)
from her2_kedro.modelling.training import train

DIM = 32
SMALL = {"in_dim": DIM, "embed_dim": 16, "attn_dim": 8}


def _bag(n: int, d: int = DIM, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _model(variant: str, n_classes: int = 4, seed: int = 0, **kw) -> CLAM:
    torch.manual_seed(seed)
    return build_clam(variant, n_classes, **{**SMALL, **kw})


def planted_bags(n_bags: int, n_classes: int, seed: int = 0) -> list[Bag]:
    """Bags of 5-10 noise tiles; two tiles of a class-c bag carry +4 on dims 8c..8c+7."""
    gen = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n_bags):
        label = i % n_classes
        n = int(torch.randint(5, 11, (1,), generator=gen))
        tiles = torch.randn(n, DIM, generator=gen)
        tiles[:2, 8 * label : 8 * label + 8] += 4.0
        bags.append(Bag(tiles, torch.zeros(n, 2), label, f"b{i}"))
    return bags


def fit_config(**kw) -> TrainingConfig:
    base = {
        "max_epochs": 30,
        "lr": 1e-3,
        "early_stopping_patience": None,
        "plateau_patience": 100,
        "selection": "last",
        "device": "cpu",
    }
    return TrainingConfig(**{**base, **kw})


def train_accuracy(model: torch.nn.Module, bags: list[Bag]) -> float:
    model.eval()
    with torch.no_grad():
        hits = [int(model(b.tiles).logits.argmax()) == b.label for b in bags]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("variant", ["sb", "mb"])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_shapes_and_attention_sums_to_one(variant: str, n_classes: int) -> None:
    model = _model(variant, n_classes).eval()
    n_branches = 1 if variant == "sb" else n_classes
    assert model.attention.w.out_features == n_branches
    assert len(model.instance_classifiers) == n_classes
    for n in (1, 7, 40):
        out = model(_bag(n, seed=n))
        assert isinstance(out, CLAMOutput)
        assert out.logits.shape == (n_classes,)
        assert out.attention.shape == (n,)
        assert out.features.shape == (n, 16)
        assert out.branch_attention.shape == (n_branches, n)
        assert torch.all(out.branch_attention >= 0)
        assert torch.allclose(out.branch_attention.sum(1), torch.ones(n_branches), atol=1e-6)
        predicted = int(out.logits.argmax()) if variant == "mb" else 0
        assert torch.equal(out.attention, out.branch_attention[predicted])


def test_default_sizes_follow_the_paper() -> None:
    model = build_clam("mb", 4)
    assert model.fc[0].weight.shape == (512, 512)
    assert model.attention.V[0].weight.shape == (256, 512)
    assert model.attention.U[0].weight.shape == (256, 512)
    assert model.fc[2].p == 0.25 and model.attention.V[2].p == 0.25
    assert [c.weight.shape for c in model.classifiers] == [(1, 512)] * 4
    assert [c.weight.shape for c in model.instance_classifiers] == [(2, 512)] * 4
    assert model.k_sample == 8 and model.bag_weight == 0.7
    assert build_clam("sb", 4).classifiers.weight.shape == (4, 512)


def test_mb_class_score_is_its_own_branch_and_classifier() -> None:
    model = _model("mb", 3).eval()
    out = model(_bag(9))
    for c in range(3):
        embedding = out.branch_attention[c] @ out.features
        assert torch.allclose(out.logits[c], model.classifiers[c](embedding)[0], atol=1e-6)


def test_bag_of_one_tile_and_batch_dim_and_bad_shapes() -> None:
    model = _model("sb").eval()
    h = _bag(1)
    out = model(h)
    assert out.attention.item() == pytest.approx(1.0)
    assert torch.allclose(out.logits, model.classifiers(model.fc(h)[0]), atol=1e-6)
    assert torch.equal(model(h[None]).logits, out.logits)
    with pytest.raises(ValueError, match=r"\(N, 32\)"):
        model(torch.randn(5, 7))
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.randn(0, DIM))
    with pytest.raises(ValueError, match="n_classes"):
        build_clam("sb", 1)
    with pytest.raises(ValueError, match="variant"):
        build_clam("xx", 2)


def test_instance_targets_top_and_bottom_k() -> None:
    attention = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])
    index, labels = instance_targets(attention, 2, in_class=True)
    assert index.tolist() == [1, 3, 2, 0] and labels.tolist() == [1, 1, 0, 0]
    index, labels = instance_targets(attention, 2, in_class=False)
    assert index.tolist() == [1, 3] and labels.tolist() == [0, 0]
    # k larger than the bag: in-class k_eff = N // 2 (no overlap), out-of-class min(k, N)
    index, labels = instance_targets(attention, 8, in_class=True)
    assert index.tolist() == [1, 3, 2, 0] and labels.tolist() == [1, 1, 0, 0]
    assert instance_targets(attention, 8, in_class=False)[0].tolist() == [1, 3, 4, 2, 0]
    # one tile: nothing to contrast in-class, one negative out-of-class
    assert instance_targets(torch.ones(1), 8, in_class=True)[0].numel() == 0
    assert instance_targets(torch.ones(1), 8, in_class=False)[0].tolist() == [0]
    # ties (uniform attention) still give disjoint top and bottom sets
    index, _ = instance_targets(torch.full((6,), 1 / 6), 8, in_class=True)
    assert len(set(index.tolist())) == 6


@pytest.mark.parametrize("variant", ["sb", "mb"])
def test_instance_classifiers_see_the_right_tiles(variant: str) -> None:
    """Crafted attention: class y's classifier gets its branch's top-k (1) and bottom-k (0); every
    other classifier c gets the top-k of branch c (MB) or of the single branch (SB) as 0."""
    n_classes, n, k, label = 3, 12, 2, 1
    model = _model(variant, n_classes, k_sample=k)
    features = _bag(n, 16, seed=5)
    gen = torch.Generator().manual_seed(9)
    n_branches = 1 if variant == "sb" else n_classes
    branch_attention = torch.softmax(torch.randn(n_branches, n, generator=gen), dim=1)
    seen: dict[int, torch.Tensor] = {}
    for c, clf in enumerate(model.instance_classifiers):
        clf.register_forward_hook(lambda m, args, out, c=c: seen.__setitem__(c, args[0]))
    loss = model.instance_loss(branch_attention, features, label)

    expected = 0.0
    for c in range(n_classes):
        branch = branch_attention[c if variant == "mb" else 0]
        order = torch.argsort(branch, descending=True).tolist()
        if c == label:
            tiles, targets = order[:k] + order[-k:], [1] * k + [0] * k
        else:
            tiles, targets = order[:k], [0] * k
        assert torch.equal(seen[c], features[tiles])
        logits = model.instance_classifiers[c](features[tiles])
        expected += F.cross_entropy(logits, torch.tensor(targets)) / n_classes
    assert torch.allclose(loss, expected, atol=1e-6)


def test_without_subtyping_only_the_true_class_is_clustered() -> None:
    model = _model("mb", 3, subtyping=False)
    called = []
    for c, clf in enumerate(model.instance_classifiers):
        clf.register_forward_hook(lambda m, a, o, c=c: called.append(c))
    out = model(_bag(10))
    model.training_loss(out, torch.tensor([2]))
    assert called == [2]
    one = model(_bag(1))
    assert model.instance_loss(one.branch_attention, one.features, 2) is None


@pytest.mark.parametrize("variant", ["sb", "mb"])
@pytest.mark.parametrize("instance_loss", ["ce", "svm"])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 20])
def test_small_bags_give_finite_loss_and_gradients(variant: str, instance_loss: str, n: int):
    model = _model(variant, 4, instance_loss=instance_loss).train()
    out = model(_bag(n, seed=n))
    loss = model.training_loss(out, torch.tensor([3]))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.instance_classifiers[0].weight.grad is not None  # out-of-class term, even n=1
    in_class = model.instance_classifiers[3].weight.grad
    assert (in_class is not None) == (n >= 2)


def test_no_instance_term_gives_the_bag_cross_entropy() -> None:
    model = _model("sb", 2, subtyping=False).eval()
    out = model(_bag(1))
    target = torch.tensor([1])
    assert torch.equal(model.training_loss(out, target), F.cross_entropy(out.logits[None], target))


@pytest.mark.parametrize("variant", ["sb", "mb"])
def test_bag_weight_mixes_bag_and_instance_losses(variant: str) -> None:
    model = _model(variant, 4, bag_weight=1.0).eval()
    out = model(_bag(11))
    target = torch.tensor([2])
    bag = F.cross_entropy(out.logits[None], target)
    assert torch.equal(model.training_loss(out, target), bag)
    model.bag_weight = 0.7
    inst = model.instance_loss(out.branch_attention, out.features, 2)
    assert torch.allclose(model.training_loss(out, target), 0.7 * bag + 0.3 * inst)


def test_smooth_top1_svm_matches_its_definition() -> None:
    logits = torch.tensor([[10.0, -10.0], [0.0, 0.0], [1.0, 3.0]])
    target = torch.tensor([0, 1, 0])
    # tau * log sum_j exp((s_j + alpha [j != y] - s_y) / tau), tau = alpha = 1
    per_bag = [
        torch.logsumexp(torch.tensor([0.0, -19.0]), 0),
        torch.logsumexp(torch.tensor([1.0, 0.0]), 0),
        torch.logsumexp(torch.tensor([0.0, 3.0]), 0),
    ]
    assert torch.allclose(smooth_top1_svm_loss(logits, target), torch.stack(per_bag).mean())
    assert smooth_top1_svm_loss(logits, target) >= 0


@pytest.mark.parametrize("variant", ["sb", "mb"])
def test_overfits_a_tiny_set_through_the_training_loop(variant: str) -> None:
    bags = planted_bags(12, 3)
    model = _model(variant, 3)
    result = train(model, bags, bags, fit_config(), progress=False)
    assert train_accuracy(model, bags) == 1.0
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_same_seed_same_weights() -> None:
    bags = planted_bags(6, 2)
    runs = []
    for _ in range(2):
        model = _model("mb", 2)
        runs.append(train(model, bags, bags, fit_config(max_epochs=2), progress=False))
    a, b = runs[0].state_dict, runs[1].state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].history == runs[1].history


@pytest.mark.parametrize("variant", ["sb", "mb"])
def test_checkpoint_round_trip(tmp_path, variant: str) -> None:
    params = {"variant": variant, "n_classes": 4, **SMALL, "instance_loss": "svm"}
    model = _model(variant, 4, instance_loss="svm")
    model.training_loss(model(_bag(6)), torch.tensor([0])).backward()
    torch.optim.Adam(model.parameters()).step()
    path = save_checkpoint(tmp_path / "clam.pt", model, "clam", params)
    loaded = load_checkpoint(path, expected_arch="clam", expected={"variant": variant})
    model.eval()
    bag = _bag(9, seed=3)
    assert torch.equal(model(bag).logits, loaded.model(bag).logits)
    assert torch.equal(model(bag).branch_attention, loaded.model(bag).branch_attention)
    assert loaded.model.instance_loss_name == "svm"


def test_agrees_with_torchmils_binary_clam_sb_given_the_same_weights() -> None:
    """torchmil's CLAM (binary, one logit) with our fc as its feature extractor and its weights
    copied into CLAM-SB: same attention, same logit difference, same tiles picked for the
    in-class (top/bottom k) and out-of-class (top k) instance classifiers."""
    from torchmil.models import CLAM_SB as TorchmilCLAM

    torch.manual_seed(0)
    feat_ext = torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.ReLU())
    ref = TorchmilCLAM(in_shape=(DIM,), att_dim=8, k_sample=3, gated=True, feat_ext=feat_ext)
    ref.eval()
    ours = _model("sb", 2, k_sample=3).eval()
    with torch.no_grad():
        ours.fc[0].load_state_dict(feat_ext[0].state_dict())
        ours.attention.V[0].load_state_dict(ref.pool.fc1.module.state_dict())
        ours.attention.U[0].load_state_dict(ref.pool.fc_gated.module.state_dict())
        ours.attention.w.weight.copy_(ref.pool.fc2.weight)
        ours.attention.w.bias.zero_()
        w, b = ref.classifier.module.weight, ref.classifier.module.bias
        ours.classifiers.weight.copy_(torch.cat([torch.zeros_like(w), w]))
        ours.classifiers.bias.copy_(torch.cat([torch.zeros_like(b), b]))
        for mine, theirs in zip(ours.instance_classifiers, ref.inst_classifiers, strict=True):
            mine.load_state_dict(theirs.module.state_dict())

    bag = _bag(10, seed=4)
    with torch.no_grad():
        logit, scores, emb = ref(bag[None], return_att=True, return_emb=True)
        out = ours(bag)
    assert torch.allclose(out.logits[1] - out.logits[0], logit[0], atol=1e-5)
    assert torch.allclose(out.attention, torch.softmax(scores[0], 0), atol=1e-6)
    assert torch.allclose(out.features, emb[0], atol=1e-6)

    def record(classifiers) -> dict[int, torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for c, clf in enumerate(classifiers):
            clf.register_forward_hook(lambda m, a, o, c=c: seen.__setitem__(c, a[0]))
        return seen

    seen_ref, seen_ours = record(ref.inst_classifiers), record(ours.instance_classifiers)
    with torch.no_grad():
        ref.compute_inst_loss(scores, emb, torch.tensor([1]))
        ours.instance_loss(out.branch_attention, out.features, 1)
    k = 3
    assert torch.allclose(seen_ref[0], seen_ours[0], atol=1e-6)  # out-of-class: top k
    assert torch.allclose(seen_ref[1][:k], seen_ours[1][:k], atol=1e-6)  # in-class: top k
    # in-class bottom k: the same tiles (torchmil lists them least attended first, we last)
    assert torch.allclose(seen_ref[1][k:], seen_ours[1][k:].flip(0), atol=1e-6)
