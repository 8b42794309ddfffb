"""The shared training loop: honesty (spy), learning, determinism, selection, plateau, early
stopping, resume after an interrupt, device choice. Tiny AttentionMIL models on random embeddings."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from her2_kedro.config.mil import TrainingConfig
from her2_kedro.modelling import training
from her2_kedro.modelling.attention import build_attention_mil
from her2_kedro.modelling.bags import Bag
from her2_kedro.modelling.checkpoints import CheckpointError, load_checkpoint
from her2_kedro.modelling.devices import resolve_device
from her2_kedro.modelling.sampling import FiveClassSampler
from her2_kedro.modelling.training import TrainingResult, train

DIM = 16
PARAMS = {"n_classes": 2, "in_dim": DIM, "hidden_dim": 8, "dropout": 0.25}  # dropout: RNG matters


class EmbeddingBags(Dataset):
    """Bags of random embeddings; class c's tiles are shifted by ``shift`` along axis c, so the
    task is separable. Records every core id it hands out."""

    def __init__(self, prefix: str, n: int, seed: int, shift: float = 2.0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            label = i % 2
            tiles = torch.randn(int(torch.randint(3, 9, (1,), generator=gen)), DIM, generator=gen)
            tiles[:, label] += shift
            self.items.append(Bag(tiles, torch.zeros(len(tiles), 2), label, f"{prefix}{i}"))
        self.seen: list[str] = []
        self.epochs: list[int] = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Bag:
        self.seen.append(self.items[index].core_id)
        return self.items[index]

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def ids(self) -> set[str]:
        return {b.core_id for b in self.items}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_attention_mil(**PARAMS)


def _config(**kw) -> TrainingConfig:
    base = {"max_epochs": 4, "early_stopping_patience": None, "plateau_patience": 20}
    return TrainingConfig(**{**base, **kw})


def _run(config: TrainingConfig, model_seed: int = 0, **kw) -> tuple[TrainingResult, nn.Module]:
    model = _model(model_seed)
    train_set, val_set = EmbeddingBags("tr", 12, 1), EmbeddingBags("va", 6, 2)
    return train(model, train_set, val_set, config, progress=False, **kw), model


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _scripted_scores(monkeypatch, scores: list[float], states: list | None = None) -> None:
    """Replace the validation step by a scripted sequence of balanced accuracies."""
    it = iter(scores)

    def fake_evaluate(model, dataset, device, **kw):
        if states is not None:
            states.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"loss": 0.0, "balanced_accuracy": next(it)}

    monkeypatch.setattr(training, "evaluate", fake_evaluate)


class SpyModel(nn.Module):
    """Wraps a model and records which core each forward pass saw, with or without gradients."""

    def __init__(self, inner: nn.Module, datasets: list[EmbeddingBags]) -> None:
        super().__init__()
        self.inner = inner
        self.lookup = {self._key(b.tiles): b.core_id for d in datasets for b in d.items}
        self.graded: list[str] = []
        self.scored: list[str] = []

    @staticmethod
    def _key(tiles: torch.Tensor) -> tuple:
        return tuple(tiles[0, :3].tolist())

    def forward(self, tiles: torch.Tensor):
        core = self.lookup[self._key(tiles)]
        graded = torch.is_grad_enabled() and self.training
        (self.graded if graded else self.scored).append(core)
        return self.inner(tiles)


def test_spy_only_training_cores_train_and_only_validation_cores_select() -> None:
    train_set, val_set = EmbeddingBags("tr", 10, 1), EmbeddingBags("va", 5, 2)
    test_set = EmbeddingBags("te", 5, 3)  # exists, but the loop has no way to receive it
    spy = SpyModel(_model(), [train_set, val_set, test_set])
    sampler = FiveClassSampler(["0", "3"] * 5, seed=4)
    result = train(spy, train_set, val_set, _config(max_epochs=3), sampler=sampler, progress=False)
    assert set(spy.graded) <= train_set.ids() and spy.graded
    assert set(spy.scored) == val_set.ids()
    assert len(spy.scored) == 3 * len(val_set)  # every validation core, once per epoch
    assert not (set(spy.graded) | set(spy.scored)) & test_set.ids()
    assert not test_set.seen
    assert train_set.epochs == [0, 1, 2] and val_set.epochs == [0, 1, 2]
    assert sampler.epoch == 2  # a fresh draw each epoch
    assert len(result.history) == 3


def test_learns_a_separable_task() -> None:
    result, model = _run(_config(max_epochs=8, lr=1e-2))
    assert result.best_val_balanced_accuracy == 1.0
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert _same_weights(result.state_dict, model.state_dict())  # the model holds the selection


def test_same_seed_same_run_different_seed_differs() -> None:
    config = _config(max_epochs=3)
    first, _ = _run(config)
    second, _ = _run(config)
    assert first.history == second.history
    assert _same_weights(first.state_dict, second.state_dict)
    assert _same_weights(first.last_state_dict, second.last_state_dict)
    other, _ = _run(_config(max_epochs=3, seed=1))
    assert other.history != first.history
    assert not _same_weights(other.last_state_dict, first.last_state_dict)


@pytest.mark.parametrize(
    ("selection", "scores", "expected"),
    [
        ("best_val", [0.5, 0.9, 0.7, 0.6], 1),
        ("best_val", [0.5, 0.8, 0.8, 0.6], 1),  # ties keep the earlier epoch
        ("last", [0.5, 0.9, 0.7, 0.6], 3),
    ],
)
def test_selection(monkeypatch, selection: str, scores: list[float], expected: int) -> None:
    states: list[dict] = []
    _scripted_scores(monkeypatch, scores, states)
    result, _ = _run(_config(max_epochs=len(scores), selection=selection))
    assert result.selected_epoch == expected
    assert result.best_epoch == scores.index(max(scores))
    assert _same_weights(result.state_dict, states[expected])
    assert _same_weights(result.last_state_dict, states[-1])


def test_plateau_lowers_the_learning_rate_after_patience(monkeypatch) -> None:
    patience, factor = 2, 0.3
    _scripted_scores(monkeypatch, [0.5] * 6)
    config = _config(max_epochs=6, plateau_patience=patience, plateau_factor=factor)
    result, _ = _run(config)
    lrs = [h["lr"] for h in result.history]
    # epoch 0 sets the best; epochs 1..patience+1 stall; the cut applies from the next epoch.
    first_cut = patience + 2
    assert lrs[:first_cut] == [config.lr] * first_cut
    assert lrs[first_cut] == pytest.approx(config.lr * factor)


def test_early_stopping_stops(monkeypatch) -> None:
    patience = 2
    _scripted_scores(monkeypatch, [0.5, 0.6] + [0.55] * 10)
    result, _ = _run(_config(max_epochs=12, early_stopping_patience=patience))
    assert result.stopped_early
    assert len(result.history) == 2 + patience  # best at epoch 1, then `patience` stalls
    assert result.selected_epoch == 1


def test_resume_after_interrupt_equals_uninterrupted(tmp_path) -> None:
    config = _config(max_epochs=5, plateau_patience=1, early_stopping_patience=3)
    sampler_ids = ["0", "3"] * 6
    full, _ = _run(config, sampler=FiveClassSampler(sampler_ids, seed=7))

    ckpt = tmp_path / "resume.pt"

    def interrupt(epoch: int, metrics: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(
            config,
            sampler=FiveClassSampler(sampler_ids, seed=7),
            on_epoch_end=interrupt,
            checkpoint_path=ckpt,
            arch="attention_mil",
            params=PARAMS,
        )
    torch.manual_seed(12345)  # the process's RNG moved on; resume must restore it
    logged: list[int] = []
    resumed, _ = _run(
        config,
        model_seed=99,
        sampler=FiveClassSampler(sampler_ids, seed=7),
        resume_from=ckpt,
        on_epoch_end=lambda e, m: logged.append(e),
    )
    assert logged == list(range(3, len(full.history)))
    assert resumed.history == full.history
    assert resumed.selected_epoch == full.selected_epoch
    assert _same_weights(resumed.state_dict, full.state_dict)
    assert _same_weights(resumed.last_state_dict, full.last_state_dict)
    # The resume checkpoint is a loadable model checkpoint too (the last epoch's weights).
    loaded = load_checkpoint(ckpt, expected_arch="attention_mil")
    assert loaded.meta["epoch"] == 2


def test_resume_refuses_different_settings(tmp_path) -> None:
    ckpt = tmp_path / "resume.pt"
    _run(_config(max_epochs=1), checkpoint_path=ckpt, arch="attention_mil", params=PARAMS)
    with pytest.raises(CheckpointError, match="lr"):
        _run(_config(max_epochs=2, lr=0.5), resume_from=ckpt)
    resumed, _ = _run(_config(max_epochs=2), resume_from=ckpt)  # a longer run may continue
    assert len(resumed.history) == 2


def test_every_epoch_reports_its_metrics() -> None:
    seen: list[tuple[int, dict]] = []
    result, _ = _run(_config(max_epochs=2), on_epoch_end=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [0, 1]
    assert [m for _, m in seen] == result.history
    for key in ("train_loss", "lr", "val_loss", "val_balanced_accuracy", "val_auroc"):
        assert key in seen[0][1]


def test_grad_accumulation_steps_once_per_group(monkeypatch) -> None:
    steps = []
    original = torch.optim.Adam.step

    def counting_step(self, *a, **kw):
        steps.append(1)
        return original(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    _run(_config(max_epochs=1, grad_accumulation=5))  # 12 bags -> groups of 5, 5, 2
    assert len(steps) == -(-12 // 5)


def test_device_auto_and_checkpoint_needs_arch(tmp_path) -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="arch"):
        _run(_config(max_epochs=1), checkpoint_path=tmp_path / "x.pt")


def test_precise_batch_norm_sets_running_statistics_from_training_items() -> None:
    from her2_kedro.modelling.batch_norm import recompute_batch_norm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    batches = [torch.randn(8, 3) * (i + 1) + i for i in range(4)]
    model.eval()
    used = recompute_batch_norm(model, batches, lambda m, x: m(x))
    assert used == 4 and not model.training  # the model's mode is restored
    with torch.no_grad():
        features = [model[0](x) for x in batches]
    means = torch.stack([f.mean(0) for f in features]).mean(0)
    variances = torch.stack([f.var(0, unbiased=True) for f in features]).mean(0)
    norm = model[1]
    assert torch.allclose(norm.running_mean, means, atol=1e-5)
    assert torch.allclose(norm.running_var, variances, atol=1e-4)
    assert norm.momentum == 0.1  # the default momentum is back


def test_precise_batch_norm_runs_after_each_epoch(monkeypatch) -> None:
    import her2_kedro.modelling.training as training

    calls = []
    real = training.recompute_batch_norm
    monkeypatch.setattr(
        training,
        "recompute_batch_norm",
        lambda model, items, forward: calls.append(real(model, items, forward)),
    )
    _run(_config(max_epochs=2, precise_bn_batches=3))
    assert calls == [3, 3]


def test_resume_refuses_a_checkpoint_of_another_number_of_processes(tmp_path) -> None:
    ckpt = tmp_path / "resume.pt"
    _run(_config(max_epochs=1), checkpoint_path=ckpt, arch="attention_mil", params=PARAMS)
    payload = torch.load(ckpt, weights_only=True)
    payload["extras"]["world_size"] = 2  # as written by rank 0 of a 2-process torchrun job
    torch.save(payload, ckpt)
    with pytest.raises(CheckpointError, match=r"resume.pt: .*processes: checkpoint 2, now 1"):
        _run(_config(max_epochs=2), resume_from=ckpt)
