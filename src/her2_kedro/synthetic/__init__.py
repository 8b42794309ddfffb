"""Synthetic HER2 IHC cohort: stain optics, procedural cores, labelled cohorts and TMA slides."""

# Bump when the rendering changes, so that a cohort written by an older generator is rewritten.
GENERATOR_VERSION = 3
