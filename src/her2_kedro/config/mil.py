"""Parameters of MIL tile bags and class-balanced sampling (not yet wired into a YAML section).

The tile rule itself (tile size, stride, background grey, minimum tissue) is the shared
:class:`~her2_kedro.config.shared.TileConfig` of ``parameters_tiles.yml``; these models hold only
what is specific to building bags for a model and drawing training cores.
"""

from __future__ import annotations

from pydantic import Field

from her2_kedro.config.base import Strict


class BagConfig(Strict):
    """How a core becomes a bag of model inputs.

    ``input_size``: side (px) tiles are resized to (torch bilinear, antialiased); ``None`` keeps
    them at the tile size. ``max_tiles``: cap on a training bag (a random subset of the kept tiles
    each epoch); ``None`` keeps all. ``eval_max_tiles``: cap on an evaluation bag (the most
    tissue-rich tiles, deterministic); ``None`` (default) keeps the full bag as the authors did.
    ``random_offset`` / ``flips``: the paper's training augmentation (random tile-grid offset in
    [0, tile_size), random horizontal and vertical flips per tile); never applied at evaluation.
    """

    input_size: int | None = Field(64, ge=8)
    max_tiles: int | None = Field(None, ge=1)
    eval_max_tiles: int | None = Field(None, ge=1)
    random_offset: bool = True
    flips: bool = True


class SamplingConfig(Strict):
    """Five-class balanced sampling of training cores; ``num_samples`` per epoch (None: one per
    training core)."""

    num_samples: int | None = Field(None, ge=1)
