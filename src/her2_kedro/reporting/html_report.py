"""The study's report as one self-contained HTML page: every figure is embedded as a data URI and
the page loads nothing else, so it opens offline from the file alone (mail it, archive it)."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

NOTES = {
    "table1": (
        "Balanced accuracy is the mean recall over the classes present in the split, as in the "
        "paper (its test set had no score-1 core). Intervals are 95 % percentile bootstrap "
        "intervals resampling patients, not cores. The paper truncated (did not round) its "
        "figures to 4 decimals: the 'truncated' column compares like with like. The paper's "
        "figures come from its in-house test set and its external centre, not from these cores."
    ),
    "table2": (
        "The paper's Table 2: for each HER2-status model, how the cores of each true class were "
        "called. Score-2 cores are split by their ISH result (2− negative, 2+ positive); an "
        "intensity model sees no difference between them."
    ),
    "errors": (
        "Per model, task and true class (2− and 2+ apart): cores, correct calls, and the most "
        "frequent wrong call."
    ),
    "heatmaps": (
        "Each panel: the core; the attention of the HER2-status and IHC-score models; the mean "
        "DAB of each tile; each map scaled to [0, 1] within the core on the same tile grid. "
        "Numbered tiles are where attention and staining disagree most (the paper's white arrows)."
    ),
}


@dataclass
class Picture:
    """A figure of the report: a title, a caption and the PNG as a data URI."""

    title: str
    uri: str
    caption: str = ""
    wide: bool = False  # a figure that needs the page's width (a grid of many models)


@dataclass
class ReportContent:
    """Everything the page shows; tables are DataFrames, figures PNG files or bytes."""

    title: str
    run: Mapping[str, Any]
    models: Sequence[str] = ()
    qc_report: pd.DataFrame | None = None
    table1: pd.DataFrame | None = None
    crosstabs: pd.DataFrame | None = None
    errors: pd.DataFrame | None = None
    figures: Sequence[Picture] = ()
    panels: Sequence[Picture] = ()
    inbox: Mapping[str, Any] | None = None
    max_qc_rows: int = 200
    extra_notes: Mapping[str, str] = field(default_factory=dict)


def png_uri(png: bytes | Path) -> str:
    """A PNG (bytes or a file) as a ``data:image/png;base64`` URI."""
    data = Path(png).read_bytes() if isinstance(png, Path) else bytes(png)
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{png if isinstance(png, Path) else 'figure bytes'} is not a PNG image")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _table_html(frame: pd.DataFrame | None, float_format: str = "{:.4f}") -> str:
    if frame is None or frame.empty:
        return ""
    formatters = {
        c: (lambda v, f=float_format: "–" if pd.isna(v) else f.format(v))
        for c in frame.columns
        if pd.api.types.is_float_dtype(frame[c])
    }
    return frame.to_html(index=False, border=0, formatters=formatters, na_rep="–", escape=True)


def _table1_view(table1: pd.DataFrame | None) -> pd.DataFrame | None:
    """Table 1 as the reader wants it: the interval in one column, the paper's figure beside."""
    if table1 is None or table1.empty:
        return None
    view = pd.DataFrame(
        {
            "model": table1["model"],
            "task": table1["task"],
            "split": table1["split"],
            "cores": table1["n"].astype(int),
            "patients": table1["n_patients"].astype(int),
            "balanced acc.": table1["balanced_accuracy"],
            "95 % interval": [
                "–" if pd.isna(lo) else f"{lo:.3f}–{hi:.3f}"
                for lo, hi in zip(table1["ci_low"], table1["ci_high"], strict=True)
            ],
            "truncated": table1["balanced_accuracy_truncated"],
            "precision (w)": table1["precision_weighted"],
            "recall (w)": table1["recall_weighted"],
            "F1 (w)": table1["f1_weighted"],
            "AUROC": table1["auroc"],
            "paper": [
                "" if not name or pd.isna(v) else f"{name}: {v:.4f}"
                for name, v in zip(
                    table1["paper_model"], table1["paper_balanced_accuracy"], strict=True
                )
            ],
        }
    )
    return view


def _qc_view(qc_report: pd.DataFrame | None, max_rows: int) -> dict[str, Any]:
    if qc_report is None or qc_report.empty:
        return {
            "counts": "<p class='empty'>No QC report found.</p>",
            "reasons": "",
            "shown": 0,
            "n_rejected": 0,
        }
    counts = qc_report.groupby("status").size().rename("inputs").reset_index()
    rejected = qc_report[qc_report["status"] != "accepted"]
    shown = rejected.head(max_rows)[["source", "core_id", "reason"]]
    return {
        "counts": _table_html(counts),
        "reasons": _table_html(shown),
        "shown": len(shown),
        "n_rejected": len(rejected),
    }


def _crosstab_views(crosstabs: pd.DataFrame | None) -> list[dict[str, str]]:
    if crosstabs is None or crosstabs.empty:
        return []
    views = []
    for (model, split), part in crosstabs.groupby(["model", "split"], sort=True):
        views.append(
            {
                "title": f"{model} ({split})",
                "html": _table_html(part.drop(columns=["model", "split"]), "{:.0f}"),
            }
        )
    return views


def render_report(content: ReportContent) -> str:
    """The report page as an HTML string (autoescaped; tables are built escaped by pandas)."""
    env = Environment(
        loader=PackageLoader("her2_kedro.reporting", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
    )
    template = env.get_template("report.html.j2")
    inbox = None
    if content.inbox:
        inbox = {
            "note": content.inbox.get("note", ""),
            "table": _table_html(content.inbox.get("table")),
            "panels": list(content.inbox.get("panels", [])),
        }
    run = {"run_id": "", "env": "", "generated": "", "parameters": "", "manifest_versions": []}
    run.update(content.run)
    return template.render(
        title=content.title,
        run=run,
        models=list(content.models),
        qc=_qc_view(content.qc_report, content.max_qc_rows),
        table1=_table_html(_table1_view(content.table1)),
        crosstabs=_crosstab_views(content.crosstabs),
        errors=_table_html(content.errors, "{:.3f}"),
        figures=list(content.figures),
        panels=list(content.panels),
        inbox=inbox,
        notes={**NOTES, **content.extra_notes},
    )
