"""Intensity study: one modular pipeline, namespaced per feature set (model) and task."""

import warnings
from typing import Any

from kedro.pipeline import Node, Pipeline

from her2_kedro.config import IntensityStudyParams, ParameterError
from her2_kedro.config.project import project_parameters
from her2_kedro.pipelines.intensity import nodes


def study_template() -> Pipeline:
    """Task table → fit with C chosen on validation → evaluate (the same for every model and task)."""
    return Pipeline(
        [
            Node(
                nodes.build_task_table,
                inputs=[
                    "core_manifest",
                    "features",
                    "params:task",
                    "params:model",
                    "params:cohorts",
                ],
                outputs=["table", "feature_problems"],
                name="build_task_table",
            ),
            Node(
                nodes.fit_model,
                inputs=["table", "params:task", "params:model", "params:seed"],
                outputs=["model", "model_selection"],
                name="fit_model",
            ),
            Node(
                nodes.evaluate_model,
                inputs=["model", "table", "model_selection", "params:task", "params:model"],
                outputs=["predictions", "metrics", "tables", "figures", "mlflow_metrics"],
                name="evaluate_model",
            ),
        ]
    )


def declared_study(parameters: dict[str, Any] | None = None) -> IntensityStudyParams:
    """The study's models and tasks as ``parameters_intensity.yml`` declares them."""
    if parameters is None:
        parameters = project_parameters()
    if "intensity_study" not in parameters:
        raise ParameterError(
            "No intensity_study section found in conf/ (parameters_intensity.yml): the intensity "
            "pipeline builds its models and tasks from it"
        )
    return IntensityStudyParams.model_validate(parameters["intensity_study"])


def create_pipeline(study: IntensityStudyParams | None = None, **kwargs) -> Pipeline:
    """One namespace ``<model>.<task>`` per declared model and task, then the shared reports."""
    study = study or declared_study()
    names = [f"{model}.{task}" for model in study.models for task in study.tasks]
    studies = [
        Pipeline(
            study_template(),
            namespace=f"{model}.{task}",
            inputs={"core_manifest": "core_manifest", "features": config.features_table},
            parameters={
                "params:task": f"params:intensity_study.tasks.{task}",
                "params:model": f"params:intensity_study.models.{model}",
                "params:seed": "params:intensity_study.seed",
                "params:cohorts": "params:cohorts",
            },
        )
        for model, config in study.models.items()
        for task in study.tasks
    ]
    with warnings.catch_warnings():
        # the report node reads the namespaced outputs by their full, dotted names on purpose
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")
        report = _report_node(names)
    return Pipeline([*studies, report], tags=["intensity"])


def _report_node(names: list[str]) -> Pipeline:
    """Collects every namespace's metrics and predictions into the shared report tables."""
    return Pipeline(
        [
            Node(
                nodes.collect_reports,
                inputs=[
                    "previous_metrics",
                    "previous_predictions",
                    *[f"{n}.metrics" for n in names],
                    *[f"{n}.predictions" for n in names],
                ],
                outputs=["metrics", "predictions"],
                name="collect_intensity_reports",
            )
        ]
    )
