"""Throughput and memory of the MIL models (ResNet trunk, attention MIL): prints, asserts nothing.

Each measurement runs in a fresh child process (this script re-invoked with ``--phase NAME``), so
the peak memory reported is that measurement's alone: the child's ``ru_maxrss`` on CPU (its peak
RSS, imports and set-up included; beside it, its rise over the peak at the end of set-up), and on
CUDA ``torch.cuda.max_memory_allocated`` over the measured iterations. Times are the median of
``--repeats`` iterations after ``--warmup`` iterations (CUDA synchronised). The cores are made
here: ``--cores`` synthetic cores of ``--core-size`` px (noise and stained blobs, JPEG q90).

1. MIL training throughput (tiles/s): AttentionMIL with a ResNet trunk trained by the project's
   loop (``training._train_epoch``: forward, cross-entropy, backward, Adam step, one bag per step)
   over a training BagDataset from JPEG bytes (decode, random grid offset, tiling, resize to
   ``--input-size``, flips), against the same loop and model on random tensors already in memory
   of the same bag sizes. Ratio end to end / raw (target >= 0.8: loading is not the bottleneck).
2. Embedding throughput (tiles/s): ``embed_core`` over the cores from JPEG bytes (decode, tiling,
   resize, inference-mode forward, channels-last) against ``trunk(x)`` in inference mode on
   channels-last tensors in memory, in batches of the same size. Ratio (target >= 0.8).
3. One MIL training epoch on the cached embeddings (AttentionMIL without encoder over an
   EmbeddingBagDataset of the embeddings computed in 2) against one end-to-end epoch (from 1).
   Speed-up (target >= 100x) and the epochs after which embedding once has paid for itself.
4. Peak memory of each of the above (see the first paragraph).
5. One end-to-end training step on a whole core at full resolution (224 px tiles, no resize, the
   full tile grid at offset (0, 0), flips), gradient checkpointing with ``--full-micro-batch``:
   time and peak memory (target < 8 GB on CPU). The core is the first real 5468 px core in
   ../shared/data/real_cores when present (else a synthetic one); ``--quick`` uses a 1344 px
   centre crop of it instead, and says so. ``--skip-full-core`` leaves this out.

Timings on a shared machine are noisy: compare the ratios of one run, not absolute figures across
runs. Run: PYTHONPATH=src .venv/bin/python benchmarks/model_throughput.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()  # this process's start, near enough (torch is imported later)
ROOT = Path(__file__).resolve().parents[1]
REAL_CORES = ROOT.parent / "shared" / "data" / "real_cores"
N_CLASSES = 4  # IHC score 0-3
#: Settings ``--quick`` changes when they were left at their defaults.
QUICK = {"cores": 2, "warmup": 1, "repeats": 1, "full_core_size": 1344}
PHASES = ("train_e2e", "train_raw", "embed_e2e", "embed_raw", "epoch_cached", "full_core")


# --------------------------------------------------------------------------- synthetic data


def synthetic_core(size: int, seed: int):
    """An RGB uint8 core: glass, a tissue disc of noisy haematoxylin blue and brown DAB blobs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = size / 2
    radius = 0.46 * size * (1 + 0.04 * np.sin(np.arctan2(yy - centre, xx - centre) * 5))
    tissue = np.hypot(yy - centre, xx - centre) < radius
    rgb = np.full((size, size, 3), 238.0, dtype=np.float32)
    rgb[tissue] = (170.0, 160.0, 195.0)
    n_blobs = max(4, size * size // 4000)
    cy, cx = rng.uniform(0, size, (2, n_blobs))
    r = rng.uniform(4, 14, n_blobs)
    for y, x, rad in zip(cy, cx, r, strict=True):
        y0, y1 = int(max(0, y - rad)), int(min(size, y + rad + 1))
        x0, x1 = int(max(0, x - rad)), int(min(size, x + rad + 1))
        blob = np.hypot(yy[y0:y1, x0:x1] - y, xx[y0:y1, x0:x1] - x) < rad
        blob &= tissue[y0:y1, x0:x1]
        rgb[y0:y1, x0:x1][blob] = (150.0, 100.0, 60.0)
    rgb += rng.normal(0, 12, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_cores(workdir: Path, n: int, size: int, seed: int) -> None:
    """``n`` synthetic cores as JPEG (q90) files and ``labels.json`` (core id -> IHC score)."""
    from her2_kedro.imaging.pixels import encode_jpeg

    folder = workdir / "cores"
    folder.mkdir()
    labels = {}
    for i in range(n):
        (folder / f"core_{i:02d}.jpg").write_bytes(encode_jpeg(synthetic_core(size, seed + i), 90))
        labels[f"core_{i:02d}"] = i % N_CLASSES
    (workdir / "labels.json").write_text(json.dumps(labels))


def write_full_core(workdir: Path, args: argparse.Namespace) -> str:
    """Write the full-resolution core to ``full_core.jpg``; a line saying what it is."""
    from her2_kedro.features.preprocess import decode_rgb
    from her2_kedro.imaging.pixels import encode_jpeg

    source = Path(args.full_core) if args.full_core else None
    target = workdir / "full_core.jpg"
    if source is not None and source.is_file():
        if not args.quick:
            target.write_bytes(source.read_bytes())
            return f"real core {source.name} (full size)"
        rgb = decode_rgb(source.read_bytes())
        side = min(args.full_core_size, *rgb.shape[:2])
        y0, x0 = (rgb.shape[0] - side) // 2, (rgb.shape[1] - side) // 2
        target.write_bytes(encode_jpeg(rgb[y0 : y0 + side, x0 : x0 + side].copy(), 95))
        return f"QUICK: {side} px centre crop of real core {source.name}, NOT the full 5468 px core"
    side = args.full_core_size
    target.write_bytes(encode_jpeg(synthetic_core(side, args.seed + 999), 90))
    quick = "QUICK (not 5468 px): " if args.quick else ""
    return f"{quick}synthetic {side} px core (no real core found)"


# --------------------------------------------------------------------------- child helpers


def _peak_rss_mb() -> float:
    """This process's peak RSS so far in MB (ru_maxrss: KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _sync(device) -> None:
    """Wait for the device's queued work (CUDA) so wall times are complete."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Times warm-up and measured iterations and the memory of the measured part of a phase."""

    def __init__(self, device) -> None:
        self.device = device
        self.setup_s = time.perf_counter() - START
        self.rss_setup_mb = _peak_rss_mb()
        self.seconds: list[float] = []
        self.tiles: list[int] = []
        self.cuda_peak_mb: float | None = None

    def run(self, step, warmup: int, repeats: int) -> None:
        """Call ``step(i) -> tiles`` ``warmup`` times untimed, then ``repeats`` times timed."""
        import torch

        for i in range(warmup):
            step(i)
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for i in range(warmup, warmup + repeats):
            t0 = time.perf_counter()
            tiles = step(i)
            _sync(self.device)
            self.seconds.append(time.perf_counter() - t0)
            self.tiles.append(int(tiles))
        if self.device.type == "cuda":
            self.cuda_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20

    def result(self, **extra) -> dict:
        """The phase's figures as a JSON-able dict."""
        import torch

        return {
            "seconds": self.seconds,
            "tiles": self.tiles,
            "setup_s": self.setup_s,
            "rss_setup_mb": self.rss_setup_mb,
            "rss_peak_mb": _peak_rss_mb(),
            "cuda_peak_mb": self.cuda_peak_mb,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            **extra,
        }


class Counting:
    """Wraps a bag loader, noting each bag's size and label (``len`` kept for ``_train_epoch``)."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.bags: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for bag in self.loader:
            self.bags.append((len(bag.tiles), int(bag.label)))
            yield bag

    @property
    def tiles(self) -> int:
        return sum(n for n, _ in self.bags)


def _device(args):
    """The torch device of the run, with the thread count and seed applied."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.device(args.device)


def _core_bytes(workdir: Path) -> dict[str, bytes]:
    """The synthetic cores' JPEG bytes by image name, read once (in memory, as loaders give)."""
    return {p.name: p.read_bytes() for p in sorted((workdir / "cores").glob("*.jpg"))}


def _rows(workdir: Path):
    """Manifest-like rows ``core_id, image, ihc_score`` of the synthetic cores."""
    import pandas as pd

    labels = json.loads((workdir / "labels.json").read_text())
    return pd.DataFrame(
        {
            "core_id": list(labels),
            "image": [f"{c}.jpg" for c in labels],
            "ihc_score": list(labels.values()),
        }
    )


def _training(args):
    """The project's training settings for this run (Adam and bf16 as the loop uses them)."""
    from her2_kedro.config.mil import TrainingConfig

    return TrainingConfig(device=args.device, bf16=args.bf16, num_workers=args.workers)


def _optimizer(model, config):
    import torch

    return torch.optim.Adam(
        model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )


def _mil(args, device, *, encoder: bool, micro_batch: int | None = None, checkpoint=False):
    """AttentionMIL (seeded): end to end with the ``--encoder`` trunk, or on 512-d embeddings."""
    import torch

    from her2_kedro.modelling.attention import build_attention_mil

    torch.manual_seed(args.seed)
    model = build_attention_mil(
        N_CLASSES,
        encoder=args.encoder if encoder else None,
        in_dim=512,
        micro_batch=micro_batch or args.micro_batch,
        grad_checkpoint=checkpoint,
    )
    return model.to(device)


def _epoch_runner(args, model, data, device, record: list | None = None):
    """``step(epoch) -> tiles``: one training epoch of the project's loop over ``data``; each
    epoch's bag sizes and labels, in training order, are appended to ``record``."""
    from tqdm.auto import tqdm

    from her2_kedro.modelling.training import _loader, _train_epoch, _training_order

    config = _training(args)
    optimizer = _optimizer(model, config)

    def step(epoch: int) -> int:
        data.set_epoch(epoch)
        order = _training_order(data, None, args.seed, epoch)
        loader = Counting(_loader(data, order, config, device))
        with tqdm(disable=True) as bar:
            _train_epoch(model, loader, optimizer, config, device, bar)
        if record is not None:
            record.append(loader.bags)
        return loader.tiles

    return step


# --------------------------------------------------------------------------- phases


def phase_train_e2e(args, workdir: Path) -> dict:
    """End-to-end MIL training epochs from JPEG bytes; saves the epochs' bag sizes for train_raw."""
    from her2_kedro.config.mil import BagConfig
    from her2_kedro.modelling.bags import BagDataset

    device = _device(args)
    cores = {name: (lambda b=data: b) for name, data in _core_bytes(workdir).items()}
    config = BagConfig(input_size=args.input_size)
    data = BagDataset(
        _rows(workdir), cores, target="ihc_score", config=config, train=True, seed=args.seed
    )
    model = _mil(args, device, encoder=True)
    meter = Meter(device)
    bags: list = []
    meter.run(_epoch_runner(args, model, data, device, bags), args.warmup, args.repeats)
    (workdir / "bag_sizes.json").write_text(json.dumps(bags))
    return meter.result()


def phase_train_raw(args, workdir: Path) -> dict:
    """The same model and loop on random tensors in memory, bag for bag the sizes of train_e2e."""
    import torch
    from tqdm.auto import tqdm

    from her2_kedro.modelling.bags import Bag
    from her2_kedro.modelling.training import _train_epoch

    device = _device(args)
    epochs = json.loads((workdir / "bag_sizes.json").read_text())
    side = args.input_size
    bags = [
        [
            Bag(torch.rand(n, 3, side, side, device=device), torch.zeros(n, 2), label, "raw")
            for n, label in epoch
        ]
        for epoch in epochs
    ]
    model = _mil(args, device, encoder=True)
    config = _training(args)
    optimizer = _optimizer(model, config)

    def step(epoch: int) -> int:
        with tqdm(disable=True) as bar:
            _train_epoch(model, bags[epoch], optimizer, config, device, bar)
        return sum(len(b.tiles) for b in bags[epoch])

    meter = Meter(device)
    meter.run(step, args.warmup, args.repeats)
    return meter.result()


def _trunk(args, device):
    """The ``--encoder`` trunk (random init), eval mode, channels-last, as embed_cores uses it."""
    import torch

    from her2_kedro.modelling.encoders import build_encoder

    torch.manual_seed(args.seed)
    trunk, _ = build_encoder(args.encoder)
    return trunk.to(memory_format=torch.channels_last).to(device).eval()


def phase_embed_e2e(args, workdir: Path) -> dict:
    """``embed_core`` over every core from its JPEG bytes; saves the embeddings for epoch_cached."""
    import numpy as np

    from her2_kedro.features.preprocess import decode_rgb
    from her2_kedro.imaging.tiling import PAPER_RULE
    from her2_kedro.modelling.embeddings import embed_core

    device = _device(args)
    trunk = _trunk(args, device)
    cores = _core_bytes(workdir)
    entries: dict[str, dict] = {}

    def step(_: int) -> int:
        for name, data in cores.items():
            entries[Path(name).stem] = embed_core(
                trunk,
                decode_rgb(data),
                Path(name).stem,
                PAPER_RULE,
                args.input_size,
                batch_size=args.embed_batch,
                device=device,
            )
        return sum(len(e["embeddings"]) for e in entries.values())

    meter = Meter(device)
    meter.run(step, args.warmup, args.repeats)
    folder = workdir / "embeddings"
    folder.mkdir(exist_ok=True)
    for core_id, entry in entries.items():
        np.savez(folder / f"{core_id}.npz", **entry)
    return meter.result()


def phase_embed_raw(args, workdir: Path) -> dict:
    """``trunk(x)`` in inference mode on channels-last tensors in memory, the cores' tile counts."""
    import torch

    device = _device(args)
    trunk = _trunk(args, device)
    counts = [
        len(_load_entry(p)["embeddings"]) for p in sorted((workdir / "embeddings").glob("*.npz"))
    ]
    side = args.input_size
    tensors = [
        torch.rand(n, 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
        for n in counts
    ]

    def step(_: int) -> int:
        with torch.inference_mode():
            for x in tensors:
                for chunk in torch.split(x, args.embed_batch):
                    trunk(chunk)
        return sum(counts)

    meter = Meter(device)
    meter.run(step, args.warmup, args.repeats)
    return meter.result()


def _load_entry(path: Path) -> dict:
    """One saved cache entry (``embeddings``, ``coords``)."""
    import numpy as np

    with np.load(path) as npz:
        return {"embeddings": npz["embeddings"], "coords": npz["coords"]}


def phase_epoch_cached(args, workdir: Path) -> dict:
    """MIL training epochs (no encoder) over an EmbeddingBagDataset of the saved embeddings."""
    from her2_kedro.modelling.embeddings import EmbeddingBagDataset

    device = _device(args)
    entries = {p.stem: _load_entry(p) for p in sorted((workdir / "embeddings").glob("*.npz"))}
    loaders = {core_id: (lambda e=entry: e) for core_id, entry in entries.items()}
    data = EmbeddingBagDataset(
        _rows(workdir), loaders, target="ihc_score", train=True, seed=args.seed
    )
    model = _mil(args, device, encoder=False)
    meter = Meter(device)
    # an epoch takes milliseconds: a few more iterations cost nothing and steady the median
    meter.run(_epoch_runner(args, model, data, device), max(args.warmup, 2), max(args.repeats, 10))
    return meter.result()


def phase_full_core(args, workdir: Path) -> dict:
    """One end-to-end training step on the whole full-resolution core, gradient checkpointing."""
    import pandas as pd
    from tqdm.auto import tqdm

    from her2_kedro.config.mil import BagConfig
    from her2_kedro.modelling.bags import Bag, BagDataset
    from her2_kedro.modelling.training import _train_epoch

    device = _device(args)
    data_bytes = (workdir / "full_core.jpg").read_bytes()
    rows = pd.DataFrame({"core_id": ["full"], "image": ["full_core.jpg"], "ihc_score": [1]})
    config = BagConfig(input_size=None, random_offset=False, flips=True)
    data = BagDataset(
        rows, {"full_core.jpg": lambda: data_bytes}, target="ihc_score", config=config, train=True
    )
    micro = args.full_micro_batch
    model = _mil(args, device, encoder=True, micro_batch=micro, checkpoint=True)
    training = _training(args)
    optimizer = _optimizer(model, training)
    timing: dict[str, float] = {}

    def step(i: int) -> int:
        t0 = time.perf_counter()
        bag = data[0]
        if i < args.warmup:  # warm-up on a few of the core's tiles only (a micro-batch at most)
            n = min(micro, max(2, len(bag.tiles) // 4))
            bag = Bag(bag.tiles[:n], bag.coords[:n], bag.label, bag.core_id)
        timing["load_s"] = time.perf_counter() - t0
        with tqdm(disable=True) as bar:
            _train_epoch(model, [bag], optimizer, training, device, bar)
        return len(bag.tiles)

    meter = Meter(device)
    meter.run(step, args.warmup, 1)
    return meter.result(load_s=timing["load_s"], micro_batch=micro)


# --------------------------------------------------------------------------- parent


def _env() -> dict[str, str]:
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def run_phase(phase: str, workdir: Path) -> dict:
    """Run one phase in a fresh child process; its JSON result (the last line it prints)."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--phase", phase, "--workdir", str(workdir)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"phase {phase} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(result: dict) -> tuple[float, int, float]:
    """Median seconds, median tiles and median tiles/s of a phase's measured iterations."""
    rates = [t / s for t, s in zip(result["tiles"], result["seconds"], strict=True)]
    return (
        statistics.median(result["seconds"]),
        int(statistics.median(result["tiles"])),
        statistics.median(rates),
    )


def _memory(result: dict) -> str:
    """Peak memory of a phase: peak RSS and its rise over the peak at the end of set-up (imports,
    model, data); the CUDA peak allocated over the measured iterations when on CUDA."""
    rise = result["rss_peak_mb"] - result["rss_setup_mb"]
    text = f"{result['rss_peak_mb']:8.0f} (+{rise:5.0f})"
    if result.get("cuda_peak_mb") is not None:
        text += f"  {result['cuda_peak_mb']:9.0f}"
    return text


def _row(label: str, result: dict) -> str:
    seconds, tiles, rate = _median(result)
    return f"  {label:40s} {tiles:6d} {seconds:9.4f} {rate:9.1f}  {_memory(result)}"


def _ratio(a: dict, b: dict) -> float:
    return _median(a)[2] / _median(b)[2]


def report(args, results: dict[str, dict], full_core_note: str | None) -> None:
    """Print the figures of every phase as a table, with the ratios and targets."""
    cuda = " CUDA peak MB" if args.device.startswith("cuda") else ""
    print(
        f"\n  {'measurement':40s} {'tiles':>6s} {'median s':>9s} {'tiles/s':>9s}  "
        f"peak RSS MB (+ over set-up){cuda}"
    )
    print(f"1 MIL training (forward, backward, Adam), input {args.input_size} px")
    print(_row("end to end from JPEG (BagDataset train)", results["train_e2e"]))
    print(_row("random tensors in memory", results["train_raw"]))
    print(
        f"  ratio end to end / raw: "
        f"{_ratio(results['train_e2e'], results['train_raw']):.2f} (target >= 0.8)"
    )
    print(f"2 embedding (inference mode, channels-last, batch {args.embed_batch})")
    print(_row("embed_core from JPEG", results["embed_e2e"]))
    print(_row("trunk(x) on tensors in memory", results["embed_raw"]))
    print(
        f"  ratio embed_core / raw: "
        f"{_ratio(results['embed_e2e'], results['embed_raw']):.2f} (target >= 0.8)"
    )
    print("3 one MIL training epoch over the same cores")
    print(_row("on cached embeddings (no encoder)", results["epoch_cached"]))
    print(_row("end to end (the epochs of 1)", results["train_e2e"]))
    cached, e2e = _median(results["epoch_cached"])[0], _median(results["train_e2e"])[0]
    embed = _median(results["embed_e2e"])[0]
    payback = embed / (e2e - cached) if e2e > cached else float("inf")
    print(
        f"  speed-up cached / end to end: {e2e / cached:.0f}x per epoch (target >= 100x), "
        f"{_ratio(results['epoch_cached'], results['train_e2e']):.0f}x per tile (training bags "
        "have a random grid offset, cached ones the full grid at (0, 0))"
    )
    print(f"  embedding the cores once ({embed:.2f} s) pays back after {payback:.1f} epoch(s)")
    full = results.get("full_core")
    if full is None:
        print("5 full-resolution core: skipped (--skip-full-core)")
        return
    seconds, tiles, _ = _median(full)
    print(f"5 one end-to-end training step at full resolution: {full_core_note}")
    print(
        f"  {tiles} tiles of 224 px (no resize), grad checkpointing, "
        f"micro-batch {full['micro_batch']}: "
        f"load+tile {full['load_s']:.2f} s, step (incl. load) {seconds:.1f} s, "
        f"{tiles / seconds:.1f} tiles/s"
    )
    target = " (target < 8 GB on CPU)" if not args.device.startswith("cuda") else ""
    peak, setup = full["rss_peak_mb"] / 1024, full["rss_setup_mb"] / 1024
    line = f"  peak RSS {peak:.2f} GB{target}, {setup:.2f} GB at the end of set-up"
    if full.get("cuda_peak_mb") is not None:
        line += f"; CUDA peak allocated {full['cuda_peak_mb'] / 1024:.2f} GB"
    print(line)


def settings(args) -> None:
    """Print the versions, device, threads and settings of the run."""
    import torch

    threads = args.threads or torch.get_num_threads()
    print(
        f"torch {torch.__version__}, device {args.device}, {threads} thread(s), "
        f"encoder {args.encoder}"
    )
    if args.device.startswith("cuda") and torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(torch.device(args.device))}")
    print(
        f"settings: {args.cores} cores of {args.core_size} px, input {args.input_size} px, "
        f"micro-batch {args.micro_batch}, embedding batch {args.embed_batch}, DataLoader workers "
        f"{args.workers}, bf16 {args.bf16} (CUDA only), warm-up {args.warmup}, repeats "
        f"{args.repeats}, seed {args.seed}{', QUICK run' if args.quick else ''}"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line settings, ``--quick`` values applied to those left at their defaults."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    parser.add_argument(
        "--encoder", default="resnet34", choices=["resnet18", "resnet34", "resnet50"]
    )
    parser.add_argument("--cores", type=int, default=8, help="synthetic cores in 1-3")
    parser.add_argument(
        "--core-size", type=int, default=672, help="side of the synthetic cores (px)"
    )
    parser.add_argument("--input-size", type=int, default=64, help="tiles resized to (px)")
    parser.add_argument("--micro-batch", type=int, default=64, help="AttentionMIL micro_batch in 1")
    parser.add_argument("--embed-batch", type=int, default=128, help="embed_core batch_size")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers in 1 and 3")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast (CUDA only)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    default_core = next(iter(sorted(REAL_CORES.glob("*.jpg"))), None)
    parser.add_argument(
        "--full-core", default=str(default_core) if default_core else None, help="JPEG core for 5"
    )
    parser.add_argument(
        "--full-core-size",
        type=int,
        default=5468,
        help="side of the synthetic full core (no real core) or of the --quick crop",
    )
    parser.add_argument(
        "--full-micro-batch", type=int, default=32, help="micro_batch of the step in 5"
    )
    parser.add_argument("--skip-full-core", action="store_true", help="leave out 5")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} unless set")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    return args


def main() -> None:
    args = parse()
    if args.phase:
        result = globals()[f"phase_{args.phase}"](args, Path(args.workdir))
        print(json.dumps(result))
        return
    settings(args)
    phases = [p for p in PHASES if not (p == "full_core" and args.skip_full_core)]
    with tempfile.TemporaryDirectory(prefix="her2_model_bench_") as tmp:
        workdir = Path(tmp)
        write_cores(workdir, args.cores, args.core_size, args.seed)
        note = None if args.skip_full_core else write_full_core(workdir, args)
        results = {}
        for phase in phases:
            t0 = time.perf_counter()
            results[phase] = run_phase(phase, workdir)
            print(
                f"  (phase {phase}: {time.perf_counter() - t0:.1f} s in a fresh process, "
                f"{results[phase]['setup_s']:.1f} s of it imports and set-up)",
                flush=True,
            )
    report(args, results, note)


if __name__ == "__main__":
    main()
