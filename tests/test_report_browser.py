"""The HTML report as a reader sees it: opened from the file alone in headless Chromium, every
section renders, every image loads, nothing is fetched from elsewhere and the console is clean."""

from __future__ import annotations

import io

import pandas as pd

from her2_kedro.reporting import tables
from her2_kedro.reporting.heatmaps import core_tile_maps, disagreement, interpretation_panel
from her2_kedro.reporting.html_report import Picture, ReportContent, png_uri, render_report
from her2_kedro.reporting.study_figures import confusion_grid, roc_figure
from tests.browser import view_page
from tests.conftest import fake_core
from tests.test_reporting import PAPER, made_up_predictions, manifest_of

SECTIONS = ["run", "qc", "table1", "table2", "errors", "figures", "heatmaps"]


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=60)
    return png_uri(buffer.getvalue())


def test_report_renders_offline_in_chromium(tmp_path):
    predictions = made_up_predictions()
    frame = tables.with_patients(predictions, manifest_of(predictions))
    rgb = fake_core(448, 448, 0)
    grid = pd.DataFrame({"x": [0, 224, 0, 224], "y": [0, 0, 224, 224]})
    attention = grid.assign(attention=[0.1, 0.2, 0.3, 0.4])
    maps = core_tile_maps(rgb, grid, {"her2_status": attention, "ihc_score": attention}, 224)
    panel = interpretation_panel(
        rgb,
        maps,
        224,
        "P00_c0",
        {"attention_her2_status": "status", "attention_ihc_score": "score", "dab": "DAB"},
        disagreement(maps, "attention_her2_status", 2),
    )
    content = ReportContent(
        title="HER2 IHC study report",
        run={"run_id": "0123abcd", "env": "local", "generated": "today", "parameters": "x: 1"},
        models=sorted(predictions["model"].unique()),
        qc_report=pd.DataFrame(
            {
                "source": ["cores"] * 3,
                "core_id": ["a", "b", "broken"],
                "status": ["accepted", "accepted", "rejected"],
                "reason": ["", "", "not an image (cannot identify image file)"],
            }
        ),
        table1=tables.table1(frame, ("test", "external"), PAPER, {"good": "MIL"}, n_resamples=100),
        crosstabs=tables.status_crosstabs(frame),
        errors=tables.class_errors(frame),
        figures=[
            Picture(
                "confusion", _png(confusion_grid(predictions, "test", "her2_status")), wide=True
            ),
            Picture("roc", _png(roc_figure(predictions, "her2_status", "test"))),
        ],
        panels=[Picture("P00_c0", _png(panel))],
    )
    page = tmp_path / "report.html"
    page.write_text(render_report(content), encoding="utf-8")

    view = view_page(page, SECTIONS)

    assert all(view.sections[s].strip() for s in SECTIONS), view.sections
    assert "Table 1" in view.sections["table1"] and "MIL: 0.9429" in view.sections["table1"]
    assert "good" in view.sections["table2"] and "2+" in view.sections["table2"]
    assert "not an image" in view.sections["qc"]
    assert view.images == 3 and not view.broken_images
    assert not view.console_errors
    assert not view.outside_requests  # self-contained: works from the file alone
    assert view.screenshot.startswith(b"\x89PNG")
