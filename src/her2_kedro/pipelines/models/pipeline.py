"""The CNN studies: one modular pipeline per declared model and task, then the shared reports.

``mil``, ``resnet`` and ``clam`` are the same construction over different YAML sections
(``mil_study``, ``resnet_study``, ``clam_study``): each declared model gets the namespace
``<model>.<task>`` per task, reading only what its input kind needs.
"""

from __future__ import annotations

import warnings
from typing import Any

from kedro.pipeline import Node, Pipeline

from her2_kedro.config import TORCH_STUDIES, ParameterError, TorchModelConfig, TorchStudyParams
from her2_kedro.config.project import project_parameters
from her2_kedro.pipelines.models import nodes

#: What each input kind reads from the catalog (besides the task table), by node keyword.
_SOURCES: dict[str, dict[str, str]] = {
    "tiles": {"accepted_cores": "accepted_cores", "reference_stains": "reference_stains"},
    "tile_batches": {"accepted_cores": "accepted_cores", "reference_stains": "reference_stains"},
    "core_image": {"accepted_cores": "accepted_cores", "reference_stains": "reference_stains"},
    "embeddings": {"tile_embeddings": "tile_embeddings", "embedding_index": "embedding_index"},
}
_SHARED = [
    "core_manifest",
    "tile_index",
    "accepted_cores",
    "reference_stains",
    "tile_embeddings",
    "embedding_index",
    "encoder_checkpoint",
]


def declared_torch_study(
    family: str, parameters: dict[str, Any] | None = None
) -> TorchStudyParams | None:
    """The models and tasks a family's YAML section declares (None when the section is absent)."""
    if family not in TORCH_STUDIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(TORCH_STUDIES)}")
    if parameters is None:
        parameters = project_parameters()
    section = TORCH_STUDIES[family]
    if section not in parameters:
        return None
    try:
        return TorchStudyParams.model_validate(parameters[section])
    except ValueError as err:
        raise ParameterError(f"{section}: {err}") from err


def model_template(spec: TorchModelConfig) -> Pipeline:
    """Bag table → train (resumable) → score every core, for one model (namespaced per task)."""
    sources = dict(_SOURCES[spec.input])
    if spec.needs_trained_encoder:
        sources["encoder_checkpoint"] = "encoder_checkpoint"
    common = {
        "model": "params:model",
        "task": "params:task",
        "tiles": "params:tiles",
        "cohorts": "params:cohorts",
        **sources,
    }
    # the checkpoint whose head training starts from (mapped to `<init_head>.<task>.checkpoint`)
    head = {"head_checkpoint": "head_checkpoint"} if spec.init_head else {}
    return Pipeline(
        [
            Node(
                nodes.build_bag_table,
                inputs=["core_manifest", "tile_index", "params:task", "params:cohorts"],
                outputs=["table", "table_problems"],
                name="build_bag_table",
            ),
            Node(
                nodes.train_model,
                inputs={"table": "table", "workdir": "workdir", **common, **head},
                outputs=["checkpoint", "history"],
                name="train_model",
            ),
            Node(
                nodes.evaluate_model,
                inputs={"checkpoint": "checkpoint", "table": "table", **common},
                outputs=[
                    "predictions",
                    "metrics",
                    "attention",
                    "tables",
                    "figures",
                    "mlflow_metrics",
                ],
                name="evaluate_model",
            ),
        ]
    )


def _head_input(spec: TorchModelConfig, task: str) -> dict[str, str]:
    """The template's ``head_checkpoint`` input, mapped to the ``init_head`` model's checkpoint of
    the same task (none without ``init_head``)."""
    if spec.init_head is None:
        return {}
    return {"head_checkpoint": f"{spec.init_head}.{task}.checkpoint"}


def create_pipeline(
    family: str = "mil", study: TorchStudyParams | None = None, **kwargs
) -> Pipeline:
    """Every declared model x task of a family, then its reports (empty if nothing is declared)."""
    section = TORCH_STUDIES[family]
    study = study or declared_torch_study(family)
    if study is None:
        return Pipeline([])
    names, parts = [], []
    for model, spec in study.models.items():
        template = model_template(spec)
        for task in study.tasks:
            names.append(f"{model}.{task}")
            parts.append(
                Pipeline(
                    template,
                    namespace=f"{model}.{task}",
                    inputs={
                        **{name: name for name in _SHARED if name in template.inputs()},
                        **_head_input(spec, task),
                    },
                    parameters={
                        "params:model": f"params:{section}.models.{model}",
                        "params:task": f"params:{section}.tasks.{task}",
                        "params:tiles": "params:tiles",
                        "params:cohorts": "params:cohorts",
                    },
                )
            )
    with warnings.catch_warnings():
        # the report node reads the namespaced outputs by their full, dotted names on purpose
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")
        report = Pipeline(
            [
                Node(
                    nodes.collect_reports,
                    inputs=[
                        "previous_metrics",
                        "previous_predictions",
                        "previous_attention",
                        *[f"{n}.metrics" for n in names],
                        *[f"{n}.predictions" for n in names],
                        *[f"{n}.attention" for n in names],
                    ],
                    outputs=[f"{family}_metrics", f"{family}_predictions", f"{family}_attention"],
                    name=f"collect_{family}_reports",
                )
            ]
        )
    return Pipeline([*parts, report], tags=[family])
