"""Grid labels of a TMA: QuPath-style ``"<row>-<column>"`` names, read and written in one scheme.

Row ``i`` (top to bottom) gets ``row_labels[i]`` (spreadsheet names AA, AB, ... beyond 26 rows
with the default letters), column ``j`` (left to right) gets ``column_labels[j]`` or
``str(j + 1)``. ``parse_grid_label`` is the inverse, tolerant of case and zero padding, so a
slide map written as ``b-07`` finds the core the dearrayer calls ``B-7`` (or ``B-07`` when the
column labels are zero-padded).
"""

from __future__ import annotations

from her2_kedro.config.ingestion import DearrayConfig

__all__ = ["DEFAULT_ROW_LABELS", "canonical_label", "grid_label", "parse_grid_label"]

DEFAULT_ROW_LABELS: str = DearrayConfig.model_fields["row_labels"].default


def _spreadsheet_name(i: int) -> str:
    name = ""
    i += 1
    while i > 0:
        i, rem = divmod(i - 1, 26)
        name = chr(ord("A") + rem) + name
    return name


def _spreadsheet_index(name: str) -> int | None:
    if not name.isalpha() or not name.isascii():
        return None
    index = 0
    for ch in name.upper():
        index = index * 26 + (ord(ch) - ord("A") + 1)
    return index - 1


def grid_label(row: int, col: int, params: DearrayConfig) -> str:
    """QuPath-style label "<row letter>-<column>" for 0-based grid indices."""
    if row < len(params.row_labels):
        r = params.row_labels[row]
    elif params.row_labels == DEFAULT_ROW_LABELS:
        r = _spreadsheet_name(row)  # AA, AB, ... beyond 26 rows
    else:
        raise ValueError(f"row {row} has no label in row_labels={params.row_labels!r}")
    if params.column_labels is None:
        c = str(col + 1)
    elif col < len(params.column_labels):
        c = params.column_labels[col]
    else:
        raise ValueError(f"column {col} has no label in column_labels={params.column_labels!r}")
    return f"{r}-{c}"


def _same(a: str, b: str) -> bool:
    """Labels equal up to case, or as numbers up to zero padding ("07" == "7")."""
    if a.isdigit() and b.isdigit():
        return int(a) == int(b)
    return a.casefold() == b.casefold()


def _row_index(text: str, params: DearrayConfig) -> int | None:
    for i, name in enumerate(params.row_labels):
        if name == text:
            return i
    for i, name in enumerate(params.row_labels):
        if _same(name, text):
            return i
    if params.row_labels == DEFAULT_ROW_LABELS:
        return _spreadsheet_index(text)
    return None


def _col_index(text: str, params: DearrayConfig) -> int | None:
    if params.column_labels is None:
        return int(text) - 1 if text.isdigit() and int(text) >= 1 else None
    labels = params.column_labels
    exact = [j for j, name in enumerate(labels) if name == text]
    loose = [j for j, name in enumerate(labels) if _same(name, text)]
    return (exact or loose or [None])[0]


def parse_grid_label(label: str, params: DearrayConfig) -> tuple[int, int] | None:
    """0-based (row, column) of a label in the configured scheme, or None when it is not one."""
    text = str(label).strip()
    for sep in ("-", "_", " "):
        if sep in text:
            row_text, col_text = (part.strip() for part in text.split(sep, 1))
            break
    else:
        return None
    if not row_text or not col_text:
        return None
    row, col = _row_index(row_text, params), _col_index(col_text, params)
    return None if row is None or col is None else (row, col)


def canonical_label(label: str, params: DearrayConfig) -> str | None:
    """A label as the dearrayer writes it (``"b-07"`` -> ``"B-7"``), or None when malformed."""
    position = parse_grid_label(label, params)
    if position is None:
        return None
    try:
        return grid_label(*position, params)
    except ValueError:
        return None
