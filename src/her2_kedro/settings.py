"""Kedro settings for her2_kedro (everything else keeps Kedro's defaults)."""

from kedro.config import OmegaConfigLoader

from her2_kedro.hooks import ValidateParametersHook

HOOKS = (ValidateParametersHook(),)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # conf/paper overrides single keys of a section rather than replacing the whole section
    "merge_strategy": {"parameters": "soft"},
}
