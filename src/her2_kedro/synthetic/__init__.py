"""Synthetic HER2 IHC cohort: stain optics, procedural cores, labelled cohorts and TMA slides.

Modules: ``optics`` (stain vectors, Beer-Lambert), ``geometry`` (fields, core outline, gland
architecture), ``cells`` (tessellation, nuclei, membranes), ``staining`` (what the labels change:
HER2 staining categories and the status cue's atypia), ``render`` (``CoreSpec``, ``render_core``),
``cohort`` (labelled cohort tables) and ``slide`` (whole TMA slides).
"""

# Bump when the rendering changes, so that a cohort written by an older generator is rewritten.
GENERATOR_VERSION = 5
