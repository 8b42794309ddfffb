"""Parameters of the CNN studies: the tile encoder behind the embedding cache (``encoder``,
``parameters_features.yml``) and the torch models of the ``mil``, ``resnet`` and ``clam`` pipelines
(``mil_study``, ``resnet_study``, ``clam_study``).

Every torch model is declared the same way: which input it reads (tile bags cut from the cores,
cached tile embeddings, or the whole core image), which registered architecture it is with which
constructor parameters, and the shared training loop's settings. Each study's pipeline builds one
namespace ``<model>.<task>`` per declared model and task, as the intensity study does.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from her2_kedro.config.base import Strict, check_keys_are_names
from her2_kedro.config.intensity import TaskConfig
from her2_kedro.config.mil import BagConfig, DistributedConfig, TrainingConfig

#: ``encoder_weights`` value that names the backbone trained by the ``features`` pipeline.
TRAINED_ENCODER = "trained"


class EncoderConfig(Strict):
    """The tile encoder of the embedding cache (``kedro run --pipelines=features``).

    ``name``: a registered trunk (resnet18 / resnet34 / resnet50); ``weights``: its initial
    weights (``None``: random, as the authors; a torchvision enum name; a local checkpoint path).
    With ``train`` the trunk is first trained on the training cores (``target``: the five classes
    0, 1, 2-, 2+, 3 by default; the epoch is selected on validation cores), then frozen: a frozen
    random trunk sees little, and no pretrained weights can be downloaded here. ``method``:
    ``tile_classifier`` (default: each tile labelled with its core's class, batches of
    ``bag.cores_per_batch`` cores' tiles) or ``mil`` (end-to-end gated-attention MIL, one core per
    step). Tiles are read as ``bag`` says (``bag.input_size`` is also the embedding input size).
    ``prune_stale_embeddings``: delete cache entries no current core uses (an earlier encoder's,
    or removed cores'); inference-only settings do not change which encoder is trained.
    ``device_preprocessing``: ``auto`` decodes (nvJPEG), normalises, tiles and embeds cores on the
    GPU when training runs on CUDA, reading overlapped with computing
    (:mod:`her2_kedro.features.device_embedding`; bf16 entries get their own cache keys);
    ``always`` takes the same torch path on the CPU too, ``never`` the numpy path everywhere.
    ``compile_trunk``: ``torch.compile`` the trunk on that path.
    ``distributed``: train the encoder with ``torchrun`` over several processes, GPUs or machines.
    """

    name: str = "resnet18"  # learns most per CPU minute (benchmarks/encoder_budget.py)
    weights: str | None = None
    train: bool = True
    method: Literal["tile_classifier", "mil"] = "tile_classifier"
    target: Literal["five_class", "ihc_score", "her2_status"] = "five_class"
    bag: BagConfig = BagConfig(input_size=64, max_tiles=4, cores_per_batch=32)
    training: TrainingConfig = TrainingConfig(
        max_epochs=60, plateau_patience=5, early_stopping_patience=15, precise_bn_batches=8
    )
    hidden_dim: int = Field(256, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    micro_batch: int = Field(64, ge=1)
    grad_checkpoint: bool = False
    embedding_batch_size: int = Field(128, ge=1)
    channels_last: bool = True
    prune_stale_embeddings: bool = True
    device_preprocessing: Literal["auto", "always", "never"] = "auto"
    compile_trunk: bool = False
    distributed: DistributedConfig = DistributedConfig()

    #: Fields that change how the work is run or embeddings are kept, not the trained encoder
    #: (a finished encoder is reused whatever they are).
    INFERENCE_ONLY: ClassVar[frozenset[str]] = frozenset(
        {
            "embedding_batch_size",
            "prune_stale_embeddings",
            "device_preprocessing",
            "compile_trunk",
            "distributed",
        }
    )


class ImageConfig(Strict):
    """Whole-core input of the ResNet classifier: the core downscaled to a square ``input_size``
    (1024 px in the paper), ``batch_size`` cores per step, random flips, decoded images cached."""

    input_size: int = Field(128, ge=16)
    batch_size: int = Field(32, ge=2)
    flips: bool = True
    cache: bool = True


class TorchModelConfig(Strict):
    """One torch model of a study.

    ``input``: ``tiles`` (bags cut from the cores on demand, end to end through ``encoder``),
    ``tile_batches`` (tiles of several cores per batch, each with its core's label: a tile
    classifier), ``embeddings`` (the features pipeline's cache) or ``core_image`` (the whole core).
    ``arch``: a registered architecture (``attention_mil``, ``clam``, ``torchmil``,
    ``core_classifier``) built with ``params`` plus the task's ``n_classes``. ``encoder`` /
    ``encoder_weights``: the trunk of ``tiles`` and ``core_image`` models; ``encoder_weights:
    trained`` starts from the features pipeline's trained backbone (``encoder`` left out: that
    backbone's trunk), ``None`` from random weights (the paper). ``labels``: train on the task's
    own classes (``task``, the paper) or on the five classes 0, 1, 2-, 2+, 3 (``five_class``),
    whose probabilities are summed into the task's classes for selection and scoring.
    ``distributed``: train with ``torchrun`` over several processes, GPUs or machines (DDP).
    ``init_head``: an end-to-end attention-MIL model on the trained trunk starts its attention and
    classifier from this model's checkpoint for the same task (a model of the same study on the
    cached embeddings of that trunk), then fine-tunes trunk and head together (beyond the paper).
    """

    name: str
    input: Literal["tiles", "tile_batches", "embeddings", "core_image"]
    arch: str
    params: dict[str, Any] = {}
    encoder: str | None = None  # None: the trained backbone's trunk, else resnet34
    encoder_weights: str | None = None
    labels: Literal["task", "five_class"] = "task"
    bag: BagConfig = BagConfig()
    image: ImageConfig = ImageConfig()
    training: TrainingConfig = TrainingConfig()
    distributed: DistributedConfig = DistributedConfig()
    init_head: str | None = None

    @property
    def needs_trained_encoder(self) -> bool:
        """Whether the model reads what the features pipeline makes (cache or trained trunk)."""
        return self.input == "embeddings" or self.encoder_weights == TRAINED_ENCODER


class TorchStudyParams(Strict):
    """A study of torch models: its tasks and models, each key equal to its entry's name."""

    tasks: dict[str, TaskConfig] = Field(min_length=1)
    models: dict[str, TorchModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _keys_are_names(self) -> TorchStudyParams:
        check_keys_are_names(tasks=self.tasks, models=self.models)
        return self

    @model_validator(mode="after")
    def _heads_fit(self) -> TorchStudyParams:
        """``init_head`` names a model of this study whose head is shaped as the model's own and
        was trained on embeddings of the same trunk (the trained encoder's)."""
        for name, spec in self.models.items():
            if spec.init_head is None:
                continue
            source = self.models.get(spec.init_head)
            where = f"models.{name}.init_head: {spec.init_head!r}"
            if source is None:
                raise ValueError(f"{where} is not a model of this study ({sorted(self.models)})")
            if spec.input != "tiles" or spec.encoder_weights != TRAINED_ENCODER:
                raise ValueError(
                    f"{where}: only an end-to-end model (input tiles) on the trained trunk "
                    f"(encoder_weights: {TRAINED_ENCODER}) starts from a head on its embeddings"
                )
            if source.input != "embeddings" or {source.arch, spec.arch} != {"attention_mil"}:
                raise ValueError(
                    f"{where} must be an attention_mil model on embeddings "
                    f"(it is {source.arch} on {source.input}; {name} is {spec.arch})"
                )
            if source.labels != spec.labels:
                raise ValueError(
                    f"{where} trains on labels {source.labels!r}, {name} on {spec.labels!r}: "
                    "their classifiers differ in size"
                )
            if source.params.get("hidden_dim", 256) != spec.params.get("hidden_dim", 256):
                raise ValueError(f"{where}: its attention hidden_dim differs from {name}'s")
        return self
