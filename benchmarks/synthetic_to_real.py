"""What do models trained only on the synthetic cohort call on real cores?

Loads the CNN checkpoints a project run left in ``data/06_models`` (``<model>.<task>.pt``, and the
frozen ``encoder.pt`` for the models on cached embeddings) and scores the labelled real cores in
``../shared/data/real_cores`` (labels from its ``labels.csv`` only), as they are and after
Macenko normalisation onto the training cohort's reference stain vectors. There is no target: the
calls tell how well the synthetic cohort teaches real morphology.

    python benchmarks/synthetic_to_real.py --data data
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from her2_kedro.config import TileConfig, TorchModelConfig  # noqa: E402
from her2_kedro.evaluation.study import TASKS  # noqa: E402
from her2_kedro.features.preprocess import decode_rgb  # noqa: E402
from her2_kedro.imaging.normalisation import cohort_normaliser  # noqa: E402
from her2_kedro.imaging.pixels import encode_png  # noqa: E402
from her2_kedro.modelling.checkpoints import load_checkpoint, read_checkpoint  # noqa: E402
from her2_kedro.modelling.embeddings import embed_core  # noqa: E402
from her2_kedro.modelling.torch_study import (  # noqa: E402
    ModelInputs,
    make_dataset,
    predict,
    task_probabilities,
)
from her2_kedro.schema import SCORE_OF_CLASS  # noqa: E402

REAL_CORES = ROOT.parent / "shared" / "data" / "real_cores"


def real_rows(root: Path) -> pd.DataFrame:
    """The real cores with their labels, from ``labels.csv`` (never from file names)."""
    labels = pd.read_csv(root / "labels.csv")
    five = [
        str(s) if s != 2 else ("2+" if h == 1 else "2-")
        for s, h in zip(labels["ihc-score"], labels["her2-status"], strict=True)
    ]
    assert all(SCORE_OF_CLASS[f] == s for f, s in zip(five, labels["ihc-score"], strict=True))
    return pd.DataFrame(
        {
            "core_id": [f"real_{i}" for i in range(len(labels))],
            "image": labels["filename"],
            "five_class": five,
            "ihc_score": labels["ihc-score"].astype(int),
            "her2_status": labels["her2-status"].astype(int),
            "cohort": "real",
            "split": "real",
            "y": 0,
        }
    )


def latest_reference(data: Path) -> dict | None:
    """The newest version of preprocessing's reference stain vectors, if any."""
    versions = sorted((data / "04_feature" / "reference_stains.json").rglob("*.json"))
    return json.loads(versions[-1].read_text()) if versions else None


def core_loaders(rows: pd.DataFrame, root: Path, transform) -> dict:
    """Loaders of the cores' bytes, normalised first where ``transform`` is given."""
    loaders = {}
    for row in rows.to_dict("records"):
        path = root / row["image"]
        if transform is None:
            loaders[row["image"]] = lambda p=path: p.read_bytes()
        else:
            blob = encode_png(transform(row, decode_rgb(path.read_bytes())))
            loaders[row["image"]] = lambda b=blob: b
    return loaders


def cached_entries(encoder_path: Path, rows, loaders, rule: TileConfig) -> dict:
    """Embeddings of the real cores with the frozen encoder, at its training input size."""
    extras = read_checkpoint(encoder_path).get("extras") or {}
    input_size = (extras.get("encoder") or {}).get("bag", {}).get("input_size", 64)
    trunk = load_checkpoint(encoder_path, expected_arch="encoder").model
    entries = {}
    for row in rows.to_dict("records"):
        rgb = decode_rgb(loaders[row["image"]]())
        entry = embed_core(trunk, rgb, row["core_id"], rule, input_size)
        entries[row["core_id"]] = lambda e=entry: e
    return entries


def score(models: Path, rows, loaders, rule) -> pd.DataFrame:
    """Each checkpoint's predicted class for each real core (one column per model and task)."""
    calls = pd.DataFrame(index=rows["core_id"])
    entries = None
    for path in sorted(models.glob("*.*.pt")):
        payload = read_checkpoint(path)
        spec_dict = (payload.get("extras") or {}).get("spec")
        if spec_dict is None:
            continue  # the encoder itself, or a checkpoint from before specs were recorded
        spec = TorchModelConfig.model_validate(spec_dict)
        model = load_checkpoint(path).model
        inputs = ModelInputs(cores=loaders, rule=rule)
        if spec.input == "embeddings":
            if entries is None:
                entries = cached_entries(models / "encoder.pt", rows, loaders, rule)
            inputs = ModelInputs(embeddings=entries, embedding_dim=512, rule=rule)
        dataset = make_dataset(spec, rows, "y", inputs, train=False, seed=0)
        probs, _ = predict(model, dataset, progress=False)
        task = payload["meta"]["task"]
        column = f"{spec.name}.{task}"
        p = task_probabilities(probs.set_index("core_id").loc[rows["core_id"]], spec, TASKS[task])
        calls[column] = p.argmax(axis=1)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--real", type=Path, default=REAL_CORES)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.real / "labels.csv").is_file():
        print(f"no labelled real cores at {args.real}: nothing to score")
        return
    rows = real_rows(args.real)
    rule = TileConfig()
    models = args.data / "06_models"
    reference = latest_reference(args.data)
    print(f"{len(rows)} real cores from {args.real}; checkpoints from {models}")
    truth = rows.set_index("core_id")[["five_class", "ihc_score", "her2_status"]]
    for label, transform in (
        ("as they are", None),
        ("Macenko-normalised to the training reference", cohort_normaliser(reference, ["real"])),
    ):
        if label.startswith("Macenko") and transform is None:
            print("\n(no reference stain vectors in this project: normalised calls skipped)")
            continue
        t0 = time.perf_counter()
        calls = score(models, rows, core_loaders(rows, args.real, transform), rule)
        table = truth.join(calls)
        score_cols = [c for c in calls if c.endswith(".ihc_score")]
        status_cols = [c for c in calls if c.endswith(".her2_status")]
        print(f"\ncalls on the real cores, {label} ({time.perf_counter() - t0:.0f} s):")
        print(table.to_string())
        for cols, target in ((score_cols, "ihc_score"), (status_cols, "her2_status")):
            right = {c: int((table[c] == table[target]).sum()) for c in cols}
            print(
                f"correct {target} of {len(table)}: "
                + ", ".join(f"{k} {v}" for k, v in right.items())
            )


if __name__ == "__main__":
    main()
