"""DaskRunner and map_cores on a local 2-worker dask.distributed cluster: the same results as the
sequential runner and the plain loop, with the work spread over both worker processes."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import pandas as pd
import pytest
import yaml
from kedro.framework.hooks import hook_impl
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline
from kedro.runner import SequentialRunner

from her2_kedro.parallel import map_cores, on_dask_worker, use_client
from her2_kedro.runners import DaskRunner
from her2_kedro.runners.dask_runner import local_cluster
from tests.conftest import PROJECT
from tests.test_session import TINY

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow

# The functions below travel to the workers by value: the workers need not import this module
# (torchmil's wheel ships another top-level ``tests`` package).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _warm_up() -> None:
    import kedro_datasets.pandas  # noqa: F401

    import her2_kedro.features.preprocess  # noqa: F401
    import her2_kedro.runners  # noqa: F401
    import her2_kedro.tma.ingest  # noqa: F401


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """A LocalCluster of two single-threaded worker processes, started in the project copy that
    the Dask run of the real pipelines uses (workers resolve relative paths there, as they would
    if started in the project root as Kedro's documentation says)."""
    root = tmp_path_factory.mktemp("dask") / "project"
    root.mkdir()
    here = os.getcwd()
    os.chdir(root)
    try:
        # LocalCluster(n_workers=2, threads_per_worker=1, processes=True), set up as the runner
        # starts its own (one BLAS thread per worker, glibc's adaptive malloc trimming)
        cluster = local_cluster(2, dashboard_address=None)
    finally:
        os.chdir(here)
    client = distributed.Client(cluster)
    client.run(_warm_up)  # imports once per worker, so that timings below measure the nodes
    pids = set(client.run(os.getpid).values())
    yield SimpleNamespace(cluster=cluster, client=client, root=root, pids=pids)
    client.close()
    cluster.close()


# -- (a) a tiny pipeline: memory hand-over, two independent branches, hooks, a failing node -----


def _log(folder: str, what: str, start: float) -> None:
    line = json.dumps({"what": what, "pid": os.getpid(), "start": start, "end": time.time()})
    with open(Path(folder) / f"{what}-{os.getpid()}-{time.time_ns()}.json", "w") as fh:
        fh.write(line)


def split(numbers: list[int]) -> tuple[list[int], list[int]]:
    time.sleep(0.3)  # a node that takes some time, like real ones (dask learns node durations)
    return [n for n in numbers if n % 2 == 0], [n for n in numbers if n % 2]


def branch_square(evens: list[int], folder: str) -> pd.DataFrame:
    start = time.time()
    time.sleep(0.6)  # long enough for the other branch to run at the same time
    _log(folder, "branch_square", start)
    return pd.DataFrame({"n": evens, "square": [n * n for n in evens]})


def branch_cube(odds: list[int], folder: str) -> dict[str, int]:
    start = time.time()
    time.sleep(0.6)
    _log(folder, "branch_cube", start)
    return {str(n): n**3 for n in odds}


def combine(squares: pd.DataFrame, cubes: dict[str, int]) -> dict[str, int]:
    return {"sum_squares": int(squares["square"].sum()), "sum_cubes": sum(cubes.values())}


def explode(numbers: list[int]) -> int:
    raise ValueError(f"cannot count {len(numbers)} numbers")


class RecordingHook:
    """Writes one file per node hook call: which node, in which process."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    @hook_impl
    def before_node_run(self, node):
        _log(self.folder, f"hook-{node.name}", time.time())


def _tiny_pipeline() -> Pipeline:
    return Pipeline(
        [
            Node(split, "numbers", ["evens", "odds"], name="split"),
            Node(branch_square, ["evens", "params:folder"], "squares", name="square"),
            Node(branch_cube, ["odds", "params:folder"], "cubes", name="cube"),
            Node(combine, ["squares", "cubes"], "summary", name="combine"),
        ]
    )


def _tiny_catalog(tmp: Path, folder: Path) -> DataCatalog:
    from kedro_datasets.pandas import ParquetDataset

    return DataCatalog(
        {
            "numbers": MemoryDataset(list(range(10))),
            "params:folder": MemoryDataset(str(folder)),
            # persisted between nodes: written by one worker, read by another
            "squares": ParquetDataset(filepath=str(tmp / "squares.parquet")),
        }
    )


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_tiny_pipeline_same_outputs_as_sequential_with_branches_side_by_side(two_workers, tmp_path):
    outputs = {}
    for name, runner in {
        "sequential": SequentialRunner(),
        "dask": DaskRunner(client=two_workers.client),
    }.items():
        folder = tmp_path / name / "log"
        folder.mkdir(parents=True)
        hooks = _create_hook_manager()
        hooks.register(RecordingHook(folder))
        catalog = _tiny_catalog(tmp_path / name, folder)
        result = runner.run(_tiny_pipeline(), catalog, hooks)
        outputs[name] = (
            result["summary"].load(),
            pd.read_parquet(tmp_path / name / "squares.parquet"),
            _records(folder),
        )
    (seq_summary, seq_squares, _), (summary, squares, records) = outputs.values()
    assert summary == seq_summary == {"sum_squares": 120, "sum_cubes": 1225}
    pd.testing.assert_frame_equal(squares, seq_squares)
    # node hooks fired on the workers, once per node
    hooked = {r["what"].removeprefix("hook-"): r["pid"] for r in records if "hook" in r["what"]}
    assert set(hooked) == {"split", "square", "cube", "combine"}
    assert set(hooked.values()) <= two_workers.pids
    # the independent branches ran on both workers at the same time
    square, cube = (
        next(r for r in records if r["what"] == w) for w in ("branch_square", "branch_cube")
    )
    assert {square["pid"], cube["pid"]} == two_workers.pids
    assert square["start"] < cube["end"] and cube["start"] < square["end"]


def test_failing_node_raises_its_error_naming_the_node(two_workers, tmp_path):
    pipeline = Pipeline(
        [
            Node(split, "numbers", ["evens", "odds"], name="split"),
            Node(explode, "evens", "count", name="count_the_evens"),
            Node(combine, ["count", "count"], "report", name="report_the_count"),  # never runs
        ]
    )
    catalog = DataCatalog({"numbers": MemoryDataset(list(range(10)))})
    with pytest.raises(ValueError, match="cannot count 5 numbers") as err:
        DaskRunner(client=two_workers.client).run(pipeline, catalog, _create_hook_manager())
    notes = "\n".join(getattr(err.value, "__notes__", []))
    assert "count_the_evens" in notes and "dask worker" in notes
    assert "report_the_count" not in notes


# -- (b) map_cores ------------------------------------------------------------------------------


def probe(i: int) -> tuple[int, int, str]:
    """The item's value, and the process and worker that computed it."""
    time.sleep(0.05)
    where = distributed.get_worker().address if on_dask_worker() else "local"
    return i * i, os.getpid(), where


def fail_on_three(i: int) -> int:
    if i == 3:
        raise KeyError(f"core {i}")
    return i


def map_from_a_worker(n: int) -> tuple[list, int]:
    """A node's view: map_cores called inside a worker task (it secedes while it waits)."""
    return map_cores(probe, range(n), desc="probing cores"), os.getpid()


def test_map_cores_same_results_in_order_spread_over_both_workers(two_workers):
    loop = map_cores(probe, range(10), desc="probing cores")
    assert [r[0] for r in loop] == [i * i for i in range(10)]
    assert {r[2] for r in loop} == {"local"}

    with use_client(two_workers.client):
        from_driver = map_cores(probe, range(10), desc="probing cores")
    from_worker, caller = two_workers.client.submit(map_from_a_worker, 10, pure=False).result()
    for results in (from_driver, from_worker):
        assert [r[0] for r in results] == [r[0] for r in loop]  # same values, same order
        assert {r[1] for r in results} == two_workers.pids  # both worker processes took items
        assert len({r[2] for r in results}) == 2
    assert caller in two_workers.pids


def test_map_cores_raises_the_items_error_on_the_cluster_as_in_the_loop(two_workers):
    with pytest.raises(KeyError, match="core 3"):
        map_cores(fail_on_three, range(6), desc="checking cores")
    with use_client(two_workers.client), pytest.raises(KeyError, match="core 3") as err:
        map_cores(fail_on_three, range(6), desc="checking cores")
    assert "checking cores" in "\n".join(err.value.__notes__)


# -- (c) the project's pipelines on a tiny cohort: SequentialRunner vs DaskRunner ----------------


def _project_copy(root: Path) -> Path:
    """As tests/test_session.py's ``project`` fixture: the configuration, TINY in conf/local."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT / "pyproject.toml", root)
    shutil.copy(PROJECT / ".telemetry", root)
    shutil.copytree(PROJECT / "conf", root / "conf")
    (root / "src").mkdir()
    (root / "conf" / "local").mkdir(exist_ok=True)
    (root / "conf" / "local" / "parameters_tiny.yml").write_text(yaml.safe_dump(TINY))
    # each copy its own store by absolute path: MLflow caches a store (and its open SQLite
    # connections) per URI, so one relative URI would mix two copies run in one process
    mlflow_yml = yaml.safe_load((PROJECT / "conf" / "base" / "mlflow.yml").read_text())
    mlflow_yml["server"]["mlflow_tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    (root / "conf" / "local" / "mlflow.yml").write_text(yaml.safe_dump(mlflow_yml))
    return root


RUN_COLUMNS = ("run_id", "manifest_version")
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}\.\d{2}\.\d{2}\.\d{3}Z$")


def _tree(data: Path) -> dict[str, Path]:
    """Files under ``data`` by their path with catalog version folders written as <version>."""
    return {
        "/".join(
            "<version>" if _VERSION.match(part) else part for part in p.relative_to(data).parts
        ): p
        for p in sorted(data.rglob("*"))
        if p.is_file()
    }


def _close(a, b) -> bool:
    """Equal, floats to 1e-9 relative."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _same(a: Path, b: Path) -> bool:
    """Byte for byte (tables: exactly the same frames); JSON floats to 1e-9.

    The one inexact file is reference_stains.json: its Macenko stain vectors come from an SVD
    and eigenvectors over pooled tiles, and OpenBLAS sums in another order with one thread (each
    dask worker: dask's nanny sets OPENBLAS_NUM_THREADS=1) than with two (this process), which
    moves their last ~3 of 16 digits. The same happens between two sequential runs with other
    OPENBLAS_NUM_THREADS; nothing downstream changes (normalised pixels are rounded to uint8).
    """
    if a.suffix in (".parquet", ".csv"):
        read = pd.read_parquet if a.suffix == ".parquet" else pd.read_csv
        # rows of a study record the run and manifest version they came from
        ours = [c for c in RUN_COLUMNS if c in read(a).columns]
        pd.testing.assert_frame_equal(
            read(a).drop(columns=ours), read(b).drop(columns=ours), check_exact=True
        )
        return True
    if a.suffix == ".json":
        return _close(json.loads(a.read_text()), json.loads(b.read_text()))
    return a.read_bytes() == b.read_bytes()


def _mlflow_run(root: Path):
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("her2_kedro")
    [run] = client.search_runs([experiment.experiment_id])  # `synthetic` is not tracked
    assert run.info.status == "FINISHED"
    return run


def _end_mlflow_runs() -> None:
    """What the end of a ``kedro run`` process does: kedro-mlflow leaves the pipeline's run on
    the (sequential) runner thread's stack once per node; the next session must not inherit it."""
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_project_pipelines_give_the_same_outputs_under_dask(two_workers, tmp_path, monkeypatch):
    """``synthetic``, then ``intensity`` (= ingestion + preprocessing + the intensity study, whose
    metrics kedro-mlflow records), in one copy of the project with the SequentialRunner and in
    another with the DaskRunner on the two workers: the same files, the same MLflow record."""
    from kedro.framework.cli.project import run as kedro_run

    seq = _project_copy(tmp_path / "sequential")
    on_dask = _project_copy(two_workers.root)
    for pipelines in ("synthetic", "intensity"):
        # sequential, as `kedro run --pipelines=...` does by default
        monkeypatch.chdir(seq)
        bootstrap_project(seq)
        with KedroSession.create(project_path=seq) as session:
            session.run(pipeline_names=[pipelines], runner=SequentialRunner())
        _end_mlflow_runs()
        # the same command with the DaskRunner against the running scheduler, as a user types it
        monkeypatch.chdir(on_dask)
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", two_workers.cluster.scheduler_address)
        bootstrap_project(on_dask)
        kedro_run.main(
            ["--runner=her2_kedro.runners.DaskRunner", f"--pipelines={pipelines}"],
            standalone_mode=False,
        )
        _end_mlflow_runs()

    expected, got = _tree(seq / "data"), _tree(on_dask / "data")
    assert set(got) == set(expected)
    for must in (
        "02_intermediate/qc_report.csv",
        "02_intermediate/core_manifest.parquet/<version>/core_manifest.parquet",
        "04_feature/tile_index.parquet",
        "04_feature/intensity_features.parquet",
        "04_feature/reference_stains.json/<version>/reference_stains.json",
        "07_model_output/predictions.parquet",
        "08_reporting/metrics.csv",
    ):
        assert must in expected
    assert sum(name.startswith("02_intermediate/cores/") for name in expected) > 20
    different = [name for name in expected if not _same(expected[name], got[name])]
    assert different == []
    # kedro-mlflow recorded the parameters of the nodes that ran on the workers, and the metrics
    # they saved there, in the run the driver opened
    tracked, sequential = _mlflow_run(on_dask), _mlflow_run(seq)
    assert tracked.data.params == sequential.data.params
    assert "preprocessing.stain_normalisation.max_reference_cores" in tracked.data.params
    assert tracked.data.metrics == sequential.data.metrics
    assert "intensity.her2_status.test.balanced_accuracy" in tracked.data.metrics
    # nodes on the workers saw that run, and the project's hook saw the manifest's version
    metrics = pd.read_csv(on_dask / "data" / "08_reporting" / "metrics.csv")
    (version,) = [
        p.name for p in (on_dask / "data/02_intermediate/core_manifest.parquet").iterdir()
    ]
    assert set(metrics["run_id"]) == {tracked.info.run_id}
    assert set(metrics["manifest_version"]) == {version}
