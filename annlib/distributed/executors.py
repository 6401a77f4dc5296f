"""How a :class:`~annlib.distributed.ShardedIndex` places its shards and runs one call on each.

An executor needs one method, ``map(fn, items)``: call ``fn`` on each item, return the results in
order, and raise the first exception any call raised. It may also have

* ``open_shards(specs)``: make a shard handle (:mod:`annlib.distributed.shards`) per spec;
  without it the shards are built in this process through ``map``;
* ``share(array)``: what to hand every shard instead of the array (the Ray executor puts it in
  the object store once); without it the array itself.

The thread-pool executor is the default: numba and BLAS release the GIL, so shards on one
machine search in parallel. The Ray executor (:class:`~annlib.distributed.RayExecutor`) runs
one actor per shard.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, Protocol

from .. import _validation as V
from .shards import open_local_shards

__all__ = ["Executor", "ThreadExecutor", "SerialExecutor", "resolve_executor"]


class Executor(Protocol):
    """What ShardedIndex needs from an executor."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``[fn(item) for item in items]``, possibly in parallel; raises the first failure."""


class SerialExecutor:
    """Every shard in turn on the calling thread (for debugging and one-core machines)."""

    def map(self, fn, items):
        """``[fn(item) for item in items]`` on the calling thread."""
        return [fn(item) for item in items]

    def open_shards(self, specs):
        """Build or load every shard in this process, one after the other."""
        return open_local_shards(self, specs)


class ThreadExecutor:
    """Shards in parallel on a pool of threads of this process.

    Parameters
    ----------
    workers : int, optional
        Pool size; default one thread per shard (set by the first call), at most 32.
    """

    def __init__(self, workers: int | None = None):
        self._workers = V.check_workers(workers)
        self._pool: ThreadPoolExecutor | None = None

    def map(self, fn, items):
        """``[fn(item) for item in items]``, the items in parallel; raises the first failure (in
        item order) after every call has ended."""
        items = list(items)
        if len(items) <= 1:
            return [fn(item) for item in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._workers or min(32, len(items)),
                                            thread_name_prefix="annlib-shard")
        futures = [self._pool.submit(fn, item) for item in items]
        wait(futures)  # every call ends before a failure is raised: none runs on behind the caller
        return [f.result() for f in futures]  # re-raises the first failure, in shard order

    def open_shards(self, specs):
        """Build or load every shard in this process, in parallel."""
        return open_local_shards(self, specs)

    def __getstate__(self):  # a pool cannot be pickled; a copy makes its own
        return {"_workers": self._workers, "_pool": None}


def resolve_executor(executor: Any, address: str | None = None, storage: str | None = None) -> Any:
    """The executor object for ``ShardedIndex(executor=...)``.

    Parameters
    ----------
    executor : None, "thread", "serial", "ray" or an object with ``map(fn, items)``
        None and "thread" give a :class:`ThreadExecutor`; "ray" a
        :class:`~annlib.distributed.RayExecutor` with ``address`` and ``storage``.
    address, storage : str, optional
        Only with ``executor="ray"``.

    Raises
    ------
    ValueError
        An unknown name, or ``address``/``storage`` with another executor.
    ImportError
        ``"ray"`` where Ray cannot be imported.
    """
    if isinstance(executor, str) and executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(address=address, storage=storage)
    if address is not None or storage is not None:
        raise V.ray_options_need_ray_executor()
    if executor is None or (isinstance(executor, str) and executor == "thread"):
        return ThreadExecutor()
    if isinstance(executor, str) and executor == "serial":
        return SerialExecutor()
    if isinstance(executor, str) or not callable(getattr(executor, "map", None)):
        raise V.unknown_executor(executor)
    return executor
