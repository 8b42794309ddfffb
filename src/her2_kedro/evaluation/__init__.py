"""Balanced metrics, tasks, model selection on validation and evaluation on test and external."""
