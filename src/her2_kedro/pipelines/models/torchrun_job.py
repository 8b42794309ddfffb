"""One model's training with ``torchrun``: the training node writes a job folder, torchrun starts
this module in every process, rank 0 writes the checkpoint, and the node returns it to the catalog.

Kedro runs once, in the node's process; only the training itself is data-parallel (re-running the
whole ``kedro run`` per GPU, as Lightning's default ``ddp`` strategy does, would run every other
node once per GPU). The job folder holds everything the processes read, so that on several
machines it can sit on shared storage:

- ``job.json``: the model's spec, task, tile rule, cohorts, stain reference, the trained encoder's
  path, and the MLflow tracking URI and run id that rank 0 logs the epochs to;
- ``table.parquet``: the train and validation cores only (test cores never reach the job);
- ``cores/`` (image models) or ``embeddings/`` + ``embedding_index.parquet`` (models on the
  embedding cache): copies of the inputs of those cores, written once per launch;
- written by the job: ``resume.pt`` after every epoch (a rerun resumes), ``model.pt`` and
  ``history.json`` at the end, and ``torchrun.log``.

Run by hand on the other machines of a multi-node job:
``python -m torch.distributed.run --nnodes N --nproc-per-node P --rdzv-backend c10d
--rdzv-endpoint HOST:PORT --rdzv-id ID -m her2_kedro.pipelines.models.torchrun_job JOB_DIR``
(the training node logs the exact line).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
MODULE = "her2_kedro.pipelines.models.torchrun_job"
#: What the training processes read: only the cores that train or select.
TRAINING_SPLITS = ("train", "val")


def _write_cores(folder: Path, images: list[str], cores: Mapping[str, Callable[[], bytes]]):
    """Copy each core's bytes to ``folder`` under a plain numbered name; the name map."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, image in enumerate(images):
        names[image] = f"{i:06d}{Path(image).suffix}"
        (folder / names[image]).write_bytes(cores[image]())
    return names


def _write_embeddings(
    folder: Path, keys: list[str], entries: Mapping[str, Callable[[], Mapping[str, Any]]]
) -> None:
    """Copy each cache entry named by ``keys`` to ``folder/<key>.npz``."""
    from her2_kedro.pipelines.models.nodes import entries_by_key

    folder.mkdir(parents=True, exist_ok=True)
    by_key = entries_by_key(entries)
    for key in keys:
        entry = by_key[key]()
        np.savez(folder / f"{key}.npz", embeddings=entry["embeddings"], coords=entry["coords"])


def write_job(
    job_dir: Path,
    *,
    model: Mapping[str, Any],
    task: Mapping[str, Any],
    tiles: Mapping[str, Any],
    cohorts: Mapping[str, Any],
    table: pd.DataFrame,
    sources: Mapping[str, Any],
    mlflow: Mapping[str, str],
) -> Path:
    """Write the job folder of one model's training (see the module docstring); its path.

    A resume checkpoint left by an interrupted launch is kept; copies of a previous launch's
    inputs are replaced.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("cores", "embeddings", "model.pt", "history.json"):
        target = job_dir / stale
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    rows = table[table["split"].isin(TRAINING_SPLITS)].reset_index(drop=True)
    rows.to_parquet(job_dir / "table.parquet", index=False)
    job: dict[str, Any] = {
        "model": dict(model),
        "task": dict(task),
        "tiles": dict(tiles),
        "cohorts": dict(cohorts),
        "mlflow": dict(mlflow),
        "reference_stains": sources.get("reference_stains"),
        "encoder_checkpoint": None,
        "head_checkpoint": None,
        "cores": None,
    }
    for checkpoint in ("encoder_checkpoint", "head_checkpoint"):  # read in place, by path
        if sources.get(checkpoint) is not None:
            job[checkpoint] = str(Path(sources[checkpoint]).resolve())
    if sources.get("accepted_cores") is not None:
        images = sorted(set(rows["image"]))
        job["cores"] = _write_cores(job_dir / "cores", images, sources["accepted_cores"])
    if sources.get("embedding_index") is not None:
        index = sources["embedding_index"]
        index = index[index["core_id"].isin(set(rows["core_id"]))].reset_index(drop=True)
        index.to_parquet(job_dir / "embedding_index.parquet", index=False)
        _write_embeddings(job_dir / "embeddings", index["key"].tolist(), sources["tile_embeddings"])
    (job_dir / JOB_FILE).write_text(json.dumps(job, indent=1, default=str))
    return job_dir


def _file_loader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def _npz_loader(path: Path) -> Callable[[], dict[str, np.ndarray]]:
    def load() -> dict[str, np.ndarray]:
        with np.load(path) as data:
            return {"embeddings": data["embeddings"], "coords": data["coords"]}

    return load


def read_sources(job_dir: Path, job: Mapping[str, Any]) -> dict[str, Any]:
    """The node's keyword sources rebuilt from the job folder (what ``_inputs`` takes)."""
    sources: dict[str, Any] = {}
    if job.get("cores") is not None:
        sources["accepted_cores"] = {
            image: _file_loader(job_dir / "cores" / name) for image, name in job["cores"].items()
        }
        sources["reference_stains"] = job.get("reference_stains")
    if (job_dir / "embedding_index.parquet").is_file():
        index = pd.read_parquet(job_dir / "embedding_index.parquet")
        sources["embedding_index"] = index
        sources["tile_embeddings"] = {
            f"{key}.npz": _npz_loader(job_dir / "embeddings" / f"{key}.npz") for key in index["key"]
        }
    for checkpoint in ("encoder_checkpoint", "head_checkpoint"):
        if job.get(checkpoint):
            sources[checkpoint] = Path(job[checkpoint])
    return sources


def train_with_torchrun(
    spec: Any,
    task: Mapping[str, Any],
    tiles: Mapping[str, Any],
    cohorts: Mapping[str, Any],
    table: pd.DataFrame,
    sources: Mapping[str, Any],
    workdir: Path,
) -> tuple[Path, pd.DataFrame]:
    """Train the declared model (a ``TorchModelConfig``) under torchrun on this machine: write
    the job folder, launch, and return rank 0's checkpoint and curve. The other machines of a
    multi-node job run the logged command themselves."""
    import mlflow

    from her2_kedro.modelling.distributed import launch, torchrun_command
    from her2_kedro.pipelines.common import run_id

    config = spec.distributed
    job_dir = Path(config.job_dir) if config.job_dir else workdir / "torchrun"
    write_job(
        job_dir,
        model=spec.model_dump(mode="json"),
        task=task,
        tiles=tiles,
        cohorts=cohorts,
        table=table,
        sources=sources,
        mlflow={"tracking_uri": mlflow.get_tracking_uri(), "run_id": run_id()},
    )
    command = torchrun_command(config, MODULE, [str(job_dir.resolve())])
    if config.nnodes > 1:
        logger.info(
            "%s: start the other %d machine(s) with: %s",
            spec.name,
            config.nnodes - 1,
            " ".join(["python", *command[1:]]),
        )
    launch(command, job_dir / "torchrun.log")
    history = pd.read_json(job_dir / "history.json", orient="records")
    for copied in ("cores", "embeddings"):  # the inputs' copies are no longer needed
        shutil.rmtree(job_dir / copied, ignore_errors=True)
    return job_dir / "model.pt", history


def _resolve_task(task: Mapping[str, Any]):
    """The study task a job names (the encoder's five-class target included)."""
    from her2_kedro.modelling.torch_study import FIVE_CLASS_TASK
    from her2_kedro.pipelines.models.nodes import _task

    if task.get("name") == FIVE_CLASS_TASK.name:
        return FIVE_CLASS_TASK
    return _task(dict(task))


def run(job_dir: Path) -> None:
    """One torchrun process: join the group, train on this rank's shard, rank 0 saves."""
    import torch.distributed as dist

    from her2_kedro.config import TorchModelConfig
    from her2_kedro.modelling.distributed import init_process_group, is_main
    from her2_kedro.pipelines.common import epoch_logger
    from her2_kedro.pipelines.models.nodes import _inputs, fit_and_save

    job = json.loads((job_dir / JOB_FILE).read_text())
    spec = TorchModelConfig.model_validate(job["model"])
    device = init_process_group(spec.distributed, spec.training.device)
    spec = spec.model_copy(
        update={"training": spec.training.model_copy(update={"device": str(device)})}
    )
    try:
        task = _resolve_task(job["task"])
        table = pd.read_parquet(job_dir / "table.parquet")
        inputs = _inputs(spec, job["tiles"], job["cohorts"], **read_sources(job_dir, job))
        logger_fn = epoch_logger(
            f"{spec.name}.{task.name}",
            run_id=job["mlflow"].get("run_id"),
            tracking_uri=job["mlflow"].get("tracking_uri"),
        )
        _, history = fit_and_save(
            spec,
            task,
            table,
            inputs,
            job_dir,
            tiles=job["tiles"],
            run_id=job["mlflow"].get("run_id", ""),
            on_epoch_end=logger_fn,
            progress=is_main(),
        )
        if is_main():
            (job_dir / "history.json").write_text(history.to_json(orient="records"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """``python -m her2_kedro.pipelines.models.torchrun_job JOB_DIR`` (started by torchrun)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m her2_kedro.pipelines.models.torchrun_job JOB_DIR")
    import os

    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(name)s: %(message)s")
    run(Path(argv[0]))


if __name__ == "__main__":
    main()
