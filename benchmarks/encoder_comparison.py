"""How should the tile encoder behind the embedding cache be trained on a CPU? Measured, not guessed.

For each encoder recipe (a frozen random trunk; a tile classifier on weak core labels; end-to-end
attention MIL) and each trunk (ResNet18, ResNet34, ...), on a project's ingested and preprocessed cohort (``data/02_intermediate`` and
``data/04_feature``): train the encoder on the training cores (epoch selected on validation cores),
embed every core, train attention MIL on the cached embeddings for both tasks, and print the
validation and test balanced accuracies with the time each step took.

    python benchmarks/encoder_comparison.py --data data --recipes random tile_classifier mil \
        --encoders resnet18 resnet34

Test cores are scored once per recipe, after everything was selected on validation cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from her2_kedro.config import (  # noqa: E402
    BagConfig,
    EncoderConfig,
    TileConfig,
    TorchModelConfig,
    TrainingConfig,
)
from her2_kedro.evaluation.study import TASKS, evaluate_probabilities  # noqa: E402
from her2_kedro.features.preprocess import decode_rgb  # noqa: E402
from her2_kedro.imaging.normalisation import cohort_normaliser  # noqa: E402
from her2_kedro.modelling.embeddings import embed_core  # noqa: E402
from her2_kedro.modelling.encoders import build_encoder  # noqa: E402
from her2_kedro.modelling.torch_study import (  # noqa: E402
    FIVE_CLASS_TASK,
    ModelInputs,
    bag_table,
    fit,
    make_dataset,
    predict,
)
from her2_kedro.pipelines.features.nodes import _encoder_spec  # noqa: E402


def load_cohort(data: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The latest manifest version, the tile index and loaders of the accepted cores."""
    manifest_path = data / "02_intermediate" / "core_manifest.parquet"
    if manifest_path.is_dir():
        manifest_path = sorted(manifest_path.iterdir())[-1] / "core_manifest.parquet"
    manifest = pd.read_parquet(manifest_path)
    tiles = pd.read_parquet(data / "04_feature" / "tile_index.parquet")
    cores = {
        p.name: (lambda p=p: p.read_bytes()) for p in (data / "02_intermediate" / "cores").iterdir()
    }
    return manifest, tiles, cores


def train_trunk(
    recipe: str, name: str, args, manifest, tiles, inputs
) -> tuple[torch.nn.Module, float]:
    """The encoder of a recipe and the validation balanced accuracy its training selected on."""
    if recipe == "random":
        torch.manual_seed(args.seed)
        return build_encoder(name, None)[0], float("nan")
    defaults = EncoderConfig()
    config = EncoderConfig(
        name=name,
        method=recipe,
        bag=BagConfig(
            input_size=args.input_size,
            max_tiles=args.max_tiles if recipe == "tile_classifier" else 16,
            cores_per_batch=args.cores_per_batch,
        ),
        training=defaults.training.model_copy(
            update={"lr": args.lr, "max_epochs": args.epochs, "seed": args.seed}
        ),
    )
    table, _ = bag_table(manifest, tiles, FIVE_CLASS_TASK, ["external"])
    model, result, _ = fit(_encoder_spec(config), table, FIVE_CLASS_TASK, inputs, progress=False)
    return model.encoder, result.best_val_balanced_accuracy


def embed_all(trunk, manifest, tiles, inputs, input_size) -> dict:
    """Every bagged core's cache entry, in memory (normalised cohorts normalised, as in the
    features pipeline)."""
    entries = {}
    keep = set(tiles["core_id"])
    for row in manifest.to_dict("records"):
        if row["core_id"] not in keep:
            continue
        rgb = decode_rgb(inputs.cores[row["image"]]())
        if inputs.transform is not None:
            rgb = inputs.transform(row, rgb)
        entry = embed_core(trunk, rgb, row["core_id"], inputs.rule, input_size)
        entries[row["core_id"]] = lambda e=entry: e
    return entries


def mil_on_embeddings(entries, manifest, tiles, task_name: str, args) -> dict[str, float]:
    """Attention MIL on the cached embeddings for one task: balanced accuracy per split."""
    task = TASKS[task_name]
    table, _ = bag_table(manifest, tiles, task, ["external"])
    spec = TorchModelConfig(
        name="mil_cached",
        input="embeddings",
        arch="attention_mil",
        params={"hidden_dim": 256, "dropout": 0.25},
        training=TrainingConfig(
            lr=1e-3, max_epochs=60, plateau_patience=8, early_stopping_patience=20, seed=args.seed
        ),
    )
    inputs = ModelInputs(embeddings=entries, embedding_dim=512)
    model, _, _ = fit(spec, table, task, inputs, progress=False)
    dataset = make_dataset(spec, table, "y", inputs, train=False, seed=args.seed)
    scores, _ = predict(model, dataset, progress=False)
    proba = scores.set_index("core_id").loc[table["core_id"]].to_numpy()
    _, metrics, _ = evaluate_probabilities(table, proba, task, "mil_cached")
    return dict(zip(metrics["split"], metrics["balanced_accuracy"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=["random", "tile_classifier", "mil"],
        choices=["random", "tile_classifier", "mil"],
    )
    parser.add_argument("--encoders", nargs="+", default=["resnet18", "resnet34"])
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--max-tiles", type=int, default=4, help="tiles per core and step")
    parser.add_argument("--cores-per-batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    manifest, tiles, cores = load_cohort(args.data)
    versions = sorted((args.data / "04_feature" / "reference_stains.json").rglob("*.json"))
    reference = json.loads(versions[-1].read_text()) if versions else None
    transform = cohort_normaliser(reference, ["external"])  # the conf/base cohorts setting
    inputs = ModelInputs(cores=cores, rule=TileConfig(), transform=transform)
    print(
        f"cohort {args.data}: {len(manifest)} cores "
        f"({dict(manifest['split'].value_counts())}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; tiles at {args.input_size} px"
    )
    rows = []
    for recipe, name in [(r, e) for r in args.recipes for e in args.encoders]:
        t0 = time.perf_counter()
        trunk, encoder_val = train_trunk(recipe, name, args, manifest, tiles, inputs)
        t1 = time.perf_counter()
        entries = embed_all(trunk, manifest, tiles, inputs, args.input_size)
        t2 = time.perf_counter()
        row = {"recipe": recipe, "encoder": name, "encoder_val_bacc": encoder_val}
        for task in ("ihc_score", "her2_status"):
            scores = mil_on_embeddings(entries, manifest, tiles, task, args)
            for split in ("val", "test", "external"):
                row[f"{task}.{split}"] = scores.get(split, float("nan"))
        row.update(train_s=t1 - t0, embed_s=t2 - t1, mil_s=time.perf_counter() - t2)
        rows.append(row)
        print(pd.DataFrame([row]).round(4).to_string(index=False), flush=True)
    table = pd.DataFrame(rows).set_index(["recipe", "encoder"])
    print("\nbalanced accuracy of attention MIL on each recipe's cached embeddings:")
    print(table.round(4).to_string())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
