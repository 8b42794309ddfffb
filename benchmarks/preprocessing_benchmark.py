"""Preprocessing benchmark on the five real cores (../shared/data/real_cores): prints, asserts nothing.

1. The project against the paper's own way, both run in one go as fresh processes, interleaved:
   - project: ``kedro run --pipelines=preprocessing`` (Kedro and kedro-mlflow start-up included) in a
     temporary copy of the project whose data folder was filled by ``kedro run
     --pipelines=ingestion`` from the real cores;
   - paper: a Python process that decodes each core with PIL, runs skimage's ``rgb2hed`` in float64
     on the whole core, keeps 224 px tiles by the tile rule and takes the maximum tile mean DAB.
   Wall time of each process, the ratio project / paper per round, peak RSS of each (``wait4``).
2. Per-node breakdown of one more project run (a KedroSession with a timing hook), cores/s.
3. The cost of checking each core's ``content_hash`` (SHA-256 of the decoded pixels) against the time
   to decode it.
4. Leave-one-out intensity-LR on max-mean-DAB (five cores only show that the path works).

Timings on a shared 2-core machine are noisy: compare the ratio of one round, not absolute figures
across runs. Run: .venv/bin/python benchmarks/preprocessing_benchmark.py [--rounds 2] [--workers N] [--copies K]
(``--copies 1..3`` adds rotated, re-encoded copies of each real core: 10-20 real cores, over which
Kedro's fixed start-up of several seconds weighs less than over five.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REAL_CORES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_cores"


def _env() -> dict[str, str]:
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def _timed(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, out


def _kedro() -> list[str]:
    script = Path(sys.executable).with_name("kedro")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kedro"]


def _rotated_copies(cores: Path, labels: Path, copies: int) -> None:
    """Add ``copies`` rotations (90, 180, 270 degrees; JPEG q95 4:4:4) of each real core as new cores."""
    import pandas as pd
    from PIL import Image

    table = pd.read_csv(labels)
    extra = []
    turns = [Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270]
    for row in table.to_dict("records"):
        with Image.open(cores / row["filename"]) as image:
            for k in range(copies):
                name = f"rot{90 * (k + 1)}_{row['filename']}"
                image.transpose(turns[k]).save(cores / name, quality=95, subsampling=0)
                extra.append({**row, "filename": name})
    pd.concat([table, pd.DataFrame(extra)], ignore_index=True).to_csv(labels, index=False)


def make_project(where: Path, workers: int | None, copies: int = 0) -> Path:
    """A copy of the project's configuration with the real cores as raw input, ingested."""
    root = where / "project"
    root.mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(ROOT / name, root)
    shutil.copytree(ROOT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    if workers is not None:
        (root / "conf" / "local" / "parameters_bench.yml").write_text(
            f"preprocessing:\n  workers: {workers}\n"
        )
    (root / "src").mkdir()
    cores = root / "data" / "01_raw" / "cores"
    cores.mkdir(parents=True)
    for path in sorted(REAL_CORES.glob("*.jpg")):
        shutil.copy(path, cores / path.name)
    shutil.copy(REAL_CORES / "labels.csv", root / "data" / "01_raw" / "labels.csv")
    if copies:
        _rotated_copies(cores, root / "data" / "01_raw" / "labels.csv", copies)
    seconds, _, _ = _timed([*_kedro(), "run", "--pipelines=ingestion"], root)
    print(f"ingestion of the real cores (set-up, not compared): {seconds:.1f} s")
    return root


# --------------------------------------------------------------------------- children


def paper_reference(folder: Path) -> list[float]:
    """The paper's way: PIL decode, rgb2hed float64 on the whole core, max tile mean DAB."""
    import numpy as np
    from PIL import Image
    from skimage.color import rgb2hed

    out = []
    for path in sorted(folder.glob("*.jpg")):
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        dab = rgb2hed(rgb)[..., 2]
        grey = rgb @ np.array([0.2989, 0.587, 0.114])
        n_y, n_x = rgb.shape[0] // 224, rgb.shape[1] // 224
        crop = (slice(0, n_y * 224), slice(0, n_x * 224))
        tissue = (grey[crop] <= 220).reshape(n_y, 224, n_x, 224).mean(axis=(1, 3))
        means = dab[crop].reshape(n_y, 224, n_x, 224).mean(axis=(1, 3))
        out.append(float(means[tissue > 0.05].max()))
    return out


def node_timings(root: Path) -> dict[str, float]:
    """One preprocessing run through a KedroSession with a hook timing every node."""
    from kedro.framework.hooks import hook_impl
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    class Timer:
        def __init__(self) -> None:
            self.start: dict[str, float] = {}
            self.seconds: dict[str, float] = {}

        @hook_impl
        def before_node_run(self, node) -> None:
            self.start[node.name] = time.perf_counter()

        @hook_impl
        def after_node_run(self, node) -> None:
            self.seconds[node.name] = time.perf_counter() - self.start[node.name]

    timer = Timer()
    bootstrap_project(root)
    with KedroSession.create(project_path=root) as session:
        session._hook_manager.register(timer)
        session.run(pipeline_names=["preprocessing"])
    return timer.seconds


def hash_cost(folder: Path) -> dict[str, float]:
    """Seconds to decode each core, and to hash its decoded pixels (content_hash)."""
    from her2_kedro.features.preprocess import decode_rgb
    from her2_kedro.imaging.pixels import content_hash

    decode = hashing = 0.0
    for path in sorted(folder.glob("*.jpg")):
        data = path.read_bytes()
        t0 = time.perf_counter()
        rgb = decode_rgb(data)
        t1 = time.perf_counter()
        content_hash(rgb)
        hashing += time.perf_counter() - t1
        decode += t1 - t0
    return {"decode_s": decode, "hash_s": hashing, "n": len(list(folder.glob("*.jpg")))}


def _child(mode: str, arg: str) -> None:
    if mode == "paper":
        print(json.dumps(paper_reference(Path(arg))))
    elif mode == "nodes":
        print(json.dumps(node_timings(Path(arg))))
    elif mode == "hash":
        print(json.dumps(hash_cost(Path(arg))))


def _last_json(out: str):
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def leave_one_out(features, labels) -> dict[str, float]:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = features["max_mean_dab"].to_numpy().reshape(-1, 1)
    out = {}
    for task, column in (("her2_status", "her2-status"), ("ihc_score", "ihc-score")):
        y = labels[column].to_numpy()
        predicted = []
        for i in range(len(y)):
            train = np.arange(len(y)) != i
            model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
            model.fit(x[train], y[train])
            predicted.append(model.predict(x[i : i + 1])[0])
        out[task] = balanced_accuracy_score(y, predicted)
    return out


def compare(root: Path, rounds: int) -> None:
    import numpy as np

    cores = root / "data" / "01_raw" / "cores"
    n = len(list(cores.glob("*.jpg")))
    paper_cmd = [sys.executable, __file__, "--child", "paper", str(cores)]
    kedro_cmd = [*_kedro(), "run", "--pipelines=preprocessing"]
    ratios, project_s, paper_s = [], [], []
    for r in range(rounds):
        pairs = [("paper", paper_cmd), ("project", kedro_cmd)]
        if r % 2:
            pairs.reverse()  # alternate the order so neither side always runs first
        got = {}
        for name, cmd in pairs:
            got[name] = _timed(cmd, root if name == "project" else ROOT)
        ratios.append(got["project"][0] / got["paper"][0])
        project_s.append(got["project"][0])
        paper_s.append(got["paper"][0])
        print(
            f"round {r + 1}: project {got['project'][0]:.1f} s (peak RSS "
            f"{got['project'][1]:.0f} MB), paper-style {got['paper'][0]:.1f} s (peak RSS "
            f"{got['paper'][1]:.0f} MB): ratio {ratios[-1]:.2f}"
        )
        paper_values = _last_json(got["paper"][2])
    print(
        f"ratio project / paper-style (Kedro start-up included): median {np.median(ratios):.2f} "
        f"over {rounds} round(s); {n / np.median(project_s):.2f} cores/s end to end"
    )
    import pandas as pd

    features = pd.read_parquet(root / "data" / "04_feature" / "intensity_features.parquet")
    manifest_dir = root / "data" / "02_intermediate" / "core_manifest.parquet"
    manifest = pd.read_parquet(sorted(manifest_dir.iterdir())[-1] / "core_manifest.parquet")
    mine = features.merge(manifest[["core_id", "filename"]], on="core_id").sort_values("filename")
    if len(mine) != n:
        raise RuntimeError(f"ingestion accepted {len(mine)} of {n} cores: see the QC report")
    diff = np.abs(mine["max_mean_dab"].to_numpy() - np.asarray(paper_values)).max()
    print(f"largest max-mean-DAB difference project vs paper-style: {diff:.2e}")


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="preprocessing.workers")
    parser.add_argument(
        "--copies",
        type=int,
        default=0,
        choices=[0, 1, 2, 3],
        help="add 1-3 rotated re-encodings of each real core (a larger real cohort)",
    )
    args = parser.parse_args()
    if not (REAL_CORES / "labels.csv").is_file():
        print(f"skipped: {REAL_CORES} not available")
        return
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="her2_prep_bench_") as tmp:
        root = make_project(Path(tmp), args.workers, args.copies)
        compare(root, args.rounds)
        seconds, rss, out = _timed([sys.executable, __file__, "--child", "nodes", str(root)], ROOT)
        nodes = _last_json(out)
        n = len(list((root / "data" / "01_raw" / "cores").glob("*.jpg")))
        print(f"per node (one KedroSession run, {seconds:.1f} s in all, peak RSS {rss:.0f} MB):")
        for name, s in nodes.items():
            print(f"  {name:32s} {s:6.2f} s")
        measure = nodes.get("tile_and_measure_cores")
        if measure:
            print(f"  tile_and_measure_cores: {n / measure:.2f} cores/s")
        _, _, out = _timed([sys.executable, __file__, "--child", "hash", str(REAL_CORES)], ROOT)
        cost = _last_json(out)
        print(
            f"content_hash check: {cost['hash_s']:.2f} s for {cost['n']} cores against "
            f"{cost['decode_s']:.2f} s to decode them ({cost['hash_s'] / cost['decode_s']:.0%})"
        )
        if args.copies:
            return
        labels = pd.read_csv(REAL_CORES / "labels.csv")
        features = pd.read_parquet(root / "data" / "04_feature" / "intensity_features.parquet")
        manifest_dir = root / "data" / "02_intermediate" / "core_manifest.parquet"
        manifest = pd.read_parquet(sorted(manifest_dir.iterdir())[-1] / "core_manifest.parquet")
        features = features.merge(manifest[["core_id", "filename"]], on="core_id")
        features = labels[["filename"]].merge(features, on="filename")
        for row, label in zip(
            features.itertuples(index=False), labels.itertuples(index=False), strict=True
        ):
            print(
                f"  {row.filename[:12]}  score {label[1]} status {label[2]}  "
                f"max_mean_dab {row.max_mean_dab:.4f}"
            )
        loo = leave_one_out(features, labels)
        print(
            f"  leave-one-out intensity LR (max_mean_dab): HER2 status balanced accuracy "
            f"{loo['her2_status']:.3f}, IHC score {loo['ihc_score']:.3f}"
        )


if __name__ == "__main__":
    main()
