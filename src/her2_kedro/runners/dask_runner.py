"""``DaskRunner``: run a Kedro pipeline's nodes as tasks on a ``dask.distributed`` cluster.

Kedro's documented route to Dask ("Distributed deployment with Dask"): a custom runner that
submits one task per node, with the upstream nodes' tasks as dependencies, so the scheduler runs
nodes in dependency order and independent nodes at the same time. This one is written for
Kedro 1.7's runner API (``AbstractRunner._run(pipeline, catalog, hook_manager, run_id)`` and
``kedro.runner.task.Task``) and differs from the documentation's sketch where a real project
needs it:

* **Where the cluster comes from.** ``address`` (``--runner-params=address=tcp://host:8786``),
  else the ``DASK_SCHEDULER_ADDRESS`` environment variable (the variable dask's own configuration
  reads as ``scheduler-address``), else a ``LocalCluster`` started for the run and closed after
  it: ``n_workers`` worker processes (``--runner-params=n_workers=4``, else the
  ``HER2_DASK_WORKERS`` environment variable, else ``os.cpu_count()``), one thread and one BLAS
  thread each (see :func:`local_cluster`). An existing ``distributed.Client`` can be passed as
  ``client`` (it is left open).
* **Scheduling.** All node tasks are submitted at once; each waits for its upstream nodes. Dask
  runs a node next to its in-memory inputs when it can, and moves waiting nodes to idle workers
  (work stealing) from the durations it has seen: node tasks share the key prefix
  ``kedro-node`` (keys ``kedro-node-<run token>-<node name>``, shown on the dashboard), so the
  first finished node teaches the scheduler what a node costs. What every node task needs (the
  pickled catalog and hooks) is replicated to every worker once per run, so that it does not
  draw every node to the worker holding it. A node whose worker dies is run again elsewhere
  (dask's ``allowed-failures``), so its persisted outputs may be written twice.
* **Data between nodes.** A dataset that the catalog holds in memory (``MemoryDataset``, e.g. the
  ingestion's ``*_payloads``) and that a node of the pipeline produces stays on the worker that
  produced it, as a Dask future; the consuming node's task takes it as an argument, so the
  scheduler moves it worker to worker (or not at all when both run on the same worker). The
  driver holds futures only; it fetches the data of free outputs (memory outputs no node
  consumes) at the end, so ``runner.run`` returns what ``SequentialRunner`` returns. The
  ``copy_mode`` of each memory dataset is applied as in a sequential run (a copy on save and on
  load; ``assign``: none).
* **Persisted datasets** are loaded and saved by the worker that runs the node, through its own
  copy of the run's catalog. Every worker must therefore see the same files at the same paths:
  on one machine (a ``LocalCluster``) that is given; on several machines the catalog must point
  at shared storage, i.e. fsspec URLs (``s3://``, ``gcs://``, ``abfs://``) or a filesystem mounted
  at the same path everywhere (the project's own datasets use local paths: mount ``data/``).
  Kedro makes ``filepath``/``path`` entries absolute; other relative paths (the synthetic
  cohort's ``root``) resolve against the worker's working directory, so start workers in the
  project root, as Kedro's documentation says (the runner warns when a worker's working
  directory differs from the driver's). The MLflow tracking store must be shared as well: a
  relative ``sqlite:///mlflow.db`` is made absolute against the driver's working directory,
  which serves a ``LocalCluster``; several machines want an MLflow tracking server
  (``http://...``) in ``conf/<env>/mlflow.yml``.
* **Hooks.** Pipeline-level hooks (``after_context_created``, ``after_catalog_created``,
  ``before_pipeline_run``, ``after_pipeline_run``, ``on_pipeline_error``) fire on the driver,
  in the session, as with any runner. Node- and dataset-level hooks (``before_node_run``,
  ``after_node_run``, ``on_node_error``, ``before/after_dataset_loaded``,
  ``before/after_dataset_saved``) fire on the worker that runs the node, in the same order as in
  a sequential run. The driver's registered plugin instances that implement any of them are
  pickled after ``before_pipeline_run`` (with the catalog, in one pickle, so a hook that kept the
  catalog from ``after_catalog_created`` sees the node's own catalog) and each node task
  registers its own copy of them. So stateful hooks keep what they learnt on the driver:
  kedro-mlflow's hook knows the run it started, reopens it on the worker and logs each node's
  ``params:`` inputs there, and metrics or artifact datasets saved by the node go to that run
  (the worker is pointed at the driver's tracking URI). What a hook records on a worker stays
  in that task's copy: a hook that accumulates node or dataset events and reports them in
  ``after_pipeline_run`` reports nothing from the workers (kedro-viz's dataset statistics; its
  run-status hook switches itself off for non-sequential runners anyway). A plugin that cannot be
  pickled is left out on the workers, with a warning naming it.
* **Errors.** A node that raises fails the run with its own exception (same type and message,
  the worker's traceback), with a note naming the node and the worker; tasks not yet started are
  cancelled and Kedro's "resume from" suggestion is logged.
* **Per-core work inside nodes.** During the run the client is registered with
  :func:`her2_kedro.parallel.use_client`, and nodes that call :func:`her2_kedro.parallel.map_cores`
  fan their cores out to the whole cluster from the worker they run on.

Node logs are printed by the workers (a ``LocalCluster``'s workers print to the terminal that
started the run); the driver logs each node's completion with the worker that ran it. Run one
Kedro project per cluster at a time: a node task configures the worker process for its project
(``configure_project``, the MLflow tracking URI).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pickle
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cloudpickle
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import MemoryDataset
from kedro.runner import AbstractRunner
from kedro.runner.task import Task
from pluggy import PluginManager

from her2_kedro.parallel import use_client

if TYPE_CHECKING:
    from kedro.io import CatalogProtocol
    from kedro.pipeline import Pipeline
    from kedro.pipeline.node import Node

__all__ = ["WORKERS_ENV", "DaskRunner", "local_cluster"]

#: Environment variable with the number of workers of the LocalCluster started when no scheduler
#: address is given (default: the CPU count).
WORKERS_ENV = "HER2_DASK_WORKERS"

#: Hook specifications that fire around one node; only plugins implementing one travel to workers.
NODE_HOOKS = frozenset(
    {
        "before_node_run",
        "after_node_run",
        "on_node_error",
        "before_dataset_loaded",
        "after_dataset_loaded",
        "before_dataset_saved",
        "after_dataset_saved",
    }
)

logger = logging.getLogger(__name__)


@dataclass
class _RunState:
    """What every node task of a run needs, pickled once on the driver (one copy per task)."""

    catalog: Any
    plugins: list[tuple[str, Any]] = field(default_factory=list)
    run_id: str | None = None
    is_async: bool = False
    package_name: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_registry_uri: str | None = None


class DaskRunner(AbstractRunner):
    """Runs nodes as tasks on a ``dask.distributed`` cluster (see the module docstring).

    ``kedro run --runner=her2_kedro.runners.DaskRunner --pipelines=ingestion,preprocessing``
    starts a LocalCluster of ``HER2_DASK_WORKERS`` (default: CPU count) single-threaded worker
    processes for the run; with ``DASK_SCHEDULER_ADDRESS=tcp://host:8786`` in the environment, or
    ``--runner-params=address=tcp://host:8786``, it runs on that existing cluster instead.
    """

    def __init__(
        self,
        is_async: bool = False,
        address: str | None = None,
        n_workers: int | None = None,
        client: Any = None,
    ):
        """
        Args:
            is_async: load and save each node's inputs and outputs on threads (Kedro's option).
            address: scheduler address; default ``DASK_SCHEDULER_ADDRESS`` (dask's
                ``scheduler-address`` configuration), else a LocalCluster for the run.
            n_workers: worker processes of that LocalCluster; default ``HER2_DASK_WORKERS``,
                else ``os.cpu_count()``.
            client: an already connected ``distributed.Client`` to use (not closed by the run).
        """
        super().__init__(is_async=is_async)
        self._address = address
        self._n_workers = int(n_workers) if n_workers else None
        self._client = client

    def __repr__(self) -> str:  # Kedro records it as the run's ``runner`` (an MLflow tag)
        where = self._address or os.environ.get("DASK_SCHEDULER_ADDRESS") or "local cluster"
        return f"DaskRunner({where})"

    def _get_executor(self, max_workers: int) -> None:
        return None  # the cluster is the executor

    # -- connection ------------------------------------------------------------------------

    def _scheduler_address(self) -> str | None:
        if self._address:
            return str(self._address)
        if os.environ.get("DASK_SCHEDULER_ADDRESS"):
            return os.environ["DASK_SCHEDULER_ADDRESS"]
        import dask

        return dask.config.get("scheduler-address", None)

    def _local_workers(self) -> int:
        if self._n_workers:
            return self._n_workers
        if os.environ.get(WORKERS_ENV):
            return int(os.environ[WORKERS_ENV])
        return os.cpu_count() or 1

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Any]:
        from distributed import Client

        if self._client is not None:
            yield self._client
            return
        address = self._scheduler_address()
        if address:
            with Client(address) as client:
                n = len(client.scheduler_info(n_workers=-1).get("workers", {}))
                self._logger.info("DaskRunner: scheduler %s, %d workers.", address, n)
                yield client
            return
        n = self._local_workers()
        dashboard = ":0" if importlib.util.find_spec("bokeh") else None
        with (
            local_cluster(n, dashboard_address=dashboard) as cluster,
            Client(cluster) as client,
        ):
            self._logger.info(
                "DaskRunner: local cluster of %d worker processes at %s%s.",
                n,
                cluster.scheduler_address,
                f" (dashboard {client.dashboard_link})" if dashboard else "",
            )
            yield client

    # -- the run ---------------------------------------------------------------------------

    def _run(
        self,
        pipeline: Pipeline,
        catalog: CatalogProtocol,
        hook_manager: PluginManager | None = None,
        run_id: str | None = None,
    ) -> None:
        with self._connect() as client, use_client(client):
            self._warn_about_working_directories(client)
            self._run_on(client, pipeline, catalog, hook_manager, run_id)

    def _warn_about_working_directories(self, client: Any) -> None:
        here = os.getcwd()
        try:
            elsewhere = {a: d for a, d in client.run(os.getcwd).items() if d != here}
        except Exception as err:  # pragma: no cover - informative only
            self._logger.debug("Could not ask the workers for their directories: %s", err)
            return
        if elsewhere:
            self._logger.warning(
                "DaskRunner: %d worker(s) run in another directory than this one (%s), e.g. %s: "
                "relative paths that Kedro does not make absolute resolve there.",
                len(elsewhere),
                here,
                next(iter(elsewhere.values())),
            )

    def _run_on(
        self,
        client: Any,
        pipeline: Pipeline,
        catalog: CatalogProtocol,
        hook_manager: PluginManager | None,
        run_id: str | None,
    ) -> None:
        nodes = pipeline.nodes  # topologically sorted
        produced = set(chain.from_iterable(n.outputs for n in nodes))
        in_memory = {name for name in produced if _is_memory(catalog, name)}
        state = _RunState(
            catalog=catalog,
            plugins=self._shippable_plugins(hook_manager),
            run_id=run_id,
            is_async=self._is_async,
            package_name=_package_name(),
            **_mlflow_uris(),
        )
        token = uuid.uuid4().hex[:8]
        # on every worker: a dependency held by one worker would draw every node task to it
        [shared] = client.scatter([cloudpickle.dumps(state)], broadcast=True, hash=False)

        done: dict[Node, Any] = {}  # node → small summary future (also the ordering edge)
        data: dict[str, Any] = {}  # in-memory dataset → future of its data on a worker
        for node in nodes:
            outputs = [o for o in node.outputs if o in in_memory]
            result = client.submit(
                _run_node,
                shared,
                cloudpickle.dumps(node),
                {name: data[name] for name in node.inputs if name in data},
                [done[n] for n in pipeline.node_dependencies[node]],
                outputs,
                key=f"kedro-node-{token}-{_key(node.name)}",
                pure=False,
            )
            done[node] = client.submit(
                _summary, result, key=f"kedro-done-{token}-{_key(node.name)}", pure=False
            )
            for name in outputs:
                data[name] = client.submit(
                    _pick, result, name, key=f"kedro-data-{token}-{_key(name)}", pure=False
                )
        free = {name: data[name] for name in pipeline.outputs() if name in data}
        data.clear()  # consumers hold their inputs: dask frees each once they are done

        node_of = {f.key: n for n, f in done.items()}
        load_counts = Counter(chain.from_iterable(n.inputs for n in nodes))
        finished: set[Node] = set()
        from distributed import as_completed

        for future in as_completed(list(done.values())):
            node = node_of[future.key]
            if future.status != "finished":
                self._fail(client, future, done, pipeline, finished, catalog)
            worker, seconds = future.result()
            finished.add(node)
            self._logger.info("Completed node: %s (on %s, %.1f s)", node.name, worker, seconds)
            self._logger.info("Completed %d out of %d tasks", len(finished), len(nodes))
            self._release_datasets(node, catalog, load_counts, pipeline)
        for name, future in free.items():
            catalog.save(name, future.result())

    def _fail(
        self,
        client: Any,
        future: Any,
        done: dict[Node, Any],
        pipeline: Pipeline,
        finished: set[Node],
        catalog: CatalogProtocol,
    ) -> None:
        """Cancel what has not started, suggest where to resume, raise the node's own error.

        The nodes downstream of a failed node fail with its exception too; the one named in the
        log is the first, in topological order, whose upstream nodes all finished.
        """
        client.cancel([f for f in done.values() if not f.done()])
        exc = future.exception()
        failed = next(
            (
                n
                for n in pipeline.nodes
                if done[n].status == "error"
                and all(done[u].status == "finished" for u in pipeline.node_dependencies[n])
            ),
            None,
        )
        self._logger.error(
            "DaskRunner: node %s failed: %s: %s",
            failed.name if failed else "?",
            type(exc).__name__,
            exc,
        )
        self._suggest_resume_scenario(pipeline, finished, catalog)
        if isinstance(exc, BaseException):
            raise exc.with_traceback(future.traceback())
        raise RuntimeError(f"DaskRunner: a node task ended as {future.status}: {exc!r}")

    def _shippable_plugins(self, hook_manager: PluginManager | None) -> list[tuple[str, Any]]:
        """The registered plugins with node or dataset hooks that survive a pickle round trip."""
        if not isinstance(hook_manager, PluginManager):
            return []
        shipped = []
        for name, plugin in hook_manager.list_name_plugin():
            if plugin is None or not any(hasattr(plugin, h) for h in NODE_HOOKS):
                continue
            try:
                cloudpickle.dumps(plugin)
            except Exception as err:
                self._logger.warning(
                    "DaskRunner: hook %s (%s) cannot be pickled (%s): its node and dataset hooks "
                    "will not fire on the workers.",
                    name,
                    type(plugin).__qualname__,
                    err,
                )
                continue
            shipped.append((name, plugin))
        return shipped


# -- driver-side helpers -------------------------------------------------------------------


def local_cluster(n_workers: int, **kwargs: Any) -> Any:
    """``distributed.LocalCluster(n_workers, threads_per_worker=1, processes=True, **kwargs)``,
    as the runner starts it when no scheduler address is given.

    One thread per worker process, and dask's one BLAS/OpenMP thread per worker (its
    ``distributed.nanny.pre-spawn-environ``), so that ``n_workers`` processes use ``n_workers``
    cores. Dask's default ``MALLOC_TRIM_THRESHOLD_=65536`` in that environment is dropped (unless
    configured otherwise or set in the environment): it turns off glibc's adaptive mmap threshold,
    so every large image array is mapped and unmapped anew, which made the synthetic cohort's
    rendering 2.8x slower (10 s to 28 s on 2 cores). The nannies write their pre-spawn variables
    into this process's ``os.environ``; they are restored once the workers have started, so that
    later subprocesses of the driver keep the user's environment.
    """
    import dask
    from distributed import LocalCluster

    key = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    overrides = {key: None} if dask.config.get(key, None) == 65536 else {}
    kwargs = {"threads_per_worker": 1, "processes": True, **kwargs}
    before = dict(os.environ)
    try:
        with dask.config.set(overrides):
            return LocalCluster(n_workers=n_workers, **kwargs)
    finally:
        os.environ.clear()
        os.environ.update(before)


def _is_memory(catalog: CatalogProtocol, name: str) -> bool:
    try:
        dataset = catalog.get(name, fallback_to_runtime_pattern=True)
    except TypeError:  # pragma: no cover - a catalog without runtime patterns
        dataset = catalog.get(name)
    return isinstance(dataset, MemoryDataset)


def _key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _package_name() -> str | None:
    from kedro.framework.project import PACKAGE_NAME

    return PACKAGE_NAME


def _mlflow_uris() -> dict[str, str | None]:
    """The driver's MLflow tracking and registry URIs, relative SQLite paths made absolute.

    Only when MLflow is in use on the driver (imported, e.g. by kedro-mlflow's hooks).
    """
    import sys

    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return {}

    def absolute(uri: str | None) -> str | None:
        prefix = "sqlite:///"
        if uri and uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            return prefix + str(Path.cwd() / uri.removeprefix(prefix))
        return uri

    tracking = absolute(mlflow.get_tracking_uri())
    try:
        registry = absolute(mlflow.get_registry_uri())
    except Exception:  # pragma: no cover
        registry = None
    if tracking and tracking.startswith("sqlite:"):
        # create the store's tables here, once: workers opening a missing SQLite store at the
        # same moment would race to create them
        try:
            mlflow.tracking.MlflowClient(tracking_uri=tracking)
        except Exception as err:  # pragma: no cover - the nodes' own calls will say more
            logger.warning("DaskRunner: MLflow store %s could not be opened: %s", tracking, err)
    return {"mlflow_tracking_uri": tracking, "mlflow_registry_uri": registry}


# -- worker-side task functions ------------------------------------------------------------

_CONFIGURED_PACKAGE: list[str] = []


def _configure_worker(package_name: str | None) -> None:
    """Once per worker process: Kedro's project settings, as ParallelRunner's subprocesses do."""
    if not package_name or package_name in _CONFIGURED_PACKAGE:
        return
    from kedro.framework.project import PACKAGE_NAME, configure_project

    if PACKAGE_NAME != package_name:
        configure_project(package_name)
    _CONFIGURED_PACKAGE[:] = [package_name]


@contextlib.contextmanager
def _mlflow_scope(state: _RunState) -> Iterator[None]:
    """Point MLflow at the driver's store; forget, after the node, the runs hooks reopened here.

    kedro-mlflow's ``before_node_run`` reopens the pipeline's run in the thread that runs the
    node. Worker threads outlive the run, so the reopened run is taken off this thread's stack of
    active runs afterwards (without ending it: the driver ends it in ``after_pipeline_run``),
    otherwise the next run's nodes in this thread would be logged as its children.
    """
    if not state.mlflow_tracking_uri:
        yield
        return
    import mlflow

    mlflow.set_tracking_uri(state.mlflow_tracking_uri)
    if state.mlflow_registry_uri:
        mlflow.set_registry_uri(state.mlflow_registry_uri)
    try:
        from mlflow.tracking.fluent import _active_run_stack

        stack = _active_run_stack.get()
        depth = len(stack)
    except Exception:  # pragma: no cover - MLflow internals moved: leave the stack alone
        stack = None
    try:
        yield
    finally:
        if stack is not None:
            del stack[depth:]


def _run_node(
    shared: bytes,
    node_blob: bytes,
    inputs: dict[str, Any],
    _upstream: list[Any],
    outputs: list[str],
) -> dict[str, Any]:
    """Run one node on this worker: Kedro's ``Task`` with this run's catalog and hooks.

    ``inputs`` are the in-memory datasets the node reads (resolved from upstream futures by
    Dask); ``_upstream`` only orders this task after the upstream nodes. Returns the in-memory
    ``outputs`` and where and how long the node ran.
    """
    from distributed import get_worker

    start = time.perf_counter()
    node = pickle.loads(node_blob)
    try:
        state: _RunState = pickle.loads(shared)
        _configure_worker(state.package_name)
        hook_manager = _create_hook_manager()
        for name, plugin in state.plugins:
            hook_manager.register(plugin, name=name)
        catalog = state.catalog
        for name, value in inputs.items():  # as the upstream node's save left it
            catalog.get(name).save(value)
        with _mlflow_scope(state):
            Task(
                node=node,
                catalog=catalog,
                is_async=state.is_async,
                hook_manager=hook_manager,
                run_id=state.run_id,
            ).execute()
        produced = {name: catalog.get(name).load() for name in outputs}
    except Exception as exc:
        exc.add_note(f"in Kedro node '{node.name}' run by DaskRunner on {_where()}")
        raise
    return {
        "outputs": produced,
        "worker": get_worker().address,
        "seconds": time.perf_counter() - start,
    }


def _where() -> str:
    from distributed import get_worker

    try:
        return f"dask worker {get_worker().address} (pid {os.getpid()})"
    except ValueError:  # pragma: no cover
        return f"pid {os.getpid()}"


def _summary(result: dict[str, Any]) -> tuple[str, float]:
    return result["worker"], result["seconds"]


def _pick(result: dict[str, Any], name: str) -> Any:
    return result["outputs"][name]
