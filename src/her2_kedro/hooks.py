"""Project hooks: check the parameter files before any node runs."""

from __future__ import annotations

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


class ValidateParametersHook:
    """Fail fast, with the section and key named, when a parameter file holds a bad value."""

    @hook_impl
    def after_context_created(self, context: KedroContext) -> None:
        validated = validate_parameters(context.params)
        check_study_matches_pipeline(validated.get("intensity_study"))
