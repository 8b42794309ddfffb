"""Anchoring a fitted grid's labels to the positions a slide map names.

A grid inferred from the cores found starts at its first occupied row and column, so an empty
first row or column would shift every label; the slide map's labels put it back.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from her2_kedro.config.ingestion import DearrayConfig
from her2_kedro.tma.grid import DearrayResult, missing_labels
from her2_kedro.tma.grid_labels import grid_label

__all__ = ["Anchoring", "anchor_to_positions"]


@dataclass(frozen=True)
class Anchoring:
    """How the labels of a fitted grid were shifted to agree with the slide map."""

    row_shift: int
    col_shift: int
    agree: int  # found cores whose shifted position the map names
    found: int  # cores found
    ties: int  # shifts that agree equally well (1 = unambiguous)

    def describe(self) -> str:
        """One line for the log."""
        text = (
            f"labels anchored to slide_map.csv: grid shifted by {self.row_shift} row(s), "
            f"{self.col_shift} column(s); {self.agree} of {self.found} cores agree with the map"
        )
        if self.ties > 1:
            text += (
                f"; {self.ties} shifts fit equally well, the smallest was taken (give "
                "ingestion.dearray.n_rows/n_cols or list only the punched cores in the map)"
            )
        return text


def _shift_limit(found_max: int, expected: int | None, map_max: int) -> int:
    """Largest shift to try along one axis: within the expected grid size when it is given."""
    if expected is not None:
        return max(0, expected - 1 - found_max)
    return max(0, map_max)


def anchor_to_positions(
    result: DearrayResult, positions: Collection[tuple[int, int]], params: DearrayConfig
) -> tuple[DearrayResult, Anchoring | None]:
    """Shift the grid's labels so that its cores land on the positions the slide map names.

    A grid inferred from the cores found starts at the first occupied row and column, so an
    empty first row or column shifts every label. Here the shift (rows, columns >= 0) that puts
    the most found cores on (row, column) positions named in the map wins; ties go to the
    smallest shift (the unshifted grid first). The grid then spans both the shifted cores and
    every map position, so map positions without a core are reported as missing. With no map
    position, or none that any shift reaches, the grid is returned unchanged (and None).
    """
    wanted = {(int(r), int(c)) for r, c in positions}
    if not wanted or not result.cores:
        return result, None
    found = [(core.row, core.col) for core in result.cores]
    max_r = _shift_limit(max(r for r, _ in found), params.n_rows, max(r for r, _ in wanted))
    max_c = _shift_limit(max(c for _, c in found), params.n_cols, max(c for _, c in wanted))
    scores: dict[tuple[int, int], int] = {}
    for dr in range(max_r + 1):
        for dc in range(max_c + 1):
            scores[(dr, dc)] = sum((r + dr, c + dc) in wanted for r, c in found)
    best = max(scores.values())
    if best == 0:
        return result, None
    ties = sorted((k for k, v in scores.items() if v == best), key=lambda k: (sum(k), k))
    dr, dc = ties[0]
    anchoring = Anchoring(dr, dc, best, len(found), len(ties))
    if (dr, dc) == (0, 0) and all(r < result.n_rows and c < result.n_cols for r, c in wanted):
        return result, anchoring
    n_rows = params.n_rows or max(result.n_rows + dr, 1 + max(r for r, _ in wanted))
    n_cols = params.n_cols or max(result.n_cols + dc, 1 + max(c for _, c in wanted))
    for core in result.cores:
        core.row, core.col = core.row + dr, core.col + dc
        core.label = grid_label(core.row, core.col, params)
    occupied = {(core.row, core.col) for core in result.cores}
    result.missing = missing_labels(n_rows, n_cols, occupied, params)
    result.n_rows, result.n_cols = n_rows, n_cols
    return result, anchoring
