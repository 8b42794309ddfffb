"""Kedro runners of the project: ``kedro run --runner=her2_kedro.runners.DaskRunner``."""

from her2_kedro.runners.dask_runner import DaskRunner

__all__ = ["DaskRunner"]
