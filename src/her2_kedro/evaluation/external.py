"""The external centre as scanned: the trained models applied to an evaluation-only cohort's
cores without stain normalisation, beside the normalised scores the studies wrote (the paper's
second-centre comparison: normalisation is what made its external cohort work).

The studies score normalised pixels (``cohorts.stain_normalised``); here each trained model, torch
or intensity, scores the same cores' raw pixels, one core at a time, through the same code that
scores new cores (:mod:`her2_kedro.modelling.scoring`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from her2_kedro.config import TileConfig
from her2_kedro.config.preprocessing import ThresholdConfig
from her2_kedro.evaluation.study import TASKS, class_probabilities

logger = logging.getLogger(__name__)

#: The split name of the as-scanned rows (the normalised ones stay ``external``).
UNNORMALISED_SPLIT = "external_unnormalised"


def intensity_features(
    rgb: np.ndarray,
    core_id: str,
    rule: TileConfig,
    thresholds: ThresholdConfig,
    matrix: np.ndarray | None = None,
) -> pd.DataFrame:
    """A core's intensity features (the paper's and the conventional ones), indexed by core id."""
    from her2_kedro.features.intensity import core_features
    from her2_kedro.imaging.stain import dab_channel

    _, features = core_features(rgb, core_id, rule, thresholds, dab=dab_channel(rgb, matrix))
    return pd.DataFrame([features]).set_index("core_id")


def model_version(path: Path) -> str:
    """A trained model file's version: the training run it records, else its content hash."""
    if path.suffix == ".json":
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    from her2_kedro.modelling.checkpoints import read_checkpoint

    run = (read_checkpoint(path).get("extras") or {}).get("run_id")
    if run:
        return f"run:{run}"
    from her2_kedro.modelling.checkpoints import checkpoint_sha256

    return "sha256:" + checkpoint_sha256(path)[:12]


def score_as_scanned(
    cores: pd.DataFrame,
    images: Mapping[str, Callable[[], bytes]],
    models: Mapping[tuple[str, str], Path],
    rule: TileConfig,
    thresholds: ThresholdConfig,
    encoder_path: Path | None = None,
    done: pd.DataFrame | None = None,
    matrix: np.ndarray | None = None,
    device: str = "cpu",
) -> pd.DataFrame:
    """Predictions rows (as ``predictions.parquet``, split ``external_unnormalised``) of every
    ``(model, task) -> file`` in ``models`` on the raw pixels of ``cores`` (``core_id, image,
    five_class`` and the tasks' label columns).

    Rows of ``done`` whose model version and core are unchanged are kept instead of recomputed.
    """
    from her2_kedro.features.preprocess import decode_rgb
    from her2_kedro.modelling.bags import EmptyBagError
    from her2_kedro.modelling.intensity_lr import IntensityModel
    from her2_kedro.modelling.scoring import load_encoder, load_trained, score_core

    versions = {key: model_version(path) for key, path in models.items()}
    kept: list[pd.DataFrame] = []
    todo = dict(models)
    if done is not None and not done.empty and "model_version" in done.columns:
        for key in list(todo):
            mine = done[(done["model"] == key[0]) & (done["task"] == key[1])]
            if set(mine["model_version"]) == {versions[key]} and set(mine["core_id"]) == set(
                cores["core_id"]
            ):
                kept.append(mine)
                del todo[key]
    if not todo or cores.empty:
        return pd.concat(kept, ignore_index=True) if kept else pd.DataFrame()
    torch_models = {
        k: load_trained(p, k[1], versions[k]) for k, p in todo.items() if p.suffix == ".pt"
    }
    linear = {
        k: IntensityModel.from_json(p.read_text()) for k, p in todo.items() if p.suffix == ".json"
    }
    encoder = None
    if any(m.spec.input == "embeddings" for m in torch_models.values()):
        if encoder_path is None:
            raise FileNotFoundError("models on embeddings need the trained encoder (encoder.pt)")
        encoder = load_encoder(encoder_path)
    rows = []
    for core in tqdm(cores.to_dict("records"), desc="external cores as scanned", unit="core"):
        image = images[core["image"]]()
        embedded: dict[str, dict] = {}
        try:
            probabilities = {
                key: score_core(trained, core["core_id"], image, None, encoder, device, embedded)[0]
                for key, trained in torch_models.items()
            }
        except EmptyBagError:  # tissue found only after normalisation: nothing to score raw
            logger.warning("%s: no tissue tile as scanned, left out", core["core_id"])
            continue
        if linear:
            features = intensity_features(
                decode_rgb(image), core["core_id"], rule, thresholds, matrix
            )
            if not np.isfinite(features["max_mean_dab"].to_numpy(dtype=float)).all():
                logger.warning("%s: no tissue tile as scanned, left out", core["core_id"])
                continue
            for key, model in linear.items():
                probabilities[key] = class_probabilities(model, features, TASKS[key[1]])[0][0]
        for (model, task), proba in probabilities.items():
            classes = TASKS[task].classes
            row = {
                "model": model,
                "task": task,
                "core_id": core["core_id"],
                "split": UNNORMALISED_SPLIT,
                "five_class": core["five_class"],
                "y_true": int(core[TASKS[task].target]),
                "y_pred": int(classes[int(np.argmax(proba))]),
                "model_version": versions[(model, task)],
            }
            row.update({f"p_{c}": float(p) for c, p in zip(classes, proba, strict=True)})
            rows.append(row)
    return pd.concat([*kept, pd.DataFrame(rows)], ignore_index=True)
