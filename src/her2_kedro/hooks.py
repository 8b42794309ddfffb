"""Project hooks: check the parameter files before any node runs."""

from __future__ import annotations

from kedro.framework.context import KedroContext
from kedro.framework.hooks import hook_impl

from her2_kedro.config import validate_parameters


class ValidateParametersHook:
    """Fail fast, with the section and key named, when a parameter file holds a bad value."""

    @hook_impl
    def after_context_created(self, context: KedroContext) -> None:
        validate_parameters(context.params)
