"""Synthetic HER2 IHC cohort: stain optics, procedural cores, labelled cohorts and TMA slides."""
