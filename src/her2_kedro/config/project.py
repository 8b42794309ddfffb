"""The project's parameters read outside a Kedro session, for the pipeline registry.

Kedro builds pipelines before it hands parameters to nodes, yet the intensity study's namespaces
(one per model and task) are declared in ``parameters_intensity.yml``. The registry therefore reads
the same files the session will read: ``conf/base`` merged with the run's environment
(``KEDRO_ENV``, which ``kedro run --env`` sets; ``local`` otherwise), with the project's loader
settings. The parameter hook checks that the session's own parameters agree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kedro.config import OmegaConfigLoader


def project_root(start: Path | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working directory) with Kedro's
    ``pyproject.toml``; the source checkout of this package when there is none."""
    for folder in [start or Path.cwd(), *(start or Path.cwd()).parents]:
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and "[tool.kedro]" in pyproject.read_text(errors="replace"):
            return folder
    checkout = Path(__file__).resolve().parents[3]
    return checkout if (checkout / "conf" / "base").is_dir() else None


def run_env(env: str | None = None) -> str:
    """The configuration environment a ``kedro run`` in this process uses."""
    return env or os.environ.get("KEDRO_ENV") or "local"


def project_parameters(env: str | None = None, root: Path | None = None) -> dict[str, Any]:
    """Every parameter of ``conf/base`` merged with ``conf/<env>``; {} outside a project."""
    from her2_kedro.settings import CONFIG_LOADER_ARGS  # lazy: settings import the hooks

    root = root or project_root()
    if root is None or not (root / "conf").is_dir():
        return {}
    args = {k: v for k, v in CONFIG_LOADER_ARGS.items() if k != "default_run_env"}
    loader = OmegaConfigLoader(conf_source=str(root / "conf"), env=run_env(env), **args)
    return dict(loader["parameters"])


#: How a catalog path starts that lies under the data folder (``conf/base/globals.yml``).
DATA_ROOT_PREFIXES = ("${globals:data_root}/", "data/")


def rebase_data_paths(config: Any, data_root: Path) -> Any:
    """A raw catalog configuration with every path under the data folder moved under
    ``data_root`` (a temporary copy of the project's data layers, for tests and benchmarks)."""
    if isinstance(config, dict):
        return {k: rebase_data_paths(v, data_root) for k, v in config.items()}
    if isinstance(config, list):
        return [rebase_data_paths(v, data_root) for v in config]
    if isinstance(config, str):
        for prefix in DATA_ROOT_PREFIXES:
            if config.startswith(prefix):
                return str(data_root / config.removeprefix(prefix))
    return config
