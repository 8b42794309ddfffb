"""Per-core sharding: run one function over many cores, on a Dask cluster when there is one.

:func:`map_cores` is the one place where a per-core loop decides where it runs:

* inside a task of a ``dask.distributed`` worker (a node run by
  :class:`her2_kedro.runners.DaskRunner`), it fans the items out to the whole cluster through
  ``distributed.worker_client()``: the calling task secedes from its worker's thread pool while
  it waits (so it holds no worker slot) and rejoins when the results are in;
* in a process where a client was registered with :func:`use_client` (the DaskRunner registers
  its own for the length of a run), it submits the items through that client;
* otherwise it is the loop it replaced: a plain loop with a tqdm progress bar, or a thread pool
  of ``threads`` threads when the caller asks for one (preprocessing's ``workers`` option).

Results come back in input order, whichever way the items ran. An exception raised by an item is
raised to the caller, as the loop would raise it: callers that turn bad inputs into QC problems
(ingestion's image checks, preprocessing's stain-normalisation fallback) do so inside the per-item
function, so the QC contract is the same everywhere. On a cluster the first failure to arrive
cancels the items not yet started, and the exception carries a note naming ``desc`` and the item.

What the function and its items must be, so that they travel to other processes and machines:

* ``fn`` is a module-level function, or a ``functools.partial`` of one over plain data
  (pydantic models, numpy arrays, dataclasses, paths): no lambdas, closures or bound methods of
  objects holding open files, locks or sessions. Each item is pickled and sent to a worker, and
  each result is pickled and sent back: return what the caller needs (e.g. a QC verdict and a
  hash), not the decoded pixels.
* Files named in items (paths, dataset loaders) are read by the worker that runs the item: on
  several machines they must lie on storage every worker sees at the same path (a shared
  filesystem mount, or an fsspec URL such as ``s3://``).
* A large shared object (a trained model) must not be shipped with every item. Pass its location
  instead (a checkpoint path on shared storage) and load it once per worker process, e.g.::

      @functools.lru_cache(maxsize=2)
      def _encoder(checkpoint: str) -> torch.nn.Module:
          return load_checkpoint(checkpoint).eval()

      def embed_core(item: tuple[str, str], *, checkpoint: str) -> np.ndarray:
          core_id, image_path = item
          return _encoder(checkpoint)(read_core(image_path))

      map_cores(functools.partial(embed_core, checkpoint=str(path)), items, desc="embedding")

  Each worker process then loads the model the first time one of its items needs it and reuses
  it for the rest of the run (and of later runs on the same workers, until the file changes
  name: key the cache on a path that changes with the checkpoint's content or version).
"""

from __future__ import annotations

import contextlib
import logging
import reprlib
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["active_client", "map_cores", "on_dask_worker", "use_client"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Clients registered with :func:`use_client`, innermost last (process-wide: the DaskRunner
#: runs its nodes on workers, so the driver registers one client for the length of a run).
_CLIENTS: list[Any] = []

_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80


@contextlib.contextmanager
def use_client(client: Any) -> Iterator[Any]:
    """Within the block, :func:`map_cores` in this process fans out through ``client``.

    Only clients registered here are used outside worker tasks: a ``distributed.Client`` that
    happens to exist in the process (a notebook's, another library's) never changes where a
    plain ``SequentialRunner`` run computes.
    """
    _CLIENTS.append(client)
    try:
        yield client
    finally:
        _CLIENTS.remove(client)


def active_client() -> Any | None:
    """The innermost client registered with :func:`use_client` that is still connected."""
    for client in reversed(_CLIENTS):
        if getattr(client, "status", "running") in ("running", "connecting", "newly-created"):
            return client
    return None


def on_dask_worker() -> bool:
    """True when the calling code runs inside a task on a ``dask.distributed`` worker."""
    if "distributed" not in sys.modules:  # a worker process has always imported it
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def map_cores(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    desc: str,
    threads: int = 1,
    unit: str = "core",
) -> list[R]:
    """``[fn(item) for item in items]``, sharded over a Dask cluster when one is in use.

    Args:
        fn: a picklable function of one item (see the module docstring).
        items: the per-core inputs, each picklable.
        desc: what is being done, for the progress bar, task names and error notes.
        threads: without a cluster, run the items on this many threads (1: in this thread).
            Ignored on a cluster, whose workers' threads are the parallelism.
        unit: the progress bar's unit.

    Returns:
        ``fn(item)`` for every item, in the order of ``items``.
    """
    items = list(items)
    if not items:
        return []
    if len(items) > 1:
        if on_dask_worker():
            from distributed import worker_client

            # secedes this task's thread from the worker's pool while it waits; rejoins after
            with worker_client() as client:
                return _on_cluster(client, fn, items, desc, unit, progress=False)
        client = active_client()
        if client is not None:
            return _on_cluster(client, fn, items, desc, unit, progress=True)
    bar = {"total": len(items), "desc": desc, "unit": unit}
    if threads <= 1 or len(items) == 1:
        return [fn(item) for item in tqdm(items, **bar)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(tqdm(pool.map(fn, items), **bar))


def _on_cluster(
    client: Any, fn: Callable[[T], R], items: list[T], desc: str, unit: str, progress: bool
) -> list[R]:
    """Submit one task per item, wait for all of them, return the results in input order."""
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    label = "-".join(desc.split()) or "map_cores"
    keys = [f"{label}-{i}-{token}" for i in range(len(items))]
    futures = client.map(fn, items, key=keys, pure=False)
    index = {f.key: i for i, f in enumerate(futures)}
    try:
        with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress) as bar:
            for future in as_completed(futures):
                if future.status == "error":
                    _raise_item_error(future, index[future.key], items, desc)
                bar.update()
        return client.gather(futures)
    finally:
        client.cancel([f for f in futures if not f.done()])


def _raise_item_error(failed: Any, i: int, items: list, desc: str) -> None:
    """Raise item ``i``'s own exception with a note naming it (the caller cancels the rest)."""
    exc = failed.exception()
    tb = failed.traceback()
    if isinstance(exc, BaseException):
        exc.add_note(
            f"map_cores({desc!r}): item {i} of {len(items)} ({_short.repr(items[i])}) failed "
            "on a dask worker"
        )
        raise exc.with_traceback(tb)
    raise RuntimeError(f"map_cores({desc!r}): item {i} failed: {exc!r}")  # pragma: no cover
