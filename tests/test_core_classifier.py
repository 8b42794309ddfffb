"""The whole-core ResNet classifier: output, learning through the shared training loop (overfits a
tiny synthetic set), determinism, checkpoint round trip, local trunk weights, config. ResNet18 at
32 px on a dozen tiny cores so it runs in seconds on a CPU."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from her2_kedro.config.mil import TrainingConfig
from her2_kedro.config.models import ImageConfig, TorchModelConfig
from her2_kedro.modelling.checkpoints import load_checkpoint, save_checkpoint
from her2_kedro.modelling.core_classifier import (
    ClassifierOutput,
    CoreClassifier,
    build_core_classifier,
)
from her2_kedro.modelling.core_images import CoreImageDataset
from her2_kedro.modelling.encoders import build_encoder
from her2_kedro.modelling.training import evaluate, train

SIZE = 64
PARAMS = {"n_classes": 4, "encoder": "resnet18", "encoder_weights": None}
#: IHC score (the target) -> five-class label the sampler balances on.
FIVE_OF_SCORE = {0: "0", 1: "1", 2: "2+", 3: "3"}


def _pattern(score: int, rng: np.random.Generator) -> np.ndarray:
    """A grey core whose class is its pattern: horizontal or vertical stripes, a checkerboard or
    diagonal stripes (period 8 px, random phase, noise); every class has the same mean and spread,
    so only the structure tells them apart. Flips keep each class recognisable."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    phase = rng.integers(0, 8)
    bands = {
        0: (y + phase) // 4,
        1: (x + phase) // 4,
        2: (x + phase) // 4 + (y + phase) // 4,
        3: (x + y + phase) // 4,
    }[score] % 2
    grey = 60 + 140 * bands + rng.normal(0, 10, bands.shape)
    return np.clip(np.repeat(grey[..., None], 3, axis=2), 0, 255).astype(np.uint8)


def _cohort(per_class: int = 4, seed: int = 0):
    """``per_class`` patterned cores of each IHC score, as PNG bytes behind loaders."""
    rng = np.random.default_rng(seed)
    scores = [s for s in range(4) for _ in range(per_class)]
    data = {}
    for i, score in enumerate(scores):
        buf = io.BytesIO()
        Image.fromarray(_pattern(score, rng)).save(buf, "PNG")
        data[f"core{i}.png"] = buf.getvalue()
    rows = pd.DataFrame(
        {
            "core_id": [f"c{i}" for i in range(len(scores))],
            "image": list(data),
            "five_class": [FIVE_OF_SCORE[s] for s in scores],
            "ihc_score": scores,
        }
    )
    return rows, {name: (lambda b=b: b) for name, b in data.items()}


def _datasets(batch_size: int = 4):
    rows, cores = _cohort()
    common = {"target": "ihc_score", "input_size": SIZE, "seed": 1, "batch_size": batch_size}
    return (
        CoreImageDataset(rows, cores, train=True, **common),
        CoreImageDataset(rows, cores, train=False, **common),
    )


def _model(seed: int = 0, **kw) -> CoreClassifier:
    torch.manual_seed(seed)
    return build_core_classifier(**{**PARAMS, **kw})


def _config(**kw) -> TrainingConfig:
    base = {
        "lr": 1e-3,
        "max_epochs": 2,
        "device": "cpu",
        "selection": "last",
        "early_stopping_patience": None,
        "plateau_patience": 100,
    }
    return TrainingConfig(**{**base, **kw})


@pytest.mark.parametrize("channels_last", [True, False])
def test_output_shape(channels_last: bool) -> None:
    model = _model(channels_last=channels_last).eval()
    out = model(torch.rand(3, 3, SIZE, SIZE))
    assert isinstance(out, ClassifierOutput) and out.attention is None
    assert out.logits.shape == (3, 4)
    assert model(torch.rand(3, SIZE, SIZE)).logits.shape == (1, 4)
    with pytest.raises(ValueError, match="expected images"):
        model(torch.rand(2, 1, SIZE, SIZE))


def test_overfits_a_tiny_set_through_the_training_loop() -> None:
    """16 patterned cores, 4 classes: the selected epoch classifies every training core right in
    eval mode (the validation set *is* the training cores, so best_val picks the first epoch that
    does; early stopping ends the run a few epochs after). 64 px rather than 32: at 32 px the last
    ResNet stage is 1x1, and BatchNorm over a batch of 4 cores then makes eval-mode predictions
    (running statistics) lag far behind the training-mode ones."""
    train_data, eval_data = _datasets()
    model = _model()
    config = _config(max_epochs=25, selection="best_val", early_stopping_patience=6)
    result = train(model, train_data, eval_data, config, progress=False)
    assert result.best_val_balanced_accuracy == 1.0, [
        h["val_balanced_accuracy"] for h in result.history
    ]
    metrics = evaluate(model, eval_data, torch.device("cpu"))
    assert metrics["balanced_accuracy"] == 1.0 and metrics["loss"] < 0.5
    losses = [h["train_loss"] for h in result.history]
    assert min(losses[-5:]) < 0.5 * losses[0]


def test_training_is_deterministic_with_a_seed() -> None:
    states = []
    for _ in range(2):
        train_data, eval_data = _datasets()
        model = _model(seed=7)
        states.append(train(model, train_data, eval_data, _config(), progress=False).state_dict)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], v) for k, v in _model(seed=7).state_dict().items())


def test_checkpoint_round_trip(tmp_path) -> None:
    model = _model(seed=3)
    model.train()
    model(torch.rand(4, 3, SIZE, SIZE))  # moves BatchNorm running statistics off their defaults
    model.eval()
    path = save_checkpoint(tmp_path / "core.pt", model, "core_classifier", PARAMS, task="ihc_score")
    loaded = load_checkpoint(path, expected_arch="core_classifier", expected={"n_classes": 4})
    assert isinstance(loaded.model, CoreClassifier)
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        assert torch.equal(model(x).logits, loaded.model(x).logits)


def test_encoder_weights_from_a_local_trunk_checkpoint(tmp_path) -> None:
    torch.manual_seed(11)
    trunk, _ = build_encoder("resnet18")
    path = tmp_path / "trunk.pt"
    torch.save(trunk.state_dict(), path)
    model = _model(seed=0, encoder_weights=str(path))
    for key, value in trunk.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    # a checkpoint of it rebuilds without the trunk file (the state dict carries the weights)
    saved = save_checkpoint(
        tmp_path / "m.pt", model, "core_classifier", {**PARAMS, "encoder_weights": str(path)}
    )
    path.unlink()
    loaded = load_checkpoint(saved).model
    assert torch.equal(loaded.encoder.conv1.weight, trunk.conv1.weight)


def test_config_defaults_and_limits() -> None:
    spec = TorchModelConfig(name="resnet34", input="core_image", arch="core_classifier")
    assert (spec.encoder, spec.encoder_weights, spec.image.input_size) == (None, None, 128)
    assert (spec.image.batch_size, spec.image.flips, spec.image.cache) == (32, True, True)
    with pytest.raises(ValidationError):
        ImageConfig(batch_size=1)
    with pytest.raises(ValidationError):
        ImageConfig(input_sise=64)


def test_trunk_follows_the_trained_encoder_unless_named(tmp_path) -> None:
    from her2_kedro.modelling.encoders import build_encoder
    from her2_kedro.modelling.torch_study import ModelInputs, build_model

    trunk, _ = build_encoder("resnet18", None)
    path = save_checkpoint(tmp_path / "encoder.pt", trunk, "encoder", {"name": "resnet18"})
    inputs = ModelInputs(encoder_path=path)
    spec = TorchModelConfig(
        name="mil", input="tiles", arch="attention_mil", encoder_weights="trained"
    )
    model, params = build_model(spec, 2, inputs)
    assert params["encoder"] == "resnet18"
    assert torch.equal(model.encoder.conv1.weight, trunk.conv1.weight)
    # without trained weights the default trunk is the paper's ResNet34
    _, params = build_model(spec.model_copy(update={"encoder_weights": None}), 2, inputs)
    assert params["encoder"] == "resnet34"
    # a trunk named explicitly that does not match the trained one fails, naming the file
    named = spec.model_copy(update={"encoder": "resnet34"})
    with pytest.raises(Exception, match="encoder.pt"):
        build_model(named, 2, inputs)
