"""Every GPU measurement of the fast path and the CUDA smoke checks, in one run: prints, asserts
nothing about speed (the smoke checks' failures make the exit status 1).

Figures are medians of ``--repeats`` timed iterations after ``--warmup`` untimed ones, each ended
by ``torch.cuda.synchronize()``; beside each, the peak GPU memory of its timed iterations
(``torch.cuda.max_memory_allocated``, reset before each measurement) and the H200 reference.

a. ResNet34 trunk forward, ``--tile`` px, batch ``--batch``: fp32; bf16 autocast + channels-last;
   the same ``torch.compile``d (tiles/s).
b. End-to-end attention MIL (ResNet34 trunk, bf16) forward + backward + Adam through the project's
   loop (``training._train_epoch``) on bags of ``--bag-tiles`` tiles in GPU memory; the same loop
   over a training ``BagDataset`` of JPEG core bytes (CPU decode, random grid offset, flips,
   ``--workers`` DataLoader workers), and its ratio to the in-memory figure (target >= 0.7).
c. ResNet34 whole-core classifier training at ``--whole-core-px`` px (images/s).
d. Decoding one ``--core-px`` JPEG core: Pillow on one CPU core vs ``decode_core`` on the device
   (nvJPEG on CUDA), one at a time and ``--decode-batch`` at a time (cores/s).
e. The embedding pipeline of ``features.device_embedding`` from file bytes to host arrays (read,
   decode, stain normalisation, tissue rule, tiles, bf16 forward, copy to host): a per-step
   breakdown on one core, then ``embed_core_on_device`` core after core and the overlapped
   ``embed_cores_on_device`` (tiles/s, cores/s), and their ratio to the fastest trunk forward of
   a (target >= 0.6).
f. A paper-size cohort: ``--cohort-cores`` cores (default 2,562: the synthetic cores' bytes
   repeated) through ``embed_cores_on_device``: wall time (target < 2 min for 2,562).
g. Smoke checks: ``embed_decoded`` on the device (bf16) against the CPU float32 result on the same
   pixels (coordinates identical, embeddings within ``--embed-rtol``); ``embed_core_on_device``
   from bytes on both (nvJPEG may move a pixel: shared coordinates, same tolerance); stain
   normalisation on the device against numpy's ``normalise`` (within ``--grey-tol`` levels);
   one bf16 training step of the project's loop with a finite loss.

Synthetic cores (noise, a tissue disc, DAB blobs; JPEG q90) are made here with
``model_throughput.synthetic_core``. ``--device cpu --quick`` runs every part on small sizes in
well under a minute (a check of the script, not a measurement; torch.compile is off on CPU unless
``--compile``). Run: PYTHONPATH=src .venv/bin/python benchmarks/gpu_benchmark.py [--device cuda]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from model_throughput import synthetic_core  # noqa: E402

from her2_kedro.config.mil import BagConfig, TrainingConfig  # noqa: E402
from her2_kedro.config.shared import TileConfig  # noqa: E402
from her2_kedro.features import device_embedding as de  # noqa: E402
from her2_kedro.features.preprocess import decode_rgb  # noqa: E402
from her2_kedro.imaging.normalisation import normalise  # noqa: E402
from her2_kedro.imaging.pixels import encode_jpeg  # noqa: E402
from her2_kedro.imaging.stain import separation_matrix  # noqa: E402
from her2_kedro.imaging.stain_vectors import StainVectors  # noqa: E402
from her2_kedro.modelling.devices import autocast  # noqa: E402
from her2_kedro.modelling.encoders import build_encoder  # noqa: E402

N_CLASSES = 4  # IHC score 0-3
PAPER_CORES = 2562
#: H200 reference figures, printed beside ours.
REFERENCE = {
    "fwd_fp32": "14.3k tiles/s",
    "fwd_bf16": "28.3k tiles/s",
    "fwd_compiled": "39.5k tiles/s",
    "mil_raw": "8.7k tiles/s",
    "whole_core": "450 images/s",
    "pillow": "2.6 cores/s (0.38 s a core)",
    "nvjpeg": "230 cores/s",
    "hdab": "17 ms a core",
}
#: Settings ``--quick`` changes when they were left at their defaults.
QUICK = {
    "tile": 32,
    "batch": 8,
    "bag_tiles": 8,
    "raw_bags": 2,
    "micro_batch": 8,
    "core_px": 256,
    "cores": 2,
    "train_cores": 2,
    "workers": 0,
    "whole_core_px": 64,
    "whole_core_batch": 2,
    "decode_batch": 2,
    "embed_cores": 3,
    "cohort_cores": 4,
    "warmup": 1,
    "repeats": 2,
}
#: Stain vectors of the normalisation step: a source cohort mapped onto a reference with pooled
#: concentration percentiles (so the per-core percentile match runs too).
SOURCE = StainVectors((0.55, 0.78, 0.30), (0.20, 0.50, 0.84))
TARGET = StainVectors((0.65, 0.70, 0.29), (0.27, 0.57, 0.78), max_concentrations=(120.0, 80.0))


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


@dataclass
class Timing:
    """Median seconds and units (tiles, images, cores) of the timed iterations, and peak memory."""

    seconds: float
    units: float
    peak_mb: float | None

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds > 0 else math.inf


def timed(device: torch.device, step: Callable[[], float], warmup: int, repeats: int) -> Timing:
    """``step() -> units`` ``warmup`` times untimed, then ``repeats`` times timed (synchronised)."""
    for _ in range(warmup):
        step()
    sync(device)
    reset_memory(device)
    seconds, units = [], []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        units.append(step())
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return Timing(statistics.median(seconds), statistics.median(units), peak_mb(device))


def _si(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def row(label: str, t: Timing, unit: str, reference: str | None = None) -> None:
    """One printed figure: rate, median time, peak GPU memory, the H200 reference."""
    mem = "-" if t.peak_mb is None else f"{t.peak_mb:,.0f}"
    ref = f"   H200 ref {reference}" if reference else ""
    print(
        f"  {label:48s} {_si(t.rate):>7s} {unit:8s} {t.seconds * 1e3:9.1f} ms {mem:>9s} MB{ref}",
        flush=True,
    )


def header(title: str) -> None:
    print(f"\n{title}", flush=True)


# --------------------------------------------------------------------------- set-up


def trunk_of(args, device: torch.device, *, channels_last: bool, compile: bool = False):
    """The ``--encoder`` trunk, random init seeded by ``--seed`` (the same weights every call)."""
    torch.manual_seed(args.seed)
    trunk, _ = build_encoder(args.encoder, None)
    return de.prepare_trunk(trunk, device, channels_last=channels_last, compile=compile)


def write_cores(folder: Path, args) -> list[Path]:
    """``--cores`` distinct synthetic cores of ``--core-px`` px as JPEG q90 files."""
    t0 = time.perf_counter()
    paths = []
    for i in range(args.cores):
        path = folder / f"core_{i:02d}.jpg"
        path.write_bytes(encode_jpeg(synthetic_core(args.core_px, args.seed + i), 90))
        paths.append(path)
    mb = sum(p.stat().st_size for p in paths) / 2**20
    print(
        f"made {len(paths)} synthetic {args.core_px} px cores ({mb:.1f} MB of JPEG) in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return paths


def rule_of(args) -> TileConfig:
    """The paper's tile rule at ``--tile`` px (224 unless --quick)."""
    return TileConfig(tile_size=args.tile, stride=args.tile)


def normaliser() -> de.DeviceNormaliser:
    return functools.partial(de.normalise_tensor, source=SOURCE, target=TARGET)


def training_config(args, workers: int = 0) -> TrainingConfig:
    return TrainingConfig(device=args.device, bf16=True, num_workers=workers, seed=args.seed)


def adam(model, config: TrainingConfig):
    return torch.optim.Adam(
        model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )


def constant(data: bytes) -> Callable[[], bytes]:
    """A loader of bytes already in memory (as Kedro's PartitionedDataset gives loaders)."""
    return lambda: data


class Counting:
    """Wraps a bag loader and counts the tiles it yields (``len`` kept for ``_train_epoch``)."""

    def __init__(self, loader) -> None:
        self.loader, self.tiles = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for bag in self.loader:
            self.tiles += len(bag.tiles)
            yield bag


def train_epoch(model, items, optimizer, config, device) -> float:
    """The project's training loop over ``items`` (one optimiser step per item); mean loss."""
    from tqdm.auto import tqdm

    from her2_kedro.modelling.training import _train_epoch

    with tqdm(disable=True) as bar:
        return _train_epoch(model, items, optimizer, config, device, bar)


# --------------------------------------------------------------------------- a. trunk forward


def forward_step(trunk, x: torch.Tensor, device: torch.device, bf16: bool) -> Callable[[], int]:
    def step() -> int:
        with torch.inference_mode(), autocast(device, bf16):
            trunk(x)
        return len(x)

    return step


def section_trunk(args, device: torch.device) -> tuple[float, object]:
    """a: the trunk's forward; returns the fastest rate and the trunk that reached it."""
    header(f"a. {args.encoder} forward, {args.tile} px, batch {args.batch} (inference mode)")
    x = torch.rand(args.batch, 3, args.tile, args.tile, device=device)
    plain = trunk_of(args, device, channels_last=False)
    t = timed(device, forward_step(plain, x, device, False), args.warmup, args.repeats)
    row("fp32 (contiguous)", t, "tiles/s", REFERENCE["fwd_fp32"])
    del plain
    fast = trunk_of(args, device, channels_last=True)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    t = timed(device, forward_step(fast, x_cl, device, True), args.warmup, args.repeats)
    row(f"{bf16_label(device)} + channels-last", t, "tiles/s", REFERENCE["fwd_bf16"])
    best, best_trunk = t.rate, fast
    if not args.compile:
        print("  torch.compile: skipped (off on CPU; --compile forces it)")
        return best, best_trunk
    compiled = trunk_of(args, device, channels_last=True, compile=True)
    t0 = time.perf_counter()
    forward_step(compiled, x_cl, device, True)()
    sync(device)
    print(f"  (torch.compile of the trunk: {time.perf_counter() - t0:.1f} s, not timed)")
    t = timed(device, forward_step(compiled, x_cl, device, True), args.warmup, args.repeats)
    row(f"{bf16_label(device)} + channels-last + compile", t, "tiles/s", REFERENCE["fwd_compiled"])
    if t.rate > best:
        best, best_trunk = t.rate, compiled
    return best, best_trunk


def bf16_label(device: torch.device) -> str:
    return "bf16 autocast" if device.type == "cuda" else "fp32 (bf16 autocast is CUDA only)"


# --------------------------------------------------------------------------- b. MIL training


def mil_model(args, device: torch.device):
    from her2_kedro.modelling.attention import build_attention_mil

    torch.manual_seed(args.seed)
    model = build_attention_mil(N_CLASSES, encoder=args.encoder, micro_batch=args.micro_batch)
    return model.to(device)


def section_mil(args, device: torch.device, paths: list[Path]) -> None:
    """b: end-to-end attention MIL training, bags in GPU memory and from JPEG bytes."""
    import pandas as pd

    from her2_kedro.modelling.bags import Bag, BagDataset
    from her2_kedro.modelling.training import _loader, _training_order

    header(
        f"b. end-to-end attention MIL ({args.encoder}, micro-batch {args.micro_batch}), "
        f"{bf16_label(device)}: forward + backward + Adam in the project's loop"
    )
    side, n = args.tile, args.bag_tiles
    config = training_config(args)
    model = mil_model(args, device)
    optimizer = adam(model, config)
    bags = [
        Bag(torch.rand(n, 3, side, side, device=device), torch.zeros(n, 2), i % N_CLASSES, "raw")
        for i in range(args.raw_bags)
    ]

    def raw_step() -> int:
        train_epoch(model, bags, optimizer, config, device)
        return n * len(bags)

    raw = timed(device, raw_step, args.warmup, args.repeats)
    row(f"bags of {n} tiles of {side} px in device memory", raw, "tiles/s", REFERENCE["mil_raw"])
    # the loop as it is keeps model and tiles contiguous; channels-last measured beside it
    model.to(memory_format=torch.channels_last)
    contiguous = list(bags)
    bags[:] = [
        b._replace(tiles=b.tiles.contiguous(memory_format=torch.channels_last)) for b in bags
    ]
    row(
        "  the same, model and tiles channels-last",
        timed(device, raw_step, 1, args.repeats),
        "tiles/s",
    )
    model.to(memory_format=torch.contiguous_format)
    bags.clear()  # frees their GPU memory before the next measurement
    contiguous.clear()

    names = [f"c{i:03d}.jpg" for i in range(args.train_cores)]
    blobs = [p.read_bytes() for p in paths]
    loaders = {name: constant(blobs[i % len(blobs)]) for i, name in enumerate(names)}
    rows = pd.DataFrame(
        {
            "core_id": [Path(n).stem for n in names],
            "image": names,
            "ihc_score": [i % N_CLASSES for i in range(len(names))],
        }
    )
    data = BagDataset(
        rows,
        loaders,
        target="ihc_score",
        rule=rule_of(args),
        config=BagConfig(input_size=None, max_tiles=args.bag_tiles),
        train=True,
        seed=args.seed,
    )
    loop = training_config(args, workers=args.workers)
    epoch = {"i": 0}

    def e2e_step() -> int:
        data.set_epoch(epoch["i"])
        order = _training_order(data, None, args.seed, epoch["i"])
        epoch["i"] += 1
        loader = Counting(_loader(data, order, loop, device))
        train_epoch(model, loader, optimizer, loop, device)
        return loader.tiles

    e2e = timed(device, e2e_step, min(args.warmup, 1), args.repeats)
    label = f"{args.train_cores} JPEG cores, BagDataset, {args.workers} workers"
    row(label, e2e, "tiles/s")
    print(f"  ratio end to end / in memory: {e2e.rate / raw.rate:.2f} (target >= 0.7)")


# --------------------------------------------------------------------------- c. whole cores


def section_whole_core(args, device: torch.device) -> None:
    """c: the whole-core ResNet classifier's training at ``--whole-core-px``."""
    from her2_kedro.modelling.core_classifier import build_core_classifier
    from her2_kedro.modelling.core_images import CoreBatch

    side, b = args.whole_core_px, args.whole_core_batch
    header(f"c. {args.encoder} whole-core training, {side} px, batch {b}, {bf16_label(device)}")
    torch.manual_seed(args.seed)
    model = build_core_classifier(N_CLASSES, args.encoder).to(device)
    config = training_config(args)
    optimizer = adam(model, config)
    batches = [
        CoreBatch(
            torch.rand(b, 3, side, side, device=device),
            torch.arange(b, device=device) % N_CLASSES,
            [f"c{j}" for j in range(b)],
        )
        for _ in range(2)
    ]

    def step() -> int:
        train_epoch(model, batches, optimizer, config, device)
        return b * len(batches)

    row(
        "Adam steps on batches in device memory",
        timed(device, step, args.warmup, args.repeats),
        "images/s",
        REFERENCE["whole_core"],
    )


# --------------------------------------------------------------------------- d. decoding


def section_decode(args, device: torch.device, paths: list[Path]) -> None:
    """d: Pillow on one CPU core against the device decoder, single and batched."""
    header(f"d. decoding one {args.core_px} px JPEG core")
    data = paths[0].read_bytes()

    def pillow() -> int:
        decode_rgb(data)
        return 1

    row(
        "Pillow (decode_rgb), one CPU core",
        timed(device, pillow, 1, args.repeats),
        "cores/s",
        REFERENCE["pillow"],
    )
    what = "nvJPEG" if device.type == "cuda" else "libjpeg-turbo"

    def single() -> int:
        de.decode_core(data, device)
        return 1

    row(
        f"decode_core on {device.type} ({what})",
        timed(device, single, args.warmup, args.repeats),
        "cores/s",
        REFERENCE["nvjpeg"],
    )
    batch = [data] * args.decode_batch

    def batched() -> int:
        de.decode_cores(batch, device)
        return len(batch)

    row(
        f"decode_cores, {len(batch)} at a time",
        timed(device, batched, args.warmup, args.repeats),
        "cores/s",
        REFERENCE["nvjpeg"],
    )


# --------------------------------------------------------------------------- e. embedding


def dab_tile_means(rgb: torch.Tensor, coords: np.ndarray, tile: int) -> torch.Tensor:
    """scikit-image ``rgb2hed`` DAB of the core, mean per kept tile (the intensity feature's
    measurement, on the device): for comparison with the H-DAB reference figure."""
    s = torch.from_numpy(separation_matrix()).to(rgb.device, torch.float32)
    od = torch.log(rgb.permute(1, 2, 0).float().div(255.0).clamp_(min=1e-6)) / math.log(1e-6)
    dab = (od @ s[:, 2]).clamp_(min=0.0)
    means = F.avg_pool2d(dab[None, None], tile, tile)[0, 0]
    index = torch.as_tensor(coords // tile, device=rgb.device)
    return means[index[:, 1], index[:, 0]]


def breakdown(args, device: torch.device, trunk, data: bytes) -> None:
    """Each step of one core, synchronised on its own."""
    rule = rule_of(args)
    rgb = de.decode_core(data, device)
    normalised = normaliser()(rgb)
    coords, _ = de.kept_tiles(normalised, "c", rule)
    steps = {
        "decode_core (bytes in memory)": lambda: de.decode_core(data, device),
        "normalise_tensor (stain normalisation)": lambda: normaliser()(rgb),
        "kept_tiles (tissue rule, coords to host)": lambda: de.kept_tiles(normalised, "c", rule),
        "H-DAB deconvolution + per-tile DAB means": lambda: dab_tile_means(
            rgb, coords, rule.tile_size
        ),
        "cut_tiles + tiles_to_input + forward_tiles": lambda: forward_core_tiles(
            args, device, trunk, normalised, coords
        ),
    }
    for label, fn in steps.items():

        def step(fn=fn) -> int:
            fn()
            return 1

        ref = REFERENCE["hdab"] if label.startswith("H-DAB") else None
        t = timed(device, step, args.warmup, args.repeats)
        mem = "-" if t.peak_mb is None else f"{t.peak_mb:,.0f}"
        extra = f"   H200 ref {ref}" if ref else ""
        print(f"  {label:48s} {t.seconds * 1e3:9.1f} ms a core {mem:>9s} MB{extra}", flush=True)
    print(f"  ({len(coords)} kept tiles in this core)")


def forward_core_tiles(args, device, trunk, rgb, coords) -> None:
    """A core's kept tiles cut, scaled and embedded in batches, features copied to the host."""
    for start in range(0, len(coords), args.batch):
        chunk = coords[start : start + args.batch]
        x = de.tiles_to_input(de.cut_tiles(rgb, chunk, args.tile), None)
        de.forward_tiles(trunk, x, device).cpu()


def section_embedding(args, device: torch.device, trunk, raw_rate: float, paths) -> None:
    """e: the embedding pipeline from file bytes to host arrays."""
    header(
        f"e. embedding pipeline (read, decode, normalise, tissue rule, {args.tile} px tiles, "
        f"{bf16_label(device)} forward, to host), batch {args.batch}"
    )
    breakdown(args, device, trunk, paths[0].read_bytes())
    rule = rule_of(args)
    files = [paths[i % len(paths)] for i in range(args.embed_cores)]
    norm = normaliser()

    def sequential() -> int:
        return sum(
            len(
                de.embed_core_on_device(
                    trunk,
                    path.read_bytes(),
                    path.stem,
                    rule,
                    None,
                    normaliser=norm,
                    batch_size=args.batch,
                    device=device,
                )["coords"]
            )
            for path in files
        )

    seq = timed(device, sequential, args.warmup, args.repeats)
    row(f"embed_core_on_device, {len(files)} cores one by one", seq, "tiles/s")

    def overlapped() -> int:
        return sum(len(entry["coords"]) for _, entry in run_many(args, device, trunk, files))

    over = timed(device, overlapped, args.warmup, args.repeats)
    row(f"embed_cores_on_device, {len(files)} cores overlapped", over, "tiles/s")

    def unnormalised() -> int:
        entries = run_many(args, device, trunk, files, stain=False)
        return sum(len(entry["coords"]) for _, entry in entries)

    plain = timed(device, unnormalised, args.warmup, args.repeats)
    row("  the same without stain normalisation", plain, "tiles/s")
    per_core = over.units / len(files)
    for label, t in (("one by one", seq), ("overlapped", over), ("overlapped, no norm.", plain)):
        print(
            f"  {label}: {t.rate / per_core:.1f} cores/s ({per_core:.0f} tiles a core), "
            f"ratio to the trunk forward of a: {t.rate / raw_rate:.2f} (target >= 0.6)"
        )


def run_many(args, device, trunk, files: list[Path], stain: bool = True):
    """``embed_cores_on_device`` over ``files`` (read from disk by its reader threads), every
    core stain-normalised unless ``stain`` is false."""
    ids = [f"{i:05d}_{p.stem}" for i, p in enumerate(files)]
    norm = normaliser()
    return de.embed_cores_on_device(
        trunk,
        [(core_id, path.read_bytes) for core_id, path in zip(ids, files, strict=True)],
        rule_of(args),
        None,
        normalisers={core_id: norm for core_id in ids} if stain else None,
        batch_size=args.batch,
        device=device,
        decode_batch=args.decode_batch,
        read_workers=args.read_workers,
    )


# --------------------------------------------------------------------------- f. cohort


def section_cohort(args, device: torch.device, trunk, paths: list[Path]) -> None:
    """f: a paper-size cohort end to end, wall time."""
    n = args.cohort_cores
    header(f"f. cohort of {n:,} cores of {args.core_px} px (the synthetic cores' bytes repeated)")
    files = [paths[i % len(paths)] for i in range(n)]
    reset_memory(device)
    t0 = time.perf_counter()
    tiles = sum(len(entry["coords"]) for _, entry in run_many(args, device, trunk, files))
    sync(device)
    wall = time.perf_counter() - t0
    mem = peak_mb(device)
    print(
        f"  {n:,} cores, {tiles:,} tiles in {wall:.1f} s: {n / wall:.1f} cores/s, "
        f"{_si(tiles / wall)} tiles/s, peak {'-' if mem is None else f'{mem:,.0f}'} MB"
    )
    if n != PAPER_CORES:
        print(f"  {PAPER_CORES:,} cores at this rate: {PAPER_CORES * wall / n:.1f} s", end="")
    print(" (target < 120 s for 2,562 cores of 5468 px)")


# --------------------------------------------------------------------------- g. smoke checks


class Checks:
    """Smoke checks: each prints its figure and PASS / FAIL; failures set the exit status."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, name: str, ok: bool, detail: str) -> None:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        if not ok:
            self.failed.append(name)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def section_smoke(args, device: torch.device, paths: list[Path]) -> Checks:
    """g: the device path against the CPU, and one bf16 training step."""
    header(f"g. smoke checks on {device} (against the CPU float32 / numpy results)")
    checks = Checks()
    rule, data = rule_of(args), paths[0].read_bytes()
    cpu = torch.device("cpu")
    host_trunk = trunk_of(args, cpu, channels_last=True)
    dev_trunk = trunk_of(args, device, channels_last=True)
    pixels = decode_rgb(data)

    # the same pixels on both: coordinates identical, embeddings within tolerance
    rgb_cpu = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    a, coords_a = de.embed_decoded(host_trunk, rgb_cpu, "c", rule, None, device=cpu)
    b, coords_b = de.embed_decoded(
        dev_trunk, rgb_cpu.to(device), "c", rule, None, batch_size=args.batch, device=device
    )
    err = relative_error(b.cpu().numpy(), a.numpy())
    checks.check(
        "embed_decoded, same pixels",
        np.array_equal(coords_a, coords_b) and err <= args.embed_rtol,
        f"{len(coords_b)} tiles, coords identical: {np.array_equal(coords_a, coords_b)}, "
        f"relative error {err:.2e} (tolerance {args.embed_rtol:g})",
    )

    # from bytes: the device's own decoder (nvJPEG on CUDA)
    decoded = de.decode_core(data, device).permute(1, 2, 0).cpu().numpy()
    diff = np.abs(decoded.astype(int) - pixels)
    print(
        f"  note  decode_core vs Pillow: max {diff.max()} grey levels, "
        f"{(diff > 0).mean():.4%} of samples differ"
    )
    host = de.embed_core_on_device(host_trunk, data, "c", rule, None, device=cpu)
    dev = de.embed_core_on_device(
        dev_trunk, data, "c", rule, None, batch_size=args.batch, device=device
    )
    shared = sorted(set(map(tuple, host["coords"])) & set(map(tuple, dev["coords"])))
    union = set(map(tuple, host["coords"])) | set(map(tuple, dev["coords"]))
    pick = {tuple(c): i for i, c in enumerate(host["coords"])}
    pick_dev = {tuple(c): i for i, c in enumerate(dev["coords"])}
    err = relative_error(
        dev["embeddings"][[pick_dev[c] for c in shared]],
        host["embeddings"][[pick[c] for c in shared]],
    )
    checks.check(
        "embed_core_on_device from bytes",
        len(shared) >= 0.99 * len(union) and err <= args.embed_rtol,
        f"{len(shared)} of {len(union)} tiles shared, relative error {err:.2e}",
    )

    # stain normalisation against numpy
    expected = normalise(pixels, SOURCE, TARGET)
    got = de.normalise_tensor(rgb_cpu.to(device), SOURCE, TARGET).permute(1, 2, 0).cpu().numpy()
    diff = np.abs(got.astype(int) - expected)
    checks.check(
        "normalise_tensor vs numpy normalise",
        int(diff.max()) <= args.grey_tol,
        f"max {diff.max()} grey levels (tolerance {args.grey_tol}), "
        f"{(diff > 0).mean():.4%} of samples differ",
    )

    # one training step of the project's loop, bf16 on CUDA
    import pandas as pd

    from her2_kedro.modelling.bags import BagDataset

    rows = pd.DataFrame({"core_id": ["c"], "image": ["c.jpg"], "ihc_score": [2]})
    bag = BagDataset(
        rows,
        {"c.jpg": constant(data)},
        target="ihc_score",
        rule=rule,
        config=BagConfig(input_size=None, max_tiles=args.bag_tiles),
        train=True,
    )[0]
    model = mil_model(args, device)
    config = training_config(args)
    loss = train_epoch(model, [bag], adam(model, config), config, device)
    checks.check(
        f"one training step ({bf16_label(device)})",
        math.isfinite(loss),
        f"loss {loss:.4f} on a bag of {len(bag.tiles)} tiles",
    )
    return checks


# --------------------------------------------------------------------------- main


def versions(device: torch.device) -> None:
    import torchvision

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(
            f"GPU: {torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB, "
            f"compute capability {props.major}.{props.minor})"
        )
    else:
        print(f"device: CPU ({torch.get_num_threads()} torch threads)")
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else '-'}, "
        f"torchvision {torchvision.__version__}, {os.cpu_count()} CPUs; cuDNN TF32 "
        f"{torch.backends.cudnn.allow_tf32}, cuDNN benchmark {torch.backends.cudnn.benchmark}",
        flush=True,
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} unless set")
    parser.add_argument(
        "--encoder", default="resnet34", choices=["resnet18", "resnet34", "resnet50"]
    )
    parser.add_argument("--tile", type=int, default=224, help="tile side (px), the trunk's input")
    parser.add_argument("--batch", type=int, default=512, help="forward / embedding batch")
    parser.add_argument("--bag-tiles", type=int, default=576, help="tiles of the bags in b")
    parser.add_argument("--raw-bags", type=int, default=4, help="bags a timed step in b")
    parser.add_argument("--micro-batch", type=int, default=64, help="AttentionMIL micro_batch")
    parser.add_argument("--core-px", type=int, default=5468, help="side of the synthetic cores")
    parser.add_argument("--cores", type=int, default=4, help="distinct synthetic cores")
    parser.add_argument("--train-cores", type=int, default=24, help="cores an epoch in b")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(0, min(12, (os.cpu_count() or 1) - 2)),
        help="DataLoader workers in b",
    )
    parser.add_argument("--whole-core-px", type=int, default=1024)
    parser.add_argument("--whole-core-batch", type=int, default=32)
    parser.add_argument("--decode-batch", type=int, default=8, help="JPEGs a batched decode")
    parser.add_argument("--read-workers", type=int, default=4, help="reader threads in e, f")
    parser.add_argument("--embed-cores", type=int, default=32, help="cores a timed step in e")
    parser.add_argument("--cohort-cores", type=int, default=PAPER_CORES, help="cores in f")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the trunk in a and use it in e, f (default: on CUDA only)",
    )
    parser.add_argument("--embed-rtol", type=float, default=5e-2, help="relative error in g")
    parser.add_argument("--grey-tol", type=int, default=2, help="normalisation grey levels in g")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=list("bcdefg"),
        help="sections to leave out (a always runs)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    return args


def main() -> None:
    args = parse()
    start = time.perf_counter()
    device = torch.device(args.device)
    versions(device)
    torch.manual_seed(args.seed)
    print(
        f"settings: {args.encoder}, tiles {args.tile} px, batch {args.batch}, bags of "
        f"{args.bag_tiles} tiles, cores {args.core_px} px, warm-up {args.warmup}, repeats "
        f"{args.repeats}, compile {args.compile}{', QUICK run (not a measurement)' if args.quick else ''}"
    )
    print(f"  {'measurement':48s} {'rate':>7s} {'unit':8s} {'median':>12s} {'peak GPU':>12s}")
    with tempfile.TemporaryDirectory(prefix="her2_gpu_bench_") as tmp:
        paths = write_cores(Path(tmp), args)
        raw_rate, trunk = section_trunk(args, device)  # a: always (e and f use its trunk)
        if "b" not in args.skip:
            section_mil(args, device, paths)
        if "c" not in args.skip:
            section_whole_core(args, device)
        if "d" not in args.skip:
            section_decode(args, device, paths)
        if "e" not in args.skip:
            section_embedding(args, device, trunk, raw_rate, paths)
        if "f" not in args.skip:
            section_cohort(args, device, trunk, paths)
        checks = section_smoke(args, device, paths) if "g" not in args.skip else Checks()
    print(f"\ndone in {time.perf_counter() - start:.1f} s", end="")
    if checks.failed:
        print(f"; FAILED smoke checks: {', '.join(checks.failed)}")
        sys.exit(1)
    print("; every smoke check passed" if "g" not in args.skip else "")


if __name__ == "__main__":
    main()
