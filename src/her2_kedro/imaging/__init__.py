"""Pixels and stains: the grey/foreground rule, tiling, colour deconvolution, Macenko normalisation."""
