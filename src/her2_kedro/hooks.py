"""Project hooks: check the parameter files before any node runs; record which manifest was loaded."""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
from kedro.framework.context import KedroContext
from kedro.framework.hooks import hook_impl
from kedro.framework.project import pipelines

from her2_kedro.config import (
    TORCH_STUDIES,
    IntensityStudyParams,
    ParameterError,
    TorchStudyParams,
    validate_parameters,
)
from her2_kedro.config.project import project_parameters, run_env


def _study_shape(study: IntensityStudyParams | TorchStudyParams) -> dict[str, object]:
    """What a study's pipeline is built from: each model's input (and the model whose head it
    starts from, an input of its training node) and the tasks."""
    inputs: dict[str, object] = {}
    for name, m in study.models.items():
        inputs[name] = getattr(m, "features_table", None) or getattr(m, "input", None)
        if getattr(m, "init_head", None):
            inputs[name] = f"{inputs[name]}, init_head {m.init_head}"
    return {"models": inputs, "tasks": sorted(study.tasks)}


def check_study_matches_pipeline(
    params_study: IntensityStudyParams | TorchStudyParams | None,
    section: str = "intensity_study",
) -> None:
    """The session's models and tasks must be those the study's pipeline was built from.

    The registry reads conf/ for ``KEDRO_ENV`` (set from the session's env by the hook below);
    parameters given at run time (``--params``) that would change the graph are refused here.
    """
    declared = project_parameters().get(section)
    if params_study is None or declared is None:
        return
    built = _study_shape(type(params_study).model_validate(declared))
    wanted = _study_shape(params_study)
    if built != wanted:
        raise ParameterError(
            f"{section} declares {wanted}, but its pipeline was built from the "
            f"'{run_env()}' environment's {built}. The models, their inputs, `init_head` and the "
            "tasks shape the pipeline, so they are read from conf/ (not from --params): set them "
            "in conf/<env>/ and run with `kedro run --env=<env>` (or set KEDRO_ENV) so that both "
            "read the same environment."
        )


#: The versioned dataset whose loaded version every downstream row records.
MANIFEST_DATASET = "core_manifest"
#: ``DataFrame.attrs`` key that carries the manifest's catalog version into the nodes.
VERSION_ATTR = "manifest_version"


def use_env_for_pipelines(env: str | None) -> None:
    """Build the pipelines from ``env``'s conf/: the registry reads conf/ for ``KEDRO_ENV``, which
    `kedro run --env` does not set, and a declared model or ``init_head`` shapes the graph."""
    if not env or run_env() == env:
        return
    os.environ["KEDRO_ENV"] = env
    # forget pipelines built from another environment (Kedro has no public way to ask for that)
    pipelines.configure(pipelines._pipelines_module)


class ValidateParametersHook:
    """Fail fast, with the section and key named, when a parameter file holds a bad value."""

    @hook_impl
    def after_context_created(self, context: KedroContext) -> None:
        use_env_for_pipelines(context.env)
        validated = validate_parameters(context.params)
        for section in ("intensity_study", *TORCH_STUDIES.values()):
            check_study_matches_pipeline(validated.get(section), section)


class ManifestVersionHook:
    """Tag each loaded ``core_manifest`` with the version the catalog loaded it from.

    Kedro resolves the version inside the dataset (``--load-versions=core_manifest:<v>``, or the
    latest); the hook reads it back after each load and stores it in the frame's ``attrs``, where
    :func:`manifest_version` finds it. Outside a Kedro session (plain function calls) it is ''.
    """

    def __init__(self) -> None:
        self._catalog: Any = None

    @hook_impl
    def after_catalog_created(self, catalog: Any) -> None:
        self._catalog = catalog

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any) -> None:
        if dataset_name != MANIFEST_DATASET or not isinstance(data, pd.DataFrame):
            return
        if self._catalog is None or dataset_name not in self._catalog:
            return
        resolve = getattr(self._catalog[dataset_name], "resolve_load_version", None)
        data.attrs[VERSION_ATTR] = (resolve() if resolve else None) or ""


def manifest_version(manifest: pd.DataFrame) -> str:
    """The catalog version a manifest frame was loaded from ('' when unknown or unversioned)."""
    return str(manifest.attrs.get(VERSION_ATTR, "") or "")
