"""Models trained on the five classes (``labels: five_class``) and judged on the task's classes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from her2_kedro.config import TorchModelConfig, TrainingConfig
from her2_kedro.evaluation.metrics import classification_metrics
from her2_kedro.evaluation.study import TASKS
from her2_kedro.modelling.torch_study import (
    FIVE_CLASS_TASK,
    ModelInputs,
    class_map,
    fit,
    output_names,
    task_probabilities,
)
from her2_kedro.modelling.training import evaluate
from her2_kedro.schema import FIVE_CLASSES, SCORE_OF_CLASS, STATUS_OF_CLASS


def _spec(labels: str, **training) -> TorchModelConfig:
    return TorchModelConfig(
        name="m",
        input="embeddings",
        arch="attention_mil",
        labels=labels,
        training=TrainingConfig(**training),
    )


@pytest.mark.parametrize(
    ("task", "of_class"), [("ihc_score", SCORE_OF_CLASS), ("her2_status", STATUS_OF_CLASS)]
)
def test_class_map_sends_each_of_the_five_classes_to_its_task_class(task, of_class):
    mapping = class_map(_spec("five_class"), TASKS[task])
    assert mapping.shape == (5, len(TASKS[task].classes))
    assert (mapping.sum(axis=1) == 1).all()
    for i, name in enumerate(FIVE_CLASSES):
        assert TASKS[task].classes[mapping[i].argmax()] == of_class[name]
    assert output_names(_spec("five_class"), TASKS[task]) == list(FIVE_CLASSES)
    # the paper's way, and the encoder's own five-class task, need no map
    assert class_map(_spec("task"), TASKS[task]) is None
    assert class_map(_spec("five_class"), FIVE_CLASS_TASK) is None


def test_task_probabilities_sum_the_five_classes_into_the_task():
    proba = np.array([[0.1, 0.2, 0.3, 0.25, 0.15], [0.0, 0.0, 0.5, 0.5, 0.0]])
    status = task_probabilities(proba, _spec("five_class"), TASKS["her2_status"])
    np.testing.assert_allclose(status, [[0.6, 0.4], [0.5, 0.5]])
    score = task_probabilities(proba, _spec("five_class"), TASKS["ihc_score"])
    np.testing.assert_allclose(score, [[0.1, 0.2, 0.55, 0.15], [0.0, 0.0, 1.0, 0.0]])
    np.testing.assert_array_equal(
        task_probabilities(proba[:, :2], _spec("task"), TASKS["her2_status"]), proba[:, :2]
    )


class _Fixed(torch.nn.Module):
    """Returns the bag's single 'tile' as its logits: validation metrics that can be worked out."""

    def forward(self, tiles):
        return type("Out", (), {"logits": tiles.reshape(1, -1)})()


def test_validation_scores_the_mapped_classes_and_keeps_the_model_loss():
    from her2_kedro.modelling.bags import Bag

    logits = torch.tensor(
        [[5.0, 0, 0, 0, 0], [0, 0, 5.0, 0, 0], [0, 0, 0, 5.0, 0], [0, 0, 0, 0, 5.0]]
    )
    five = [1, 3, 3, 4]  # truths: 1, 2+, 2+, 3; predicted 0, 2-, 2+, 3
    bags = [
        Bag(row.reshape(1, -1), torch.zeros(1, 2), five[i], f"c{i}") for i, row in enumerate(logits)
    ]
    mapping = class_map(_spec("five_class"), TASKS["her2_status"])
    mapped = evaluate(_Fixed(), bags, torch.device("cpu"), bf16=False, class_map=mapping)
    plain = evaluate(_Fixed(), bags, torch.device("cpu"), bf16=False)
    assert mapped["loss"] == pytest.approx(plain["loss"])  # the model's own five-class loss
    proba = torch.softmax(logits, 1).numpy() @ mapping
    expected = classification_metrics([0, 1, 1, 1], proba.argmax(1), proba, labels=[0, 1])
    assert mapped["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert mapped["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert plain["balanced_accuracy"] == pytest.approx((0 + 1 / 2 + 1) / 3)  # five classes


def _cohort(n_per_class: int = 4, dim: int = 8):
    """Embedding bags whose tiles point along their class's axis; 0 and 1 share one, so only the
    status (both negative) is separable, not the five classes."""
    rng = np.random.default_rng(0)
    rows, entries = [], {}
    for k, name in enumerate(FIVE_CLASSES):
        for j in range(n_per_class):
            core = f"{name}_{j}"
            tiles = rng.normal(0, 0.1, size=(3, dim)).astype(np.float32)
            tiles[:, max(k, 1)] += 2.0
            entries[core] = lambda t=tiles: {"embeddings": t, "coords": np.zeros((3, 2))}
            rows.append(
                {
                    "core_id": core,
                    "split": "val" if j == 0 else "train",
                    "five_class": name,
                    "five_class_index": k,
                    "y": STATUS_OF_CLASS[name],
                }
            )
    return pd.DataFrame(rows), ModelInputs(embeddings=entries, embedding_dim=dim)


def test_fit_on_five_classes_learns_the_task_and_selects_on_it():
    rows, inputs = _cohort()
    spec = _spec(
        "five_class", max_epochs=15, lr=1e-2, early_stopping_patience=None, selection="last"
    )
    model, result, params = fit(spec, rows, TASKS["her2_status"], inputs, progress=False)
    assert params["n_classes"] == 5 and model.classifier.out_features == 5
    # each epoch's validation metric is the status one, worked out from the five-class outputs
    val = rows[rows["split"] == "val"]
    with torch.inference_mode():
        five = np.concatenate(
            [
                torch.softmax(
                    model(torch.from_numpy(inputs.embeddings[c]()["embeddings"])).logits.reshape(
                        1, -1
                    ),
                    1,
                ).numpy()
                for c in val["core_id"]
            ]
        )
    status = task_probabilities(five, spec, TASKS["her2_status"])
    expected = classification_metrics(val["y"], status.argmax(1), status, labels=[0, 1])
    last = result.history[-1]
    assert last["val_balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert last["val_balanced_accuracy"] == 1.0  # it learned: 2- apart from 2+, 0 and 1 negative
