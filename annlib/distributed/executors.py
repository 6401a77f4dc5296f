"""How a :class:`~annlib.distributed.ShardedIndex` runs one call on every shard.

An executor has one method, ``map(fn, items)``: call ``fn`` on each item, return the results in
order, and raise the first exception any call raised. The thread-pool executor is the default:
numba and BLAS release the GIL, so shards on one machine search in parallel.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Protocol

from .. import _validation as V

__all__ = ["Executor", "ThreadExecutor", "SerialExecutor"]


class Executor(Protocol):
    """What ShardedIndex needs from an executor."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``[fn(item) for item in items]``, possibly in parallel; raises the first failure."""


class SerialExecutor:
    """Every shard in turn on the calling thread (for debugging and one-core machines)."""

    def map(self, fn, items):
        return [fn(item) for item in items]


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
        items = list(items)
        if len(items) <= 1:
            return [fn(item) for item in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._workers or min(32, len(items)),
                                            thread_name_prefix="annlib-shard")
        futures = [self._pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]  # re-raises the first failure, in shard order

    def __getstate__(self):  # a pool cannot be pickled; a copy makes its own
        return {"_workers": self._workers, "_pool": None}
