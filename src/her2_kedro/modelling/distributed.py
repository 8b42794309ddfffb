"""Data-parallel training over several processes (DDP), launched with ``torchrun``.

The training loop (:mod:`~her2_kedro.modelling.training`) asks :func:`world` whether it runs in a
process group: then each process trains on its shard of the epoch's five-class draw
(:class:`DistributedFiveClassSampler`), DDP averages the gradients, every process scores its share
of the validation cores and all of them take the same decisions from the gathered scores; rank 0
alone writes checkpoints and logs. One process with ``grad_accumulation = k * world_size`` sees
the same bags per optimiser step as ``world_size`` processes with ``k`` each.

:func:`torchrun_command` builds the launch command (``python -m torch.distributed.run``, so the
venv's own torchrun is used) and :func:`launch` runs it, streaming its output, and raises with the
tail of the log when a process fails.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from her2_kedro.config.mil import DistributedConfig
from her2_kedro.modelling.sampling import FiveClassSampler

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedFiveClassSampler",
    "TorchrunError",
    "all_mean",
    "gather_in_order",
    "init_process_group",
    "is_main",
    "launch",
    "shard",
    "torchrun_command",
    "world",
]


class TorchrunError(RuntimeError):
    """A torchrun launch that failed; the message holds the command and the log's tail."""


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes checkpoints and logs (rank 0, or no process group)."""
    return world()[0] == 0


def shard(order: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's items of a global order: padded by wrapping round to a multiple of the world
    size (every rank takes as many steps), then every ``world_size``-th item from ``rank``."""
    order = list(order)
    if world_size == 1 or not order:
        return order
    padded = -(-len(order) // world_size) * world_size
    order = (order * (padded // len(order) + 1))[:padded]
    return order[rank::world_size]


class DistributedFiveClassSampler(FiveClassSampler):
    """The five-class weighted draw, sharded over the ranks of a process group.

    Every rank draws the same global sequence of ``num_samples`` (by default the number of
    training cores, rounded up to a multiple of the world size) from ``(seed, epoch)`` and keeps
    its own ``rank::world_size`` slice: fresh draws every epoch (call :meth:`set_epoch`), no core
    drawn twice by accident of sharding, and the union of the shards equals the draw of a
    single-process :class:`FiveClassSampler` with the same ``num_samples``.
    """

    def __init__(
        self,
        five_class: Sequence[str],
        *,
        seed: int = 0,
        num_samples: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        here_rank, here_world = world()
        self.rank = here_rank if rank is None else int(rank)
        self.world_size = here_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")
        total = len(five_class) if num_samples is None else int(num_samples)
        total = -(-total // self.world_size) * self.world_size
        super().__init__(five_class, seed=seed, num_samples=total)

    def global_indices(self) -> list[int]:
        """The epoch's whole draw, the same on every rank."""
        return list(super().__iter__())

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_indices()[self.rank :: self.world_size])


def all_mean(value: float, device: torch.device) -> float:
    """The mean of ``value`` over the ranks (``value`` itself outside a process group)."""
    _, world_size = world()
    if world_size == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size


def gather_in_order(indices: Sequence[int], values: Sequence[Any]) -> list[Any]:
    """Every rank's ``values`` (one per item index), merged and sorted by index: the same list,
    in the same order, as one process scoring all items would make."""
    _, world_size = world()
    pairs = list(zip(indices, values, strict=True))
    if world_size > 1:
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, pairs)
        pairs = [pair for part in parts for pair in part]
    seen: dict[int, Any] = {}
    for index, value in pairs:
        seen.setdefault(int(index), value)  # a padded shard repeats an item: keep one
    return [seen[i] for i in sorted(seen)]


def _backend(config: DistributedConfig, device_type: str) -> str:
    if config.backend != "auto":
        return config.backend
    return "nccl" if device_type == "cuda" else "gloo"


def init_process_group(config: DistributedConfig, device: str = "auto") -> torch.device:
    """Join the process group torchrun set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
    rendezvous in the environment); on CUDA each process takes the GPU of its local rank.
    Returns the device this process trains on."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        here = torch.device("cuda", local_rank)
    else:
        here = torch.device("cpu" if device == "auto" else device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=_backend(config, here.type),
            timeout=datetime.timedelta(seconds=config.timeout_s),
        )
    return here


def torchrun_command(
    config: DistributedConfig, module: str, args: Sequence[str], *, python: str | None = None
) -> list[str]:
    """The ``torchrun`` command line that starts ``python -m module args`` in every process of
    this machine (a local standalone rendezvous unless ``rdzv_endpoint`` is set)."""
    command = [python or sys.executable, "-m", "torch.distributed.run"]
    command += ["--nnodes", str(config.nnodes), "--nproc-per-node", str(config.nproc_per_node)]
    if config.rdzv_endpoint:
        command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", config.rdzv_endpoint]
        command += ["--rdzv-id", config.rdzv_id]
    else:
        command.append("--standalone")
    command += ["--max-restarts", "0", "-m", module, *args]
    return command


def launch(command: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None) -> None:
    """Run a torchrun command to its end, its output copied to ``log_path`` and the logger.

    Raises :class:`TorchrunError` with the command and the last lines of the log when any process
    fails (torchrun then stops the others).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("torchrun: %s", " ".join(command))
    full_env = {**os.environ, **(env or {})}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            log.flush()
            logger.debug("torchrun | %s", line.rstrip())
        code = process.wait()
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise TorchrunError(
            f"torchrun exited with {code} (log {log_path}); command: {' '.join(command)}\n{tail}"
        )


def seed_for_rank(seed: int, epoch: int, rank: int) -> None:
    """Seed torch's generator for one rank's epoch (dropout and other in-model randomness):
    different on every rank, the same on a rerun or a resume."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))
