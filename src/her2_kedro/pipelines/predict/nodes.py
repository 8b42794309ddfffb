"""Thin node of ``predict``: QC the inbox, prepare each core as in training, call the trained
models for both tasks and the intensity baseline, draw a heatmap per core."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from her2_kedro.config import (
    TORCH_STUDIES,
    ImageChecks,
    PredictParams,
    PreprocessingParams,
    TileConfig,
)

logger = logging.getLogger(__name__)

TASK_NAMES = ("ihc_score", "her2_status")
#: Rows of ``inbox_predictions.csv``, in order.
COLUMNS = [
    "core_id",
    "source_file",
    "content_hash",
    "ihc_score",
    *[f"p_score_{c}" for c in range(4)],
    "her2_status",
    "p_her2_positive",
    "score_model",
    "score_model_version",
    "status_model",
    "status_model_version",
    "intensity_ihc_score",
    "intensity_her2_status",
    "intensity_p_her2_positive",
    "intensity_model_version",
    "normalised",
    "seconds",
    "scored_at",
]


def _family_of(model: str) -> str:
    """The pipeline that trains ``model`` (for the message when it has not been trained)."""
    from her2_kedro.pipelines.models import declared_torch_study

    for family in TORCH_STUDIES:
        study = declared_torch_study(family)
        if study is not None and model in study.models:
            return family
    return "intensity" if model.startswith("intensity") else "mil"


def _trained_file(models: Mapping[str, Path], name: str, task: str, suffix: str) -> Path:
    path = models.get(f"{name}.{task}{suffix}")
    if path is None:
        raise FileNotFoundError(
            f"No trained model {name!r} for {task} in data/06_models ({name}.{task}{suffix}): "
            f"run `kedro run --pipelines={_family_of(name)}` first"
        )
    return path


def _calls_of(previous: pd.DataFrame | None) -> dict[str, dict]:
    if previous is None or previous.empty:
        return {}
    return {str(r["core_id"]): r for r in previous.to_dict("records")}


@dataclass(frozen=True, eq=False)
class _Scoring:
    """What scoring one inbox core needs, as plain data (it travels to Dask workers): where the
    trained models are, the settings, and the stain reference."""

    models: tuple[tuple[str, str, str | None], ...]  # (task, checkpoint path, registry version)
    encoder: str | None  # the features pipeline's encoder, loaded for models on embeddings
    intensity: tuple[tuple[str, str], ...]  # (task, JSON path)
    reference: Any
    tiles: dict[str, Any]
    preprocessing: dict[str, Any]
    predict: dict[str, Any]
    device: str

    def cache_key(self) -> tuple:
        """The models' files as they are now (a retrained model is loaded afresh)."""
        files = [p for _, p, _ in self.models] + [p for _, p in self.intensity]
        files += [self.encoder] if self.encoder else []
        return tuple((f, Path(f).stat().st_mtime_ns) for f in files)


#: The models this process loaded last, by the files' state and the device.
_LOADED: dict[tuple, dict[str, Any]] = {}


def _loaded(scoring: _Scoring) -> dict[str, Any]:
    """The trained models of ``scoring``, loaded once per process (a Dask worker, or the node's)
    and again only when a model file changes."""
    from her2_kedro.modelling.intensity_lr import IntensityModel
    from her2_kedro.modelling.scoring import load_encoder, load_trained

    key = (scoring.models, scoring.cache_key(), scoring.device)
    if key in _LOADED:
        return _LOADED[key]
    models = {
        task: load_trained(Path(path), task, version) for task, path, version in scoring.models
    }
    on_embeddings = any(m.spec.input == "embeddings" for m in models.values())
    intensity = {}
    for task, path in scoring.intensity:
        text = Path(path).read_text()
        intensity[task] = (
            IntensityModel.from_json(text),
            hashlib.sha256(text.encode()).hexdigest(),
        )
    encoder = load_encoder(Path(scoring.encoder)) if scoring.encoder and on_embeddings else None
    _LOADED.clear()  # one set of models per process
    _LOADED[key] = {"models": models, "intensity": intensity, "encoder": encoder}
    return _LOADED[key]


def _score_one(core: Any, scoring: _Scoring) -> tuple[dict[str, Any], Any]:
    """One inbox core's row of calls and its heatmap panel (None without heatmaps)."""
    from her2_kedro.features.intensity import core_features
    from her2_kedro.features.preprocess import decode_rgb
    from her2_kedro.imaging.normalisation import cohort_normaliser
    from her2_kedro.imaging.stain import dab_channel, stain_matrix
    from her2_kedro.modelling.scoring import score_core
    from her2_kedro.reporting.heatmaps import task_panel
    from her2_kedro.tma.inbox import INBOX

    loaded = _loaded(scoring)
    models, intensity = loaded["models"], loaded["intensity"]
    config = PredictParams.model_validate(scoring.predict)
    rule = TileConfig.model_validate(scoring.tiles)
    prep = PreprocessingParams.model_validate(scoring.preprocessing)
    normalise = None
    if config.stain_normalise:
        normalise = cohort_normaliser(scoring.reference, [INBOX], rule.background_grey)
    matrix = None if prep.stain_matrix == "skimage_hed" else stain_matrix(prep.stain_matrix)
    start = time.perf_counter()
    image = core.load()
    rgb = decode_rgb(image)
    if normalise is not None:
        rgb = normalise({"core_id": core.core_id, "cohort": INBOX}, rgb)
    transform = None if normalise is None else (lambda _row, _rgb, done=rgb: done)
    row: dict[str, Any] = {
        "core_id": core.core_id,
        "source_file": core.source_file,
        "content_hash": core.content_hash,
        "normalised": normalise is not None,
    }
    per_task = {}
    for task, trained in models.items():
        proba, tiles_attention = score_core(
            trained, core.core_id, image, transform, loaded["encoder"], scoring.device
        )
        per_task[task] = tiles_attention
        if task == "ihc_score":
            row["ihc_score"] = int(np.argmax(proba))
            row.update({f"p_score_{c}": float(proba[c]) for c in range(4)})
            row["score_model"], row["score_model_version"] = trained.name, trained.version
        else:
            row["her2_status"] = int(np.argmax(proba))
            row["p_her2_positive"] = float(proba[1])
            row["status_model"], row["status_model_version"] = trained.name, trained.version
    if intensity:
        dab = dab_channel(rgb, matrix)
        _, features = core_features(rgb, core.core_id, rule, prep.intensity_thresholds, dab=dab)
        frame = pd.DataFrame([features]).set_index("core_id")
        digests = []
        for task, (model, digest) in intensity.items():
            digests.append(digest[:8])
            proba = model.predict_proba(frame)[0]
            classes = [int(c) for c in model.classes]
            row[f"intensity_{task}"] = classes[int(np.argmax(proba))]
            if task == "her2_status":
                row["intensity_p_her2_positive"] = float(proba[classes.index(1)])
        row["intensity_model_version"] = "sha256:" + "+".join(digests)
    figure = None
    if config.heatmaps and all(not a.empty for a in per_task.values()):
        grid = per_task["her2_status"][["x", "y"]]  # the evaluation bag: offset 0, all tiles
        title = (
            f"{core.core_id}: score {row['ihc_score']}, HER2 "
            f"{'positive' if row['her2_status'] else 'negative'} "
            f"(p={row['p_her2_positive']:.2f}, {models['her2_status'].name})"
        )
        figure, _ = task_panel(rgb, grid, per_task, rule.tile_size, title, config.disagreeing_tiles)
    row["seconds"] = round(time.perf_counter() - start, 3)
    row["scored_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    logger.info(
        "%s: score %d, HER2 %s (p=%.3f) in %.1f s",
        core.core_id,
        row["ihc_score"],
        "positive" if row["her2_status"] else "negative",
        row["p_her2_positive"],
        row["seconds"],
    )
    return row, figure


def score_inbox(
    inbox_files: Mapping[str, Path],
    trained_models: Mapping[str, Path],
    reference_stains: Mapping[str, Any] | None,
    previous: pd.DataFrame | None,
    image_checks: dict[str, Any],
    tiles: dict[str, Any],
    preprocessing: dict[str, Any],
    predict: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Calls for every accepted inbox core (reusing the rows of cores already scored by the same
    model versions), the inbox QC rows, and a heatmap per newly scored core. The cores are
    scored one by one, or over the workers of a Dask cluster (:func:`her2_kedro.parallel.map_cores`)."""
    from her2_kedro.imaging.normalisation import cohort_normaliser
    from her2_kedro.modelling.devices import resolve_device
    from her2_kedro.modelling.registry import resolve_checkpoint
    from her2_kedro.parallel import map_cores
    from her2_kedro.tma.inbox import INBOX, check_inbox
    from her2_kedro.tma.qc.report import accepted_reason, qc_table

    config = PredictParams.model_validate(predict)
    rule = TileConfig.model_validate(tiles)
    cores, problems = check_inbox(inbox_files, ImageChecks.model_validate(image_checks), rule)
    qc = qc_table(problems, [(INBOX, c.source_file, accepted_reason(c.note)) for c in cores])
    if not cores:
        logger.warning("No scorable image in data/01_raw/inbox/ (%d rejected)", len(problems))
        return pd.DataFrame(columns=COLUMNS), qc, {}

    models = []
    for task in TASK_NAMES:
        local = _trained_file(trained_models, config.model, task, ".pt")
        path, version = resolve_checkpoint(config.model, task, local, config.registry_alias)
        models.append((task, str(Path(path).resolve()), version))
    encoder = trained_models.get("encoder.pt")
    intensity = []
    if config.intensity_model:
        for task in TASK_NAMES:
            path = _trained_file(trained_models, config.intensity_model, task, ".json")
            intensity.append((task, str(Path(path).resolve())))
    normalised = config.stain_normalise and (
        cohort_normaliser(reference_stains, [INBOX], rule.background_grey) is not None
    )
    if config.stain_normalise and not normalised:
        logger.warning("No training stain reference: inbox cores are scored as scanned")
    done = _calls_of(previous)

    scoring = _Scoring(
        models=tuple(models),
        encoder=None if encoder is None else str(Path(encoder).resolve()),
        intensity=tuple(intensity),
        reference=reference_stains if normalised else None,
        tiles=dict(tiles),
        preprocessing=dict(preprocessing),
        predict=dict(predict),
        device=str(resolve_device(config.device)),
    )
    # loaded once here (a checkpoint that cannot serve is named before any core is scored) and
    # kept for the cores this process scores
    specs = _loaded(scoring)["models"]
    if encoder is None and any(m.spec.input == "embeddings" for m in specs.values()):
        raise FileNotFoundError(
            f"{config.model} reads tile embeddings, but no trained encoder is in "
            "data/06_models (encoder.pt): run `kedro run --pipelines=features` first"
        )
    versions = {task: specs[task].version for task in TASK_NAMES}

    def reusable(core: Any) -> bool:  # same pixels, preparation and models: nothing to redo
        old = done.get(core.core_id)
        return (
            old is not None
            and old.get("content_hash") == core.content_hash
            and bool(old.get("normalised")) == normalised
            and old.get("score_model_version") == versions["ihc_score"]
            and old.get("status_model_version") == versions["her2_status"]
        )

    todo = [core for core in cores if not reusable(core)]
    scored = map_cores(functools.partial(_score_one, scoring=scoring), todo, desc="scoring inbox")
    new = {core.core_id: result for core, result in zip(todo, scored, strict=True)}
    rows, figures = [], {}
    for core in cores:
        if core.core_id not in new:
            rows.append(done[core.core_id])
            continue
        row, figure = new[core.core_id]
        rows.append(row)
        if figure is not None:
            figures[core.core_id] = figure
    return pd.DataFrame(rows).reindex(columns=COLUMNS), qc, figures
