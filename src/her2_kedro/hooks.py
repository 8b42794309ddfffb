"""Project hooks: check the parameter files before any node runs; record which manifest was loaded."""

from __future__ import annotations

from typing import Any

import pandas as pd
from kedro.framework.context import KedroContext
from kedro.framework.hooks import hook_impl

from her2_kedro.config import validate_parameters

#: The versioned dataset whose loaded version every downstream row records.
MANIFEST_DATASET = "core_manifest"
#: ``DataFrame.attrs`` key that carries the manifest's catalog version into the nodes.
VERSION_ATTR = "manifest_version"


class ValidateParametersHook:
    """Fail fast, with the section and key named, when a parameter file holds a bad value."""

    @hook_impl
    def after_context_created(self, context: KedroContext) -> None:
        validate_parameters(context.params)


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
