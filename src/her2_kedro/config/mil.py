"""Parameters of MIL tile bags and of the shared training loop (parts of the ``encoder`` and
``*_study`` sections, :mod:`her2_kedro.config.models`).

The tile rule itself (tile size, stride, background grey, minimum tissue) is the shared
:class:`~her2_kedro.config.shared.TileConfig` of ``parameters_tiles.yml``; these models hold only
what is specific to building bags (or whole-core batches) for a model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from her2_kedro.config.base import Strict


class BagConfig(Strict):
    """How a core becomes a bag of model inputs.

    ``input_size``: side (px) tiles are resized to (torch bilinear, antialiased); ``None`` keeps
    them at the tile size. ``max_tiles``: cap on a training bag (a random subset of the kept tiles
    each epoch); ``None`` keeps all. ``eval_max_tiles``: cap on an evaluation bag (the most
    tissue-rich tiles, deterministic); ``None`` (default) keeps the full bag as the authors did.
    ``random_offset`` / ``flips``: the paper's training augmentation (random tile-grid offset in
    [0, tile_size), random horizontal and vertical flips per tile); never applied at evaluation.
    ``cores_per_batch``: for tile-classifier training (input ``tile_batches``), the cores whose
    tiles make one batch. ``stain_jitter``: sigma of a random per-tile scale and shift of the H, E
    and DAB concentrations in training (0: off, the paper; about 0.05 in Tellez et al. 2018).
    """

    input_size: int | None = Field(64, ge=8)
    max_tiles: int | None = Field(None, ge=1)
    eval_max_tiles: int | None = Field(None, ge=1)
    random_offset: bool = True
    flips: bool = True
    cores_per_batch: int = Field(8, ge=1)
    stain_jitter: float = Field(0.0, ge=0.0, le=0.5)


class DistributedConfig(Strict):
    """Data-parallel training of one model with ``torchrun`` (DDP), launched by its training node.

    ``nproc_per_node``: processes on each machine (one per GPU; on CPU, gloo processes); 1 keeps
    the single-process loop. ``nnodes`` > 1 spreads them over machines: every other machine runs
    the command the node logs, against ``rdzv_endpoint`` (``host:port`` of the first machine),
    and ``job_dir`` must then be a folder all machines share. ``backend``: ``auto`` takes NCCL on
    CUDA and gloo otherwise. Each process trains on its shard of the five-class draw; gradients
    are averaged, so ``nproc_per_node * nnodes * grad_accumulation`` bags make one step.
    """

    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str | None = None  # None: a local standalone rendezvous (one machine only)
    rdzv_id: str = "her2_kedro"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    job_dir: str | None = None  # None: <model work folder>/torchrun
    timeout_s: int = Field(1800, ge=10)  # collective-operation timeout

    @property
    def world_size(self) -> int:
        """How many processes train together."""
        return self.nproc_per_node * self.nnodes

    @model_validator(mode="after")
    def _multi_node_needs_endpoint(self) -> DistributedConfig:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port of the first machine)")
        return self


class TrainingConfig(Strict):
    """The shared torch training loop (:func:`her2_kedro.modelling.training.train`).

    Adam (``lr``, ``betas``, ``weight_decay``: the authors' 1e-3, (0.9, 0.999), 1e-8); the learning
    rate is multiplied by ``plateau_factor`` once validation balanced accuracy has not improved for
    more than ``plateau_patience`` epochs; training stops after ``early_stopping_patience`` epochs
    without improvement (``None``: never early). ``selection`` returns the best validation epoch
    (ties: the earlier) or the ``last`` (the authors' code). ``device``: ``auto`` (CUDA if
    available, else CPU) or a torch device string; ``bf16`` autocasts on CUDA only.
    ``grad_accumulation`` bags (batch size 1) are summed into one optimiser step.
    ``precise_bn_batches``: after each epoch, BatchNorm running statistics are recomputed from
    this many training items (0: off), so small-batch CPU training evaluates as it trains.
    """

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-8, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_epochs: int = Field(20, ge=1)
    plateau_factor: float = Field(0.3, gt=0, lt=1)
    plateau_patience: int = Field(5, ge=0)
    early_stopping_patience: int | None = Field(10, ge=1)
    selection: Literal["best_val", "last"] = "best_val"
    seed: int = Field(0, ge=0)
    device: str = "auto"
    bf16: bool = True
    grad_accumulation: int = Field(1, ge=1)
    num_workers: int = Field(0, ge=0)
    precise_bn_batches: int = Field(0, ge=0)
