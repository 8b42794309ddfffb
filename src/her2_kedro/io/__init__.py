"""Kedro dataset classes: defensive raw inputs, lazily written cores, figures, the synthetic cohort."""
