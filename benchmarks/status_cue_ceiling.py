"""How well can any model call HER2 status on a synthetic cohort's splits? The status cue's ceiling.

In the synthetic cohort the only pixel evidence of the ISH result of a score-2 core is the status
cue (nuclear atypia), drawn per patient with probability ``status_cue_strength`` for amplified
tumours and ``1 - status_cue_strength`` for the others (``her2_kedro.synthetic.cohort``). So on
score-2 cores no reader can beat the share of cores whose cue agrees with their status, and a
split's realised share can fall well below ``status_cue_strength`` by chance when it holds few
score-2 cores. This script redraws the cohort table from the run's parameters (the generator is
deterministic; the cue is never written to disk, so no model can read it), checks that it matches
``labels.csv``, joins the split of each core from the core manifest and prints per split:

- the share of cores whose cue agrees with their status, per class 0, 1, 2-, 2+, 3;
- the accuracy ceiling on score-2 cores (2- against 2+): the cue read perfectly;
- the status balanced-accuracy ceiling of an ideal reader: scores 0 and 1 negative, 3 positive,
  score 2 by the cue (a reader that also trusted the cue on scores 0, 1 and 3 would do worse).

Run from the project root after ``kedro run --env=bench --pipelines=synthetic`` and the
ingestion pipeline (which assigns the splits):

    .venv/bin/python benchmarks/status_cue_ceiling.py --env bench
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from her2_kedro.config import CohortsConfig, SyntheticParams  # noqa: E402
from her2_kedro.config.project import project_parameters  # noqa: E402
from her2_kedro.pipelines.synthetic.nodes import sample_core_table  # noqa: E402
from her2_kedro.schema import EXTERNAL_SPLIT, FIVE_CLASSES  # noqa: E402


def cohort_truth(env: str, labels: pd.DataFrame) -> pd.DataFrame:
    """The generator's table for this environment, checked against ``labels.csv``."""
    params = project_parameters(env, ROOT)
    table = sample_core_table(SyntheticParams.model_validate(params["synthetic"]).model_dump())
    same = (
        len(table) == len(labels)
        and (
            table[["filename", "ihc-score", "her2-status"]].to_numpy()
            == labels[["filename", "ihc-score", "her2-status"]].to_numpy()
        ).all()
    )
    if not same:
        raise SystemExit(
            f"labels.csv does not match the synthetic cohort of env '{env}' "
            "(a user's own cores, or another environment's cohort): no cue to measure"
        )
    return table


def ceilings(cores: pd.DataFrame) -> pd.DataFrame:
    """Per split: cores, score-2 cores, their cue ceiling and the ideal reader's status BA."""
    rows = []
    for split, part in cores.groupby("split"):
        score2 = part["ihc_score"] == 2
        ideal = np.where(score2, part["status_cue"], part["ihc_score"] == 3).astype(int)
        rows.append(
            {
                "split": split,
                "cores": len(part),
                "score2_cores": int(score2.sum()),
                "score2_acc_ceiling": float(
                    (ideal[score2] == part.loc[score2, "her2_status"]).mean()
                ),
                "status_ba_ceiling": balanced_accuracy_score(part["her2_status"], ideal),
            }
        )
    return pd.DataFrame(rows).set_index("split")


def latest_manifest(data: Path) -> pd.DataFrame:
    """The newest version of the versioned core manifest (one folder per run)."""
    versions = sorted((data / "02_intermediate" / "core_manifest.parquet").rglob("*.parquet"))
    versions = [v for v in versions if v.is_file()]
    if not versions:
        raise SystemExit(f"no core manifest under {data}: run the ingestion pipeline first")
    return pd.read_parquet(versions[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="local", help="the Kedro environment of the cohort")
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    args = parser.parse_args()

    labels = pd.read_csv(args.data / "01_raw" / "labels.csv")
    truth = cohort_truth(args.env, labels)
    manifest = latest_manifest(args.data)
    cohorts = CohortsConfig.model_validate(project_parameters(args.env, ROOT)["cohorts"])
    cores = manifest.merge(truth[["filename", "status_cue"]], on="filename", how="inner")
    cores.loc[cores["cohort"].isin(cohorts.evaluation_only), "split"] = EXTERNAL_SPLIT
    cores["cue_agrees"] = cores["status_cue"] == (cores["her2_status"] == 1)

    print(f"env {args.env}: {len(cores)} accepted cores of {len(labels)} in labels.csv")
    print("\nshare of cores whose status cue agrees with their HER2 status (n in brackets):")
    agree = cores.groupby(["five_class", "split"])["cue_agrees"].agg(["mean", "size"])
    cells = agree.apply(lambda r: f"{r['mean']:.2f} ({int(r['size'])})", axis=1).unstack("split")
    print(cells.reindex([c for c in FIVE_CLASSES if c in cells.index]).to_string())
    print("\nceilings of any reader (cue read perfectly, score read perfectly):")
    print(ceilings(cores).round(3).to_string())


if __name__ == "__main__":
    main()
