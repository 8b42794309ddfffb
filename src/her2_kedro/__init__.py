"""her2_kedro: HER2 scoring of IHC tissue-microarray cores (Pisula et al., BJC 2023)."""

__version__ = "0.1.0"
