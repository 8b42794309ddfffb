"""Kedro pipelines: thin nodes that wire the her2_kedro library to the data catalog."""
