"""Kedro settings for her2_kedro (everything else keeps Kedro's defaults)."""

import warnings

from kedro.config import OmegaConfigLoader

from her2_kedro.hooks import ManifestVersionHook, ValidateParametersHook

# Deprecation chatter from third-party plugins (kedro-mlflow, mlflow) that users cannot act on.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated")
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method")

HOOKS = (ValidateParametersHook(), ManifestVersionHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # conf/paper overrides single keys of a section rather than replacing the whole section
    "merge_strategy": {"parameters": "soft"},
}
