"""Per-core preprocessing (normalise, tile, deconvolve) and the staining-intensity descriptors."""
