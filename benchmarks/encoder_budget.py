"""Which tile encoder learns most per CPU minute? A fixed-time race between trunks and input sizes.

On a project's ingested cohort (``data/02_intermediate``; internal cores only), each setting
trains a trunk from random initialisation as a tile classifier (five-class weak labels, batches of
``--batch`` random tiles from as many class-balanced training cores, random flips, Adam) for the
same wall-clock budget, then scores validation and test cores by the mean of their tiles' class
probabilities (BatchNorm statistics recomputed from training batches first). It prints, per
setting: optimiser steps, tiles seen, and balanced accuracy of the five classes, the IHC score
(0, 1, 2, 3) and the HER2 status, and the accuracy of 2- against 2+ on score-2 cores. This is a
proxy that picks the trunk for ``encoder.name``; ``encoder_comparison.py`` judges full recipes
through attention MIL.

    python benchmarks/encoder_budget.py --data data --minutes 6 \\
        --settings resnet18:64 resnet34:64 resnet18:96

Tiles are random crops of each core downscaled by 224 / size (the 224 px tile grid at the input
size), not the tile index: close to, not the same as, the features pipeline's bags.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from her2_kedro.modelling.batch_norm import recompute_batch_norm  # noqa: E402
from her2_kedro.modelling.encoders import build_encoder  # noqa: E402
from her2_kedro.schema import FIVE_CLASSES, SCORE_OF_CLASS, STATUS_OF_CLASS  # noqa: E402

SCORE_OF = np.array([SCORE_OF_CLASS[c] for c in FIVE_CLASSES])  # five-class index -> IHC score
STATUS_OF = np.array([STATUS_OF_CLASS[c] for c in FIVE_CLASSES])  # five-class index -> status


def load_cores(data: Path, size: int) -> tuple[pd.DataFrame, dict[str, torch.Tensor], int]:
    """Internal cores of the latest manifest, each decoded at the scale where a 224 px tile is
    ``size`` px (a square crop of the image's shorter side)."""
    path = data / "02_intermediate" / "core_manifest.parquet"
    if path.is_dir():
        path = sorted(path.iterdir())[-1] / "core_manifest.parquet"
    manifest = pd.read_parquet(path)
    manifest = manifest[manifest["cohort"] == "internal"].copy()
    manifest["k"] = manifest["five_class"].astype(str).map(FIVE_CLASSES.index)
    side = int(manifest[["width", "height"]].min().min() * size / 224)
    images = {}
    for row in manifest.itertuples():
        with Image.open(data / "02_intermediate" / "cores" / row.image) as im:
            im.draft("RGB", (side, side))
            rgb = np.array(im.convert("RGB").resize((side, side), Image.BILINEAR))
        images[row.core_id] = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
    return manifest, images, side


class Race:
    """One setting: a trunk with a five-class head, its sampler and its evaluation."""

    def __init__(self, name: str, size: int, args, manifest, images, side) -> None:
        torch.manual_seed(args.seed)
        self.rng = np.random.default_rng(args.seed)
        trunk, width = build_encoder(name, None)
        self.net = torch.nn.Sequential(trunk, torch.nn.Linear(width, len(FIVE_CLASSES)))
        self.net = self.net.to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.net.parameters(), args.lr, weight_decay=1e-8)
        self.size, self.side, self.images, self.batch = size, side, images, args.batch
        self.train = manifest[manifest["split"] == "train"]
        counts = self.train["k"].map(self.train["k"].value_counts()).to_numpy()
        self.weights = (1.0 / counts) / (1.0 / counts).sum()

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of random tiles, one from each of ``batch`` class-balanced training cores."""
        idx = self.rng.choice(len(self.train), self.batch, p=self.weights)
        s, tiles = self.size, []
        for i in idx:
            y0, x0 = self.rng.integers(0, self.side - s + 1, 2)
            tile = self.images[self.train["core_id"].iloc[i]][:, y0 : y0 + s, x0 : x0 + s]
            for dim in (1, 2):
                if self.rng.random() < 0.5:
                    tile = tile.flip(dim)
            tiles.append(tile)
        x = torch.stack(tiles).contiguous(memory_format=torch.channels_last)
        return x, torch.as_tensor(self.train["k"].iloc[idx].to_numpy())

    def step(self) -> float:
        x, y = self.draw()
        self.opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        loss.backward()
        self.opt.step()
        return float(loss)

    def evaluate(self, cores: pd.DataFrame) -> dict[str, float]:
        """Balanced accuracies from each core's mean tile probabilities (the tile grid)."""
        recompute_batch_norm(self.net, [self.draw()[0] for _ in range(8)], lambda m, x: m(x))
        self.net.eval()
        s, n = self.size, self.side // self.size
        probs = []
        with torch.inference_mode():
            for core_id in cores["core_id"]:
                img = self.images[core_id][:, : n * s, : n * s]
                tiles = img.unfold(1, s, s).unfold(2, s, s).permute(1, 2, 0, 3, 4)
                x = tiles.reshape(-1, 3, s, s).contiguous(memory_format=torch.channels_last)
                probs.append(self.net(x).softmax(1).mean(0).numpy())
        self.net.train()
        p, k = np.array(probs), cores["k"].to_numpy()
        score_p = np.stack([p[:, 0], p[:, 1], p[:, 2] + p[:, 3], p[:, 4]], 1)
        two = np.isin(k, [2, 3])
        return {
            "five_class": balanced_accuracy_score(k, p.argmax(1)),
            "ihc_score": balanced_accuracy_score(SCORE_OF[k], score_p.argmax(1)),
            "her2_status": balanced_accuracy_score(STATUS_OF[k], p[:, 3] + p[:, 4] > 0.5),
            "2-/2+": float(((p[two, 3] > p[two, 2]) == (k[two] == 3)).mean()),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--settings", nargs="+", default=["resnet18:64", "resnet34:64"])
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.minutes} min each")
    rows = []
    for setting in args.settings:
        name, size = setting.split(":")
        manifest, images, side = load_cores(args.data, int(size))
        race = Race(name, int(size), args, manifest, images, side)
        start, steps, losses = time.perf_counter(), 0, []
        while time.perf_counter() - start < args.minutes * 60:
            losses.append(race.step())
            steps += 1
        row = {"trunk": name, "size": int(size), "steps": steps, "tiles": steps * args.batch}
        row["loss_last20"] = float(np.mean(losses[-20:]))
        for split in ("val", "test"):
            scores = race.evaluate(manifest[manifest["split"] == split])
            row.update({f"{split}.{key}": value for key, value in scores.items()})
        rows.append(row)
        print(pd.DataFrame([row]).round(3).to_string(index=False), flush=True)
    print("\nbalanced accuracy after equal minutes (mean tile probabilities per core):")
    print(pd.DataFrame(rows).set_index(["trunk", "size"]).round(3).to_string())


if __name__ == "__main__":
    main()
