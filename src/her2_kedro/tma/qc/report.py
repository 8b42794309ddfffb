"""QC report rows: one row per input problem and per accepted core (the data contract's qc_report.csv)."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from her2_kedro.schema import ACCEPTED, QC_COLUMNS, REJECTED, QCProblem

__all__ = ["ACCEPTED", "QC_COLUMNS", "REJECTED", "QCProblem", "accepted_reason", "qc_table"]


def qc_table(
    problems: Iterable[QCProblem], accepted: Iterable[tuple[str, str, str]]
) -> pd.DataFrame:
    """Combine problems (rejected) and accepted `(source, core_id, note)` triples into one QC table.

    Rows are sorted stably by source, core_id and status so the report is reproducible.
    """
    rows = [(p.source, p.core_id, REJECTED, p.reason) for p in problems]
    rows += [(str(s), str(c), ACCEPTED, str(r)) for s, c, r in accepted]
    table = pd.DataFrame(rows, columns=QC_COLUMNS, dtype=object)
    if table.empty:
        return table
    return table.sort_values(["source", "core_id", "status"], kind="stable").reset_index(drop=True)


def accepted_reason(note: str = "") -> str:
    """Reason text for an accepted row: "ok", or "ok (<note>)" when something was converted."""
    return f"ok ({note})" if note else "ok"
