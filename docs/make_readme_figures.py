"""Make the README's two pictures from a finished demo run (`make run`): Table 1 of the test split
and one heatmap panel, as small PNGs in docs/. Run: `.venv/bin/python docs/make_readme_figures.py`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def table1_png(table1: pd.DataFrame, target: Path) -> None:
    """Table 1 (test split) as a small picture: model, task, balanced accuracy [95 % CI], paper."""
    test = table1[table1["split"] == "test"].sort_values(["task", "model"])
    rows = [
        [
            r.model,
            r.task,
            f"{r.balanced_accuracy:.3f} [{r.ci_low:.2f}, {r.ci_high:.2f}]",
            "" if pd.isna(r.paper_balanced_accuracy) else f"{r.paper_balanced_accuracy:.4f}",
        ]
        for r in test.itertuples(index=False)
    ]
    fig = Figure(figsize=(6.4, 0.26 * len(rows) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axis("off")
    table = ax.table(
        cellText=rows,
        colLabels=["model", "task", "balanced accuracy [95 % CI]", "paper"],
        loc="center",
        cellLoc="left",
        colWidths=[0.2, 0.2, 0.38, 0.16],
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.15)
    ax.set_title("Table 1, demo cohort (test split), beside the paper", fontsize=9)
    fig.savefig(target, dpi=110)


def panel_png(panel: Path, target: Path, width: int = 900) -> None:
    """One heatmap panel, downscaled to ``width`` px."""
    with Image.open(panel) as image:
        image = image.convert("RGB")
        height = round(image.height * width / image.width)
        image.resize((width, height), Image.Resampling.LANCZOS).save(target, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reports", type=Path, default=ROOT / "data" / "08_reporting")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    table1 = args.reports / "table1.csv"
    panels = sorted((args.reports / "heatmaps").glob("*.png"))
    if not table1.is_file() or not panels:
        raise SystemExit(f"No report in {args.reports}: run `make run` first")
    args.out.mkdir(parents=True, exist_ok=True)
    table1_png(pd.read_csv(table1), args.out / "table1_demo.png")
    # a score-2 core shows best what attention adds to staining, as in the paper's Fig. 3
    predictions = args.reports.parent / "07_model_output" / "predictions.parquet"
    chosen = panels[0]
    if predictions.is_file():
        classes = pd.read_parquet(predictions, columns=["core_id", "five_class"])
        score2 = set(classes.loc[classes["five_class"].isin(["2-", "2+"]), "core_id"])
        chosen = next((p for p in panels if p.stem in score2), chosen)
    panel_png(chosen, args.out / "heatmap_panel_demo.png")
    print(f"wrote {args.out / 'table1_demo.png'} and {args.out / 'heatmap_panel_demo.png'}")


if __name__ == "__main__":
    main()
