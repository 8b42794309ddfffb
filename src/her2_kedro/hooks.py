"""Project hooks: check the parameter files before any node runs; record which manifest was loaded."""

from __future__ import annotations

from typing import Any

import pandas as pd
from kedro.framework.context import KedroContext
from kedro.framework.hooks import hook_impl

from her2_kedro.config import IntensityStudyParams, ParameterError, validate_parameters
from her2_kedro.config.project import project_parameters, run_env


def _study_shape(study: IntensityStudyParams) -> dict[str, object]:
    return {
        "models": {name: m.features_table for name, m in study.models.items()},
        "tasks": sorted(study.tasks),
    }


def check_study_matches_pipeline(params_study: IntensityStudyParams | None) -> None:
    """The session's models and tasks must be those the intensity pipeline was built from.

    The registry reads conf/ for ``KEDRO_ENV`` (set by ``kedro run --env``); a session created in
    Python with another ``env`` and other models would otherwise run a pipeline that ignores them.
    """
    declared = project_parameters().get("intensity_study")
    if params_study is None or declared is None:
        return
    built = _study_shape(IntensityStudyParams.model_validate(declared))
    wanted = _study_shape(params_study)
    if built != wanted:
        raise ParameterError(
            f"intensity_study declares {wanted}, but the intensity pipeline was built from the "
            f"'{run_env()}' environment's {built}. Run with `kedro run --env=<env>` or set "
            "KEDRO_ENV so that both read the same conf/ environment."
        )


#: The versioned dataset whose loaded version every downstream row records.
MANIFEST_DATASET = "core_manifest"
#: ``DataFrame.attrs`` key that carries the manifest's catalog version into the nodes.
VERSION_ATTR = "manifest_version"


class ValidateParametersHook:
    """Fail fast, with the section and key named, when a parameter file holds a bad value."""

    @hook_impl
    def after_context_created(self, context: KedroContext) -> None:
        validated = validate_parameters(context.params)
        check_study_matches_pipeline(validated.get("intensity_study"))


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
