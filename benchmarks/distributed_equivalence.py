"""Proof that the distributed routes compute what the sequential ones do, on a tiny synthetic cohort.

1. Embedding: the features pipeline (frozen encoder, embedding cache) run by Kedro's
   SequentialRunner, and run again from the same inputs by ``her2_kedro.runners.DaskRunner``
   against a local dask.distributed cluster of 2 worker processes. Every cache entry is compared
   (tile coordinates exactly, embeddings to within ``--embedding-atol``).
2. Training: the MIL model on the cached embeddings (``mil_cached``, HER2 status; dropout off so
   that the only randomness is the draw) trained by the models pipeline's node in one process
   with 2 bags per optimiser step, and under ``torchrun`` over 2 gloo CPU processes with 1 bag
   each per step (the same effective batch). The per-epoch loss curves, validation balanced
   accuracy, the selected epoch and the final weights are compared; rank 0's curve must be in the
   node's MLflow run.
3. Prediction: ``predict`` on copies of a few cores dropped in the inbox (the cached-embedding MIL
   model of both tasks, heatmaps on), by the SequentialRunner and by the DaskRunner, whose node
   fans the cores out to the workers: the calls must be identical.

Prints the differences and, on its last line, ``... equivalent: yes`` or ``... equivalent: no``
(exit status 1). Everything runs in a temporary folder; nothing is downloaded.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/distributed_equivalence.py`` (about 2 minutes
on 2 CPU cores; ``--keep DIR`` keeps the data for inspection).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from her2_kedro.config.project import rebase_data_paths  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
TASK = "her2_status"
MODEL = "mil_cached"


def _merged(pattern: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in sorted((PROJECT / "conf" / "base").glob(pattern)):
        merged.update(yaml.safe_load(path.read_text()) or {})
    return merged


def tiny_params(n_patients: int) -> dict[str, Any]:
    """conf/base parameters shrunk to a cohort and encoder that run in seconds."""
    params = copy.deepcopy(_merged("parameters*.yml"))
    synthetic = params["synthetic"]
    synthetic.update(n_patients=n_patients, cores_per_patient=[1, 2], core_size=448)
    synthetic.update(cell_diameter_px=20, external_fraction=0.0)
    synthetic["artefact_rates"] = {"tear": 0.0, "fold": 0.0, "partial": 0.0, "blur": 0.0}
    synthetic["slides"]["n_slides"] = 0
    normalisation = params["preprocessing"]["stain_normalisation"]
    normalisation.update(max_reference_cores=6, preview_tiles=0)
    encoder = params["encoder"]
    encoder.update(name="resnet18", train=False)  # a frozen random trunk: equivalence, not accuracy
    encoder["bag"].update(input_size=32)
    model = params["mil_study"]["models"][MODEL]
    model["params"] = {**model["params"], "dropout": 0.0}
    # the last epoch is kept, so the weights compared are those after every step
    model["training"].update(
        max_epochs=6, early_stopping_patience=None, selection="last", seed=0, device="cpu"
    )
    return params


def catalog(data_root: Path, params: dict[str, Any]):
    """The project's catalog under ``data_root`` with ``params`` registered as Kedro does."""
    from kedro.io import DataCatalog, MemoryDataset

    result = DataCatalog.from_config(rebase_data_paths(_merged("catalog*.yml"), data_root))
    result["parameters"] = MemoryDataset(params)

    def add(prefix: str, values: Any) -> None:
        result[f"params:{prefix}"] = MemoryDataset(values)
        if isinstance(values, dict):
            for key, value in values.items():
                add(f"{prefix}.{key}", value)

    for section, values in params.items():
        add(section, values)
    return result


def run(
    pipeline_name: str,
    data_root: Path,
    params: dict[str, Any],
    runner=None,
    namespace: str | None = None,
    nodes: tuple[str, ...] = (),
):
    """A registered pipeline (or its ``namespace``, or its ``nodes``) on the catalog under
    ``data_root``, by ``runner`` (the SequentialRunner by default)."""
    from kedro.runner import SequentialRunner

    from her2_kedro.pipeline_registry import register_pipelines

    pipeline = register_pipelines()[pipeline_name]
    if namespace:
        pipeline = pipeline.only_nodes_with_namespaces([namespace])
    if nodes:
        pipeline = pipeline.only_nodes(*nodes)
    (runner or SequentialRunner()).run(pipeline, catalog(data_root, params))


def compare_embeddings(first: Path, second: Path, atol: float) -> tuple[bool, list[str]]:
    """Same cache entries, identical coordinates, embeddings within ``atol``."""
    a = {p.name: p for p in (first / "05_model_input" / "embeddings").glob("*.npz")}
    b = {p.name: p for p in (second / "05_model_input" / "embeddings").glob("*.npz")}
    lines = [f"cache entries: sequential {len(a)}, dask {len(b)}, in common {len(set(a) & set(b))}"]
    ok = bool(a) and set(a) == set(b)
    worst = 0.0
    for name in sorted(set(a) & set(b)):
        x, y = np.load(a[name]), np.load(b[name])
        if not np.array_equal(x["coords"], y["coords"]):
            ok = False
            lines.append(f"  {name}: tile coordinates differ")
            continue
        worst = max(worst, float(np.abs(x["embeddings"] - y["embeddings"]).max(initial=0.0)))
    index_a = pd.read_parquet(first / "05_model_input" / "embedding_index.parquet")
    index_b = pd.read_parquet(second / "05_model_input" / "embedding_index.parquet")
    same_index = (
        index_a.sort_values("core_id")
        .reset_index(drop=True)
        .equals(index_b.sort_values("core_id").reset_index(drop=True))
    )
    ok = ok and same_index and worst <= atol
    lines.append(f"embedding index identical: {same_index}")
    lines.append(f"max |embedding difference|: {worst:.3g} (tolerance {atol:g})")
    return ok, lines


def embedding_route(root: Path, params: dict[str, Any], workers: int, atol: float):
    """Sequential features run vs the DaskRunner on a local cluster, from the same inputs and
    the same encoder: every cache entry is computed again on the cluster's workers."""
    sequential, clustered = root / "sequential" / "data", root / "dask" / "data"
    started = time.perf_counter()
    run("synthetic", sequential, params)
    run("ingestion", sequential, params)
    run("preprocessing", sequential, params)
    prepared = time.perf_counter() - started
    started = time.perf_counter()
    run("features", sequential, params)
    seq_s = time.perf_counter() - started
    # the same inputs and the same finished encoder (reused by the second run), without the cache
    shutil.copytree(sequential, clustered)
    shutil.rmtree(clustered / "05_model_input" / "embeddings")
    (clustered / "05_model_input" / "embedding_index.parquet").unlink()
    dask_s = _dask_run("features", clustered, params, workers)
    ok, lines = compare_embeddings(sequential, clustered, atol)
    lines.insert(0, f"cohort prepared in {prepared:.1f} s")
    lines.insert(
        1,
        f"features: sequential {seq_s:.1f} s, DaskRunner on {workers} workers "
        f"{dask_s:.1f} s (cluster start-up included)",
    )
    return ok, lines, sequential


def training_route(data_root: Path, params: dict[str, Any], atol: float):
    """The MIL node in one process (2 bags per step) vs torchrun on 2 processes (1 bag each)."""
    import mlflow
    import torch

    from her2_kedro.modelling.checkpoints import read_checkpoint

    models = data_root / "06_models"
    results = {}
    for label, accumulation, nproc in (("1 process", 2, 1), ("torchrun x2", 1, 2)):
        p = copy.deepcopy(params)
        spec = p["mil_study"]["models"][MODEL]
        spec["training"]["grad_accumulation"] = accumulation
        spec["distributed"] = {"nproc_per_node": nproc, "backend": "gloo"}
        started = time.perf_counter()
        mlflow.end_run()  # one run per training, as kedro-mlflow opens one per `kedro run`
        with mlflow.start_run() as active:
            run("mil", data_root, p, namespace=f"{MODEL}.{TASK}")
        seconds = time.perf_counter() - started
        history = pd.read_csv(models / f"{MODEL}.{TASK}.history.csv")
        checkpoint = read_checkpoint(models / f"{MODEL}.{TASK}.pt")
        curve = mlflow.tracking.MlflowClient().get_metric_history(
            active.info.run_id, f"{MODEL}.{TASK}.val_loss"
        )
        results[label] = (history, checkpoint, [m.step for m in curve], seconds)
    (h1, c1, steps1, s1), (h2, c2, steps2, s2) = results.values()
    loss = float(np.abs(h1["train_loss"] - h2["train_loss"]).max())
    val_loss = float(np.abs(h1["val_loss"] - h2["val_loss"]).max())
    bal = float(np.abs(h1["val_balanced_accuracy"] - h2["val_balanced_accuracy"]).max())
    weights = max(
        float((c1["state_dict"][k].float() - c2["state_dict"][k].float()).abs().max())
        for k in c1["state_dict"]
    )
    epochs = (c1["meta"]["epoch"], c2["meta"]["epoch"])
    moved = float(h1["train_loss"].max() - h1["train_loss"].min()) > 1e-4  # it trained at all
    lines = [
        f"training: 1 process {s1:.1f} s, torchrun over 2 processes {s2:.1f} s",
        f"epochs: {len(h1)} vs {len(h2)}; selected epoch {epochs[0]} vs {epochs[1]}",
        f"train loss per epoch (1 process): {np.round(h1['train_loss'].to_numpy(), 5).tolist()}",
        f"max |train loss difference| {loss:.3g}, max |val loss difference| {val_loss:.3g}, "
        f"max |val balanced accuracy difference| {bal:.3g} (tolerance {atol:g})",
        f"max |weight difference| {weights:.3g}",
        f"MLflow curve steps: 1 process {steps1}, torchrun rank 0 {steps2}",
    ]
    ok = (
        len(h1) == len(h2)
        and epochs[0] == epochs[1]
        and max(loss, val_loss, weights) <= atol
        and bal == 0.0
        and steps1 == steps2 == list(range(len(h1)))
        and moved
        and torch.isfinite(torch.tensor(loss))
    )
    return ok, lines


def _dask_run(
    pipeline_name: str,
    data_root: Path,
    params: dict[str, Any],
    workers: int,
    nodes: tuple[str, ...] = (),
):
    """``pipeline_name`` (or its ``nodes``) run by the DaskRunner on a local cluster."""
    from distributed import LocalCluster

    from her2_kedro.runners import DaskRunner

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True)
    previous = os.environ.get("DASK_SCHEDULER_ADDRESS")
    os.environ["DASK_SCHEDULER_ADDRESS"] = cluster.scheduler_address
    try:
        started = time.perf_counter()
        run(pipeline_name, data_root, params, runner=DaskRunner(), nodes=nodes)
        return time.perf_counter() - started
    finally:
        if previous is None:
            os.environ.pop("DASK_SCHEDULER_ADDRESS", None)
        else:
            os.environ["DASK_SCHEDULER_ADDRESS"] = previous
        cluster.close()


def prediction_route(data_root: Path, params: dict[str, Any], workers: int, n_cores: int):
    """``predict`` on copies of a few cores in the inbox: SequentialRunner vs DaskRunner."""
    import mlflow

    p = copy.deepcopy(params)
    p["predict"].update(model=MODEL, intensity_model=None, heatmaps=True)
    mlflow.end_run()
    with mlflow.start_run():  # the other task's model; the status one is trained already
        run("mil", data_root, params, namespace=f"{MODEL}.ihc_score")
    inbox = data_root / "01_raw" / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    for source in sorted((data_root / "02_intermediate" / "cores").iterdir())[:n_cores]:
        shutil.copy(source, inbox / f"new_{source.name}")
    calls = data_root / "07_model_output" / "inbox_predictions.csv"
    panels = data_root / "08_reporting" / "inbox"
    results = {}
    for label in ("sequential", "dask"):
        calls.unlink(missing_ok=True)  # nothing to reuse: every core scored again
        shutil.rmtree(panels, ignore_errors=True)
        mlflow.end_run()
        with mlflow.start_run():
            started = time.perf_counter()
            if label == "sequential":  # the scoring node: the report needs every study
                run("predict", data_root, p, nodes=("score_inbox",))
            else:
                _dask_run("predict", data_root, p, workers, nodes=("score_inbox",))
            seconds = time.perf_counter() - started
        frame = pd.read_csv(calls).drop(columns=["seconds", "scored_at"])
        results[label] = (frame, sorted(x.name for x in panels.glob("*.png")), seconds)
    (a, panels_a, s1), (b, panels_b, s2) = results.values()
    same = a.equals(b)
    lines = [
        f"predict on {len(a)} inbox cores: sequential {s1:.1f} s, DaskRunner {s2:.1f} s",
        f"calls identical (every column but seconds and scored_at): {same}",
        f"heatmaps: sequential {len(panels_a)}, dask {len(panels_b)}",
    ]
    if not same and a.shape == b.shape:
        numeric = a.select_dtypes("number").columns
        worst = float((a[numeric] - b[numeric]).abs().max().max())
        lines.append(f"max |difference| of the numeric columns: {worst:.3g}")
    ok = same and len(a) == n_cores and panels_a == panels_b and len(panels_a) == n_cores
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=24, help="synthetic patients")
    parser.add_argument("--workers", type=int, default=2, help="dask workers")
    parser.add_argument("--embedding-atol", type=float, default=1e-5)
    parser.add_argument("--training-atol", type=float, default=1e-4)
    parser.add_argument("--keep", type=Path, help="keep the data in this folder")
    parser.add_argument("--only", choices=["embedding", "training"], help="run one check only")
    parser.add_argument("--inbox-cores", type=int, default=4, help="cores predict scores")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="her2_equivalence_")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(PROJECT)  # the pipeline registry reads the project's conf/
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")  # never the project's own store
    params = tiny_params(args.patients)
    embed_ok = train_ok = predict_ok = True
    try:
        if args.only == "training":  # the cohort and its cache made sequentially
            data_root = root / "sequential" / "data"
            for name in ("synthetic", "ingestion", "preprocessing", "features"):
                run(name, data_root, params)
        else:
            embed_ok, embed_lines, data_root = embedding_route(
                root, params, args.workers, args.embedding_atol
            )
            print("== embedding: SequentialRunner vs DaskRunner ==")
            print("\n".join(embed_lines), flush=True)
        if args.only != "embedding":
            train_ok, train_lines = training_route(data_root, params, args.training_atol)
            print("== MIL training: 1 process vs torchrun over 2 processes ==")
            print("\n".join(train_lines), flush=True)
        if args.only is None:
            predict_ok, predict_lines = prediction_route(
                data_root, params, args.workers, args.inbox_cores
            )
            print("== predict: SequentialRunner vs DaskRunner ==")
            print("\n".join(predict_lines))
    finally:
        while mlflow.active_run() is not None:  # runs that logging started on its own
            mlflow.end_run()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    ok = embed_ok and train_ok and predict_ok
    verdicts = {"embedding": embed_ok, "training": train_ok, "prediction": predict_ok}
    print(", ".join(f"{k} {'ok' if v else 'DIFFERS'}" for k, v in verdicts.items()))
    print(f"distributed embedding, training and prediction equivalent: {'yes' if ok else 'no'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
