"""Kedro settings for her2_kedro (everything else keeps Kedro's defaults)."""

import logging
import warnings

from kedro.config import OmegaConfigLoader

from her2_kedro.hooks import ManifestVersionHook, ValidateParametersHook

# Deprecation chatter from third-party plugins (kedro-mlflow, mlflow) that users cannot act on.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated")
_PYFUNC_HINT = "Add type hints to the `predict` method"
warnings.filterwarnings("ignore", message=rf".*{_PYFUNC_HINT}")
# mlflow raises that one inside its own `simplefilter("once")` (kedro-mlflow's pipeline model is
# defined while Kedro loads the plugin's commands), so no filter above reaches it: Kedro logs
# warnings through `py.warnings`, where it is dropped instead.
logging.getLogger("py.warnings").addFilter(lambda record: _PYFUNC_HINT not in record.getMessage())

HOOKS = (ValidateParametersHook(), ManifestVersionHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # conf/paper overrides single keys of a section rather than replacing the whole section
    "merge_strategy": {"parameters": "soft"},
}
