"""Fig. 3 of the paper: a core beside the attention of its status and score models and its mean-DAB
tile map, each normalised to [0, 1] on the same tile grid, plus the tiles where attention and
staining disagree most (the paper's white arrows), with thumbnails.

The maps are per tile, not per pixel: attention is one weight per 224 px tile, and the paper's DAB
map is the tile's mean DAB, the intensity baseline's instance feature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from PIL import Image

from her2_kedro.features.intensity import tile_mean_dab
from her2_kedro.imaging.stain import dab_channel


def unit_range(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """``values`` min-max scaled to [0, 1]; a constant (or single) value maps to 0.5, NaN stays."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if not finite.any():
        return v.copy()
    low, high = v[finite].min(), v[finite].max()
    if high - low <= 1e-12:
        return np.where(finite, 0.5, np.nan)
    return (v - low) / (high - low)


def tile_grid(
    tiles: pd.DataFrame, column: str, tile_size: int, height: int, width: int
) -> np.ndarray:
    """A (rows, cols) map of ``column`` on the tile grid from (0, 0); NaN where no tile was kept.

    Tiles whose corner is not on the grid (a training offset) are placed in the cell holding
    their top-left corner.
    """
    rows, cols = -(-height // tile_size), -(-width // tile_size)
    grid = np.full((rows, cols), np.nan)
    if tiles.empty:
        return grid
    r = (tiles["y"].to_numpy(dtype=int) // tile_size).clip(0, rows - 1)
    c = (tiles["x"].to_numpy(dtype=int) // tile_size).clip(0, cols - 1)
    grid[r, c] = tiles[column].to_numpy(dtype=float)
    return grid


def core_tile_maps(
    rgb: np.ndarray,
    tiles: pd.DataFrame,
    attention: Mapping[str, pd.DataFrame],
    tile_size: int,
) -> pd.DataFrame:
    """One row per kept tile (``x, y``) with its mean DAB and each model's attention, all three
    scaled to [0, 1] within the core (columns ``dab`` and ``attention_<name>``).

    ``attention`` maps a name (e.g. the task) to that model's ``x, y, attention`` rows for this
    core; a tile a model did not attend gets NaN.
    """
    out = tiles[["x", "y"]].drop_duplicates().reset_index(drop=True)
    dab = dab_channel(rgb)
    out["dab_raw"] = tile_mean_dab(dab, out, tile_size)
    out["dab"] = unit_range(out["dab_raw"])
    for name, rows in attention.items():
        merged = out[["x", "y"]].merge(rows[["x", "y", "attention"]], on=["x", "y"], how="left")
        out[f"attention_{name}"] = unit_range(merged["attention"].to_numpy())
    return out


def disagreement(maps: pd.DataFrame, attention_column: str, n: int) -> pd.DataFrame:
    """The ``n`` tiles where scaled attention and scaled mean DAB differ most (either way), with
    ``gap = attention - dab``: positive where the model looks at weakly stained tissue."""
    if attention_column not in maps.columns or n <= 0:
        return maps.iloc[0:0].assign(gap=pd.Series(dtype=float))
    gap = maps[attention_column] - maps["dab"]
    ranked = maps.assign(gap=gap).dropna(subset=["gap"])
    order = ranked["gap"].abs().sort_values(ascending=False, kind="stable").index
    return ranked.loc[order[:n]].reset_index(drop=True)


#: The longest side, in pixels, of the core image drawn in a panel: a panel shows it a few
#: hundred pixels wide, and matplotlib resamples a full 5468 px core (30 Mpx) for seconds per axis.
DISPLAY_PX = 1024


def display_copy(rgb: np.ndarray, max_side: int = DISPLAY_PX) -> np.ndarray:
    """The core reduced by a whole factor (box filter) to at most ``max_side`` pixels a side, for
    drawing only; maps and thumbnails keep full-resolution coordinates."""
    step = int(np.ceil(max(rgb.shape[:2]) / max_side))
    if step <= 1:
        return rgb
    if rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3:
        return np.asarray(Image.fromarray(rgb).reduce(step))
    return rgb[::step, ::step]


def _show_core(ax, shown: np.ndarray, height: int, width: int, **style) -> None:
    """Draw the display copy of a core stretched over its full-resolution pixel coordinates."""
    ax.imshow(shown, extent=(0, width, height, 0), **style)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _show_map(
    ax,
    grid: np.ndarray,
    grey: np.ndarray,
    height: int,
    width: int,
    tile_size: int,
    title: str,
    cmap: str,
) -> AxesImage:
    """A tile map over the faded grey core: cells of ``tile_size`` core pixels from (0, 0); the
    last row and column may run past the core's edge and are clipped there."""
    _show_core(ax, grey, height, width, cmap="gray", vmin=0, vmax=255, alpha=0.35)
    extent = (0, grid.shape[1] * tile_size, grid.shape[0] * tile_size, 0)
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        cmap=cmap,
        vmin=0,
        vmax=1,
        extent=extent,
        alpha=0.85,
        interpolation="nearest",
    )
    ax.set_title(title, fontsize=9)
    return image


def interpretation_panel(
    rgb: np.ndarray,
    maps: pd.DataFrame,
    tile_size: int,
    title: str,
    map_titles: Mapping[str, str],
    disagreeing: pd.DataFrame | None = None,
) -> Figure:
    """The core, one heatmap per entry of ``map_titles`` (a column of ``maps`` → its title, e.g.
    status attention, score attention, mean DAB), and thumbnails of ``disagreeing`` tiles,
    which are also outlined on the core."""
    height, width = rgb.shape[:2]
    n_maps = len(map_titles)
    thumbs = disagreeing if disagreeing is not None else maps.iloc[0:0]
    n_cols = 1 + n_maps
    n_rows = 2 if len(thumbs) else 1
    fig = Figure(figsize=(2.7 * n_cols, 2.9 * n_rows + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    grid_spec = fig.add_gridspec(n_rows, max(n_cols, len(thumbs)))
    shown = display_copy(rgb)
    grey = shown.mean(axis=2)  # the faded background of every map
    ax = fig.add_subplot(grid_spec[0, 0])
    _show_core(ax, shown, height, width)
    ax.set_title("core", fontsize=9)
    for k, tile in enumerate(thumbs.itertuples(index=False)):
        ax.add_patch(
            Rectangle(
                (tile.x, tile.y),
                tile_size,
                tile_size,
                fill=False,
                edgecolor="yellow",
                linewidth=1.2,
            )
        )
        ax.text(tile.x + 4, tile.y + 4, str(k + 1), color="yellow", fontsize=7, va="top")
    image = None
    for j, (column, label) in enumerate(map_titles.items(), start=1):
        ax = fig.add_subplot(grid_spec[0, j])
        if column not in maps.columns:
            ax.axis("off")
            ax.set_title(f"{label}\n(not available)", fontsize=9)
            continue
        grid = tile_grid(maps, column, tile_size, height, width)
        image = _show_map(ax, grid, grey, height, width, tile_size, label, "magma")
    if image is not None:
        fig.colorbar(image, ax=fig.axes[1 : 1 + n_maps], shrink=0.7, label="scaled to [0, 1]")
    for k, tile in enumerate(thumbs.itertuples(index=False)):
        ax = fig.add_subplot(grid_spec[1, k])
        x, y = int(tile.x), int(tile.y)
        ax.imshow(rgb[y : y + tile_size, x : x + tile_size])
        ax.set_title(
            f"{k + 1}: attention {tile.gap + tile.dab:.2f}\nDAB {tile.dab:.2f}", fontsize=8
        )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig


#: The paper's Fig. 3 maps, by column of :func:`core_tile_maps` (tasks as attention names).
TASK_MAPS = {
    "attention_her2_status": "attention, HER2 status",
    "attention_ihc_score": "attention, IHC score",
    "dab": "mean DAB per tile",
}


def task_panel(
    rgb: np.ndarray,
    tiles: pd.DataFrame,
    attention: Mapping[str, pd.DataFrame],
    tile_size: int,
    title: str,
    n_disagreeing: int,
) -> tuple[Figure, pd.DataFrame]:
    """Fig. 3 of one core from the attention of its status and score models (``attention`` keyed
    by task): the panel, and the tiles where status attention and mean DAB disagree most."""
    maps = core_tile_maps(rgb, tiles, attention, tile_size)
    odd = disagreement(maps, "attention_her2_status", n_disagreeing)
    return interpretation_panel(rgb, maps, tile_size, title, TASK_MAPS, odd), odd
