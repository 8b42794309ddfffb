"""Data-parallel training: the sharded five-class sampler, and torchrun over 2 gloo processes
training the MIL model to the same result as 1 process with the same effective batch."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from her2_kedro.config import DistributedConfig, TileConfig, TorchModelConfig
from her2_kedro.modelling.checkpoints import read_checkpoint
from her2_kedro.modelling.distributed import (
    DistributedFiveClassSampler,
    TorchrunError,
    launch,
    shard,
    torchrun_command,
)
from her2_kedro.modelling.sampling import FiveClassSampler
from her2_kedro.pipelines.models import torchrun_job
from her2_kedro.pipelines.models.nodes import _inputs, _task, fit_and_save

RULE = TileConfig(tile_size=32, stride=32)
FIVE = ["0", "0", "0", "1", "2-", "2+", "3", "0", "3", "2+", "0"]


def test_shards_of_the_five_class_draw_make_the_single_process_draw():
    world = 3
    shards = [
        DistributedFiveClassSampler(FIVE, seed=4, rank=r, world_size=world) for r in range(world)
    ]
    total = shards[0].num_samples
    assert total == 12  # 11 cores rounded up to a multiple of 3
    single = FiveClassSampler(FIVE, seed=4, num_samples=total)
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for s in shards:
            s.set_epoch(epoch)
        parts = [list(s) for s in shards]
        assert all(len(p) == total // world == len(s) for p, s in zip(parts, shards, strict=True))
        merged = [parts[i % world][i // world] for i in range(total)]
        assert merged == list(single)
    shards[0].set_epoch(0)
    first = list(shards[0])
    shards[0].set_epoch(1)
    assert list(shards[0]) != first  # fresh draws every epoch


def test_shard_pads_to_equal_lengths_and_rejects_a_rank_outside_the_world():
    assert shard([0, 1, 2, 3, 4], 0, 2) == [0, 2, 4]
    assert shard([0, 1, 2, 3, 4], 1, 2) == [1, 3, 0]  # wrapped round: as many steps as rank 0
    with pytest.raises(ValueError, match="outside a world"):
        DistributedFiveClassSampler(FIVE, rank=2, world_size=2)


def test_torchrun_command_is_standalone_on_one_machine_and_uses_the_endpoint_on_several():
    local = torchrun_command(DistributedConfig(nproc_per_node=2), "pkg.mod", ["job"])
    assert "--standalone" in local and local[-3:] == ["-m", "pkg.mod", "job"]
    assert local[local.index("--nproc-per-node") + 1] == "2"
    multi = torchrun_command(
        DistributedConfig(nproc_per_node=4, nnodes=2, rdzv_endpoint="10.0.0.1:29400"),
        "pkg.mod",
        ["job"],
    )
    assert "--standalone" not in multi
    assert multi[multi.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400"
    assert multi[multi.index("--nnodes") + 1] == "2"


def test_a_failing_launch_names_the_command_and_shows_the_log(tmp_path):
    command = [
        "python",
        "-c",
        "import sys; print('worker says no'); sys.exit(3)",
    ]
    with pytest.raises(TorchrunError, match="exited with 3") as err:
        launch(command, tmp_path / "run.log")
    assert "worker says no" in str(err.value)


# --- 1 process vs torchrun over 2 processes on a tiny embedding cohort ------------------------


def tiny_embedding_cohort(folder: Path, *, n_train: int = 16, n_val: int = 6, dim: int = 8):
    """A table of train / val cores and their cache entries: positive cores (2+, 3) carry a
    shifted direction in a few of their tiles, as the morphology cue does."""
    rng = np.random.default_rng(0)
    classes = ["0", "1", "2-", "2+", "3"]
    rows, entries = [], {}
    for i in range(n_train + n_val):
        five = classes[i % 5]
        positive = five in ("2+", "3")
        n_tiles = int(rng.integers(3, 10))
        x = rng.normal(size=(n_tiles, dim)).astype(np.float32)
        if positive:
            x[: max(1, n_tiles // 3), :3] += 2.5
        key = f"k{i:03d}"
        entries[key] = {"embeddings": x, "coords": np.zeros((n_tiles, 2), dtype=np.int64)}
        rows.append(
            {
                "core_id": f"c{i:03d}",
                "image": f"c{i:03d}.jpg",
                "split": "train" if i < n_train else "val",
                "cohort": "main",
                "five_class": five,
                "five_class_index": classes.index(five),
                "y": int(positive),
                "her2_status": int(positive),
                "n_tiles": n_tiles,
                "key": key,
            }
        )
    table = pd.DataFrame(rows)
    index = table[["core_id", "key", "n_tiles"]]
    loaders = {f"{k}.npz": (lambda e=e: e) for k, e in entries.items()}
    return table.drop(columns="key"), index, loaders


def mil_spec(*, accumulation: int, nproc: int) -> dict:
    return TorchModelConfig(
        name="mil_cached",
        input="embeddings",
        arch="attention_mil",
        params={"hidden_dim": 16, "dropout": 0.0},
        training={
            "lr": 5e-3,
            "max_epochs": 4,
            "plateau_patience": 10,
            "early_stopping_patience": None,
            "device": "cpu",
            "grad_accumulation": accumulation,
            "seed": 3,
        },
        distributed={"nproc_per_node": nproc, "backend": "gloo"},
    ).model_dump(mode="json")


@pytest.mark.slow
def test_torchrun_on_two_processes_trains_as_one_process_with_the_same_effective_batch(tmp_path):
    table, index, loaders = tiny_embedding_cohort(tmp_path)
    task = {"name": "her2_status", "target": "her2_status"}
    tiles = {}
    sources = {"tile_embeddings": loaders, "embedding_index": index}

    # one process, two bags per optimiser step
    one = TorchModelConfig.model_validate(mil_spec(accumulation=2, nproc=1))
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    path, single_history = fit_and_save(
        one,
        _task(task),
        table,
        _inputs(one, tiles, {}, **sources),
        single_dir,
        tiles=tiles,
        run_id="",
        on_epoch_end=None,
        progress=False,
    )
    single = read_checkpoint(path)

    # two gloo processes under torchrun, one bag each per step
    job_dir = torchrun_job.write_job(
        tmp_path / "job",
        model=mil_spec(accumulation=1, nproc=2),
        task=task,
        tiles=tiles,
        cohorts={},
        table=table,
        sources=sources,
        mlflow={},
    )
    spec = TorchModelConfig.model_validate(mil_spec(accumulation=1, nproc=2))
    command = torchrun_command(spec.distributed, torchrun_job.MODULE, [str(job_dir)])
    launch(command, job_dir / "torchrun.log", env={"OMP_NUM_THREADS": "1"})
    ddp = read_checkpoint(job_dir / "model.pt")
    ddp_history = pd.DataFrame(json.loads((job_dir / "history.json").read_text()))

    assert len(ddp_history) == len(single_history) == 4
    np.testing.assert_allclose(ddp_history["train_loss"], single_history["train_loss"], atol=1e-5)
    np.testing.assert_allclose(ddp_history["val_loss"], single_history["val_loss"], atol=1e-5)
    np.testing.assert_array_equal(
        ddp_history["val_balanced_accuracy"], single_history["val_balanced_accuracy"]
    )
    assert ddp["meta"]["epoch"] == single["meta"]["epoch"]
    for name, weight in single["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][name], weight, atol=1e-5, rtol=1e-4)
    # the model learnt something (not two identical untrained copies)
    assert single_history["train_loss"].iloc[-1] < single_history["train_loss"].iloc[0]
    assert not (job_dir / "resume.pt").exists()  # a finished job leaves no resume checkpoint


@pytest.mark.slow
def test_the_encoder_trains_under_torchrun_as_in_one_process(tmp_path):
    """The features pipeline's encoder (a tile classifier over batches of cores' tiles, with
    BatchNorm) under torchrun on 2 processes, against 1 process with twice the accumulation."""
    from her2_kedro.imaging.pixels import encode_jpeg
    from her2_kedro.modelling.bags import bag_tiles
    from her2_kedro.pipelines.features.nodes import train_encoder
    from tests.conftest import fake_core

    five = ["0", "1", "2-", "2+", "3", "0", "3", "2+", "0", "1"]
    splits = ["train"] * 8 + ["val"] * 2
    rows, loaders, tiles = [], {}, []
    for i, (label, split) in enumerate(zip(five, splits, strict=True)):
        rgb = fake_core(160, 120, 20, source=25 * i)
        image = f"c{i}.jpg"
        data = encode_jpeg(rgb, 90)
        loaders[image] = functools.partial(bytes, data)
        tiles.append(bag_tiles(rgb, f"c{i}", RULE))
        rows.append(
            {
                "core_id": f"c{i}",
                "image": image,
                "patient_id": f"p{i}",
                "split": split,
                "cohort": "main",
                "five_class": label,
                "ihc_score": {"0": 0, "1": 1, "2-": 2, "2+": 2, "3": 3}[label],
                "her2_status": int(label in ("2+", "3")),
                "content_hash": f"{i:064x}",
            }
        )
    manifest, tile_index = pd.DataFrame(rows), pd.concat(tiles, ignore_index=True)

    def encoder(accumulation: int, nproc: int) -> dict:
        return {
            "name": "resnet18",
            "train": True,
            "method": "tile_classifier",
            "bag": {"input_size": 16, "max_tiles": 4, "cores_per_batch": 2},
            "training": {
                "max_epochs": 2,
                "early_stopping_patience": None,
                "precise_bn_batches": 2,
                "device": "cpu",
                "grad_accumulation": accumulation,
                "selection": "last",
            },
            "distributed": {"nproc_per_node": nproc, "backend": "gloo"},
        }

    outputs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: convolution sums in the same order
    try:
        for label, accumulation, nproc in (("single", 2, 1), ("torchrun", 1, 2)):
            workdir = tmp_path / label
            workdir.mkdir()
            _, history = train_encoder(
                manifest,
                tile_index,
                loaders,
                {},
                encoder(accumulation, nproc),
                RULE.model_dump(),
                {},
                workdir,
            )
            outputs[label] = (read_checkpoint(workdir / "encoder.pt"), history)
    finally:
        torch.set_num_threads(threads)
    (single, h1), (ddp, h2) = outputs.values()
    assert len(h1) == len(h2) == 2
    np.testing.assert_allclose(h2["train_loss"], h1["train_loss"], atol=1e-4)
    np.testing.assert_allclose(h2["val_loss"], h1["val_loss"], atol=1e-4)
    for name, weight in single["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][name], weight, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_an_interrupted_torchrun_job_resumes_to_the_uninterrupted_result(tmp_path):
    """torchrun killed after a few epochs, launched again on the same job folder: it continues
    from rank 0's resume checkpoint and ends where an uninterrupted job ends."""
    import os
    import signal
    import subprocess
    import time

    table, index, loaders = tiny_embedding_cohort(tmp_path)
    spec = mil_spec(accumulation=1, nproc=2)
    spec["training"].update(max_epochs=120)  # long enough to be caught in the middle
    config = TorchModelConfig.model_validate(spec)
    sources = {"tile_embeddings": loaders, "embedding_index": index}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def job(name: str) -> Path:
        return torchrun_job.write_job(
            tmp_path / name,
            model=spec,
            task={"name": "her2_status", "target": "her2_status"},
            tiles={},
            cohorts={},
            table=table,
            sources=sources,
            mlflow={},
        )

    whole = job("whole")
    launch(torchrun_command(config.distributed, torchrun_job.MODULE, [str(whole)]), whole / "log")

    cut = job("cut")
    command = torchrun_command(config.distributed, torchrun_job.MODULE, [str(cut)])
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    resume = cut / "resume.pt"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if resume.is_file() and read_checkpoint(resume)["meta"]["epoch"] >= 3:
            # as a scheduler's preemption or Ctrl-C: torchrun stops every process of the job
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    process.wait()
    if (cut / "model.pt").exists():
        pytest.skip("the job finished before it could be interrupted (machine too fast)")
    stopped_at = read_checkpoint(resume)["meta"]["epoch"]
    assert 3 <= stopped_at < 119

    launch(command, cut / "log")  # the same job again: it resumes
    resumed_log = (cut / "log").read_text()
    assert "epoch 0:" not in resumed_log and f"epoch {stopped_at + 1}:" in resumed_log
    h_whole = pd.DataFrame(json.loads((whole / "history.json").read_text()))
    h_cut = pd.DataFrame(json.loads((cut / "history.json").read_text()))
    pd.testing.assert_frame_equal(h_cut, h_whole, check_exact=False, atol=1e-6)
    a, b = read_checkpoint(whole / "model.pt"), read_checkpoint(cut / "model.pt")
    assert a["meta"]["epoch"] == b["meta"]["epoch"]
    for name, weight in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], weight, atol=1e-6, rtol=1e-5)


def test_several_machines_need_a_rendezvous_endpoint():
    with pytest.raises(ValueError, match="nnodes > 1 needs rdzv_endpoint"):
        DistributedConfig(nproc_per_node=4, nnodes=2)
    with pytest.raises(ValueError, match="nproc_per_node"):
        DistributedConfig(nproc_per_node=0)
