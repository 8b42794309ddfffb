"""Thin nodes of the study report: the paper's tables, its figures, heatmap panels, t-SNE and the
HTML page, from whatever studies have written predictions so far."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from her2_kedro.config import ReportingParams
from her2_kedro.config.project import run_env
from her2_kedro.pipelines.common import run_id

logger = logging.getLogger(__name__)

NO_PREDICTIONS = (
    "No predictions in data/07_model_output/predictions.parquet: run a study first, e.g. "
    "`kedro run --pipelines=mil` (or `make run` for every model)"
)


def predictions_to_report(predictions: pd.DataFrame | None) -> pd.DataFrame:
    """The studies' predictions; the first node, so that a report before any study stops with
    what to run instead of a missing-file error from some other input."""
    if predictions is None or predictions.empty:
        raise FileNotFoundError(NO_PREDICTIONS)
    return predictions


def external_as_scanned(
    predictions: pd.DataFrame,
    core_manifest: pd.DataFrame,
    accepted_cores: Mapping[str, Callable[[], bytes]],
    trained_models: Mapping[str, Path],
    previous: pd.DataFrame | None,
    tiles: dict[str, Any],
    cohorts: dict[str, Any],
    preprocessing: dict[str, Any],
    reporting: dict[str, Any],
) -> pd.DataFrame:
    """Every trained model's calls on the normalised evaluation-only cohorts' raw pixels (split
    ``external_unnormalised``); rows of unchanged models are reused from the last run."""
    from her2_kedro.config import CohortsConfig, PreprocessingParams, TileConfig
    from her2_kedro.evaluation.external import score_as_scanned
    from her2_kedro.imaging.stain import stain_matrix
    from her2_kedro.modelling.devices import resolve_device

    config = ReportingParams.model_validate(reporting)
    groups = CohortsConfig.model_validate(cohorts)
    both = set(groups.evaluation_only) & set(groups.stain_normalised)
    scored = set(predictions.loc[predictions["split"] == "external", "core_id"])
    cores = core_manifest[
        core_manifest["cohort"].isin(both) & core_manifest["core_id"].isin(scored)
    ]
    if not config.external_unnormalised or cores.empty:
        return pd.DataFrame()
    pairs = predictions[["model", "task"]].drop_duplicates().itertuples(index=False)
    models = {}
    for model, task in pairs:
        found = [trained_models.get(f"{model}.{task}{suffix}") for suffix in (".pt", ".json")]
        path = next((p for p in found if p is not None), None)
        if path is None:
            logger.warning(
                "%s / %s: no trained model file in data/06_models, not scored as scanned",
                model,
                task,
            )
            continue
        models[(model, task)] = path
    prep = PreprocessingParams.model_validate(preprocessing)
    rows = score_as_scanned(
        cores,
        accepted_cores,
        models,
        TileConfig.model_validate(tiles),
        prep.intensity_thresholds,
        encoder_path=trained_models.get("encoder.pt"),
        done=previous,
        matrix=None if prep.stain_matrix == "skimage_hed" else stain_matrix(prep.stain_matrix),
        device=str(resolve_device("auto")),
    )
    if not rows.empty:
        rows["run_id"] = run_id()
        rows["manifest_version"] = str(predictions["manifest_version"].iloc[0])
    return rows


def with_external_as_scanned(predictions: pd.DataFrame, as_scanned: pd.DataFrame) -> pd.DataFrame:
    """The studies' predictions and the as-scanned external rows, for the tables and figures."""
    if as_scanned is None or as_scanned.empty:
        return predictions
    return pd.concat([predictions, as_scanned.drop(columns="model_version")], ignore_index=True)


def study_tables(
    predictions: pd.DataFrame, core_manifest: pd.DataFrame, reporting: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Table 1 (intervals by patient, the paper's figures beside), Table 2 for every status model,
    and the per-class error summary."""
    from her2_kedro.reporting import tables

    config = ReportingParams.model_validate(reporting)
    frame = tables.with_patients(predictions, core_manifest)
    boot = config.bootstrap
    table1 = tables.table1(
        frame,
        config.splits,
        config.paper,
        config.paper_models,
        n_resamples=boot.n_resamples,
        level=boot.level,
        seed=boot.seed,
    )
    for row in table1.itertuples(index=False):
        logger.info(
            "%s / %s / %s: balanced accuracy %.4f (95 %% CI %.4f-%.4f, %d cores)",
            row.model,
            row.task,
            row.split,
            row.balanced_accuracy,
            row.ci_low,
            row.ci_high,
            row.n,
        )
    return (
        table1,
        tables.status_crosstabs(frame, config.splits),
        tables.class_errors(frame, config.splits),
    )


def study_figures(predictions: pd.DataFrame, reporting: dict[str, Any]) -> dict[str, Any]:
    """Fig. 1 (confusion matrices of every model, per split) and ROC curves per task and split."""
    from her2_kedro.reporting.study_figures import confusion_grid, roc_figure

    config = ReportingParams.model_validate(reporting)
    figures: dict[str, Any] = {}
    for split in config.splits:
        for task in ("her2_status", "ihc_score"):
            grid = confusion_grid(predictions, split, task)
            if grid is not None:
                figures[f"fig1_confusion_{task}_{split}"] = grid
            roc = roc_figure(predictions, task, split)
            if roc is not None:
                figures[f"roc_{task}_{split}"] = roc
    return figures


def _panel_cores(candidates: pd.DataFrame, max_cores: int | None) -> list[str]:
    """Up to ``max_cores`` cores, taking the five classes in turn (so every class is shown)."""
    by_class = {
        c: sorted(part["core_id"]) for c, part in candidates.groupby("five_class", sort=True)
    }
    chosen: list[str] = []
    while any(by_class.values()) and (max_cores is None or len(chosen) < max_cores):
        for cores in by_class.values():
            if cores and (max_cores is None or len(chosen) < max_cores):
                chosen.append(cores.pop(0))
    return chosen


def heatmap_model(attention: pd.DataFrame | None, config: ReportingParams) -> str | None:
    """The first of the configured model and its fallbacks with attention for both tasks."""
    if attention is None or attention.empty:
        return None
    for name in (config.heatmaps.model, *config.heatmaps.fallback_models):
        tasks = set(attention.loc[attention["model"] == name, "task"])
        if {"her2_status", "ihc_score"} <= tasks:
            return name
    return None


def heatmap_panels(
    predictions: pd.DataFrame,
    attention: pd.DataFrame | None,
    core_manifest: pd.DataFrame,
    tile_index: pd.DataFrame,
    accepted_cores: Mapping[str, Callable[[], bytes]],
    reference_stains: Mapping[str, Any] | None,
    tiles: dict[str, Any],
    cohorts: dict[str, Any],
    reporting: dict[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Fig. 3 panels of the chosen split's cores (core, status and score attention, mean DAB,
    the most disagreeing tiles), and a table of those tiles."""
    from tqdm.auto import tqdm

    from her2_kedro.config import CohortsConfig, TileConfig
    from her2_kedro.features.preprocess import decode_rgb
    from her2_kedro.imaging.normalisation import cohort_normaliser
    from her2_kedro.reporting.heatmaps import task_panel

    config = ReportingParams.model_validate(reporting)
    rule = TileConfig.model_validate(tiles)
    columns = ["model", "core_id", "rank", "x", "y", "attention_status", "dab", "gap"]
    model = heatmap_model(attention, config)
    if model is None:
        logger.warning(
            "No attention of %s (or %s) for both tasks: no heatmap panels",
            config.heatmaps.model,
            ", ".join(config.heatmaps.fallback_models),
        )
        return {}, pd.DataFrame(columns=columns)
    mine = attention[attention["model"] == model]
    calls = predictions[
        (predictions["model"] == model) & (predictions["split"] == config.heatmaps.split)
    ]
    candidates = core_manifest[core_manifest["core_id"].isin(set(calls["core_id"]))]
    chosen = _panel_cores(candidates, config.heatmaps.max_cores)
    normalise = cohort_normaliser(
        reference_stains,
        CohortsConfig.model_validate(cohorts).stain_normalised,
        rule.background_grey,
    )
    rows = core_manifest.set_index("core_id")
    figures, table = {}, []
    for core_id in tqdm(chosen, desc="heatmap panels", unit="core"):
        row = rows.loc[core_id]
        rgb = decode_rgb(accepted_cores[row["image"]]())
        if normalise is not None:  # the pixels the model saw
            rgb = normalise({"core_id": core_id, **row.to_dict()}, rgb)
        per_task = {
            task: mine[(mine["task"] == task) & (mine["core_id"] == core_id)]
            for task in ("her2_status", "ihc_score")
        }
        said = calls[calls["core_id"] == core_id].set_index("task")["y_pred"]
        title = (
            f"{core_id}: true class {row['five_class']}; {model} calls score "
            f"{said.get('ihc_score', '?')}, status "
            f"{'positive' if said.get('her2_status') == 1 else 'negative'}"
        )
        figures[core_id], odd = task_panel(
            rgb,
            tile_index[tile_index["core_id"] == core_id],
            per_task,
            rule.tile_size,
            title,
            config.heatmaps.disagreeing_tiles,
        )
        for rank, tile in enumerate(odd.itertuples(index=False), start=1):
            table.append(
                [
                    model,
                    core_id,
                    rank,
                    tile.x,
                    tile.y,
                    tile.attention_her2_status,
                    tile.dab,
                    tile.gap,
                ]
            )
    return figures, pd.DataFrame(table, columns=columns)


def embedding_figure(
    embedding_index: pd.DataFrame | None,
    embedding_cache: Mapping[str, Path],
    core_manifest: pd.DataFrame,
    reporting: dict[str, Any],
) -> dict[str, Any]:
    """Fig. 2: t-SNE of a subset of the split's tile embeddings coloured by the core's score;
    nothing when no embedding cache exists (no study on cached embeddings ran)."""
    from her2_kedro.reporting.embedding_map import sample_tiles, tsne_coordinates, tsne_figure

    config = ReportingParams.model_validate(reporting).tsne
    if embedding_index is None or embedding_index.empty:
        logger.info("No embedding cache: no t-SNE figure (run `kedro run --pipelines=features`)")
        return {}
    files = {Path(name).stem: path for name, path in embedding_cache.items()}
    split = core_manifest.set_index("core_id")["split"]
    index = embedding_index[embedding_index["core_id"].map(split) == config.split]
    index = index[index["key"].isin(set(files))]
    if index.empty:
        logger.info("No cached embeddings of %s cores: no t-SNE figure", config.split)
        return {}
    per_core = {}
    for core_id, key in zip(index["core_id"], index["key"], strict=True):
        with np.load(files[key]) as entry:
            per_core[core_id] = entry["embeddings"]
    x, core_ids = sample_tiles(per_core, config.max_tiles, config.seed)
    if len(x) < 3:
        return {}
    scores = core_manifest.set_index("core_id")["ihc_score"]
    coordinates = tsne_coordinates(x, config.perplexity, config.seed)
    title = f"t-SNE of {len(x)} {config.split} tile embeddings ({len(per_core)} cores)"
    return {f"fig2_tsne_{config.split}": tsne_figure(coordinates, scores.loc[core_ids], title)}


def _pictures(paths: list[Path], captions: Mapping[str, str]) -> list:
    from her2_kedro.reporting.html_report import Picture, png_uri

    return [
        Picture(
            title=p.stem.replace("_", " "),
            uri=png_uri(p),
            caption=captions.get(p.stem, ""),
            wide=p.stem.startswith("fig1_confusion"),
        )
        for p in paths
    ]


#: Captions of the study figures, by file stem prefix.
CAPTIONS = {
    "fig1_confusion": "rows true, columns predicted; colour the share of the true class",
    "roc": "AUROC in the legend; the score task averages one-vs-rest curves over present classes",
    "fig2_tsne": "each point a tile, coloured by its core's IHC score",
}


def write_report(
    table1: pd.DataFrame,
    crosstabs: pd.DataFrame,
    errors: pd.DataFrame,
    figures: list[Path],
    panels: list[Path],
    embedding_figures: list[Path],
    predictions: pd.DataFrame,
    qc_report: pd.DataFrame | None,
    inbox_predictions: pd.DataFrame | None,
    inbox_qc_report: pd.DataFrame | None,
    inbox_heatmaps: list[Path],
    parameters: dict[str, Any],
    reporting: dict[str, Any],
) -> str:
    """The self-contained HTML page (figures embedded), also logged to MLflow by the catalog;
    with an inbox section once ``predict`` has scored new cores."""
    from her2_kedro.reporting.html_report import ReportContent, render_report

    config = ReportingParams.model_validate(reporting)
    captions = {
        p.stem: text
        for p in [*figures, *embedding_figures]
        for prefix, text in CAPTIONS.items()
        if p.stem.startswith(prefix)
    }
    versions = sorted(
        {str(v) for v in predictions.get("manifest_version", pd.Series(dtype=str)) if str(v)}
    )
    content = ReportContent(
        title=config.title,
        run={
            "run_id": run_id(),
            "env": run_env(),
            "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "parameters": yaml.safe_dump(parameters, sort_keys=True, width=100),
            "manifest_versions": versions,
        },
        models=sorted(predictions["model"].unique()),
        qc_report=qc_report,
        table1=table1,
        crosstabs=crosstabs,
        errors=errors,
        figures=_pictures([*figures, *embedding_figures], captions),
        panels=_pictures(panels, {}),
        inbox=_inbox_section(inbox_predictions, inbox_qc_report, inbox_heatmaps),
        max_qc_rows=config.max_qc_rows,
    )
    return render_report(content)


#: The inbox calls as the report lists them.
INBOX_VIEW = [
    "core_id",
    "source_file",
    "ihc_score",
    "her2_status",
    "p_her2_positive",
    "status_model",
    "status_model_version",
    "intensity_ihc_score",
    "intensity_her2_status",
    "seconds",
]


def _inbox_section(
    calls: pd.DataFrame | None, qc: pd.DataFrame | None, heatmaps: list[Path]
) -> dict[str, Any] | None:
    """The report's inbox section: calls, what was rejected, and each scored core's panel."""
    if calls is None and qc is None:
        return None
    calls = calls if calls is not None else pd.DataFrame(columns=INBOX_VIEW)
    rejected = qc[qc["status"] != "accepted"] if qc is not None else pd.DataFrame()
    note = f"{len(calls)} core(s) scored by `kedro run --pipelines=predict`."
    if len(rejected):
        reasons = "; ".join(f"{r.core_id}: {r.reason}" for r in rejected.itertuples(index=False))
        note += f" {len(rejected)} file(s) rejected: {reasons}."
    scored = set(calls["core_id"].astype(str))
    return {
        "note": note,
        "table": calls.reindex(columns=INBOX_VIEW),
        "panels": _pictures([p for p in heatmaps if p.stem in scored], {}),
    }
