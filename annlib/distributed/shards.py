"""The shard handle protocol: what a :class:`~annlib.distributed.ShardedIndex` asks of one shard.

A shard is an ordinary annlib index built with the vectors' global ids. The sharded index never
holds it directly: it holds a *handle* — :class:`LocalShard` (the index in this process) or a
Ray actor's handle (:mod:`annlib.distributed.ray_executor`) — and an executor makes the handles
(:meth:`open_shards`) and runs one call on every handle (``map``).

Writes are versioned: ``write(version, op, ...)`` applies a batch to the shard, ``commit(version)``
records it as part of the index, and ``rollback(version, ...)`` returns the shard to its state
before the batch. A shard that can be restarted (an actor) rebuilds its state from its saved
artefact and the committed writes only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..api import Index
from . import storage

__all__ = ["ShardSpec", "ShardStats", "ShardHandle", "LocalShard", "open_local_shards"]


@dataclass(frozen=True)
class ShardSpec:
    """How to make one shard: build it from vectors, or load a saved artefact.

    Attributes
    ----------
    number : int
        The shard's position in the sharded index.
    method, metric : str
        Family and metric of the shard.
    params : dict
        Build parameters of the family (with the shard's own ``random_state`` when seeded).
    vectors, ids : ndarray, optional
        Build from these (float32 vectors and their global int64 ids) ...
    location : str, optional
        ... or load the index file saved at this path or URI.
    mmap : bool, default False
        Memory-map a loaded file instead of reading it.
    progress : bool or callable, default False
        Passed to the build.
    """

    number: int
    method: str
    metric: str
    params: dict = field(default_factory=dict)
    vectors: np.ndarray | None = None
    ids: np.ndarray | None = None
    location: str | None = None
    mmap: bool = False
    progress: Any = False


@dataclass(frozen=True)
class ShardStats:
    """Sizes and identity of a shard, as its handle last saw them."""

    live: int          # vectors that search can return
    positions: int     # vectors ever added (deleted ones included)
    dim: int
    metric: str
    family: str
    memory_bytes: int


class ShardHandle(Protocol):
    """One shard, wherever it lives. Every method blocks until the shard has answered.

    A handle that can restart its shard (an actor) does so once when the shard has died and
    repeats the call; if that fails too it raises :class:`~annlib.distributed.ShardUnavailableError`.
    """

    number: int
    restarts: int

    @property
    def stats(self) -> ShardStats:
        """The shard's sizes after its last build, load or write (no round trip)."""

    def search(self, queries: Any, k: int, rows: np.ndarray | None, allowed: Any,
               params: dict) -> tuple[np.ndarray, np.ndarray, float, float]:
        """``(distances, global ids, wall seconds, cpu seconds)`` of ``queries[rows]`` (all rows
        when None), restricted to the ``allowed`` global ids when not None; ``queries`` and
        ``allowed`` are what the executor's ``share`` returned."""

    def check_search_params(self, params: dict) -> None:
        """Raise as the shard's ``search`` would for these parameters."""

    def write(self, version: int, op: str, vectors: np.ndarray | None, ids: np.ndarray) -> None:
        """Apply one write (``op`` "add" or "delete") of the given version; not yet committed."""

    def commit(self, version: int) -> None:
        """Record the write of ``version`` as part of the index."""

    def rollback(self, version: int, op: str, ids: np.ndarray) -> np.ndarray:
        """Undo the uncommitted write of ``version`` (if it was applied, wholly or in part).
        Returns the ids of the batch the shard still counts as added-and-deleted (a shard that
        cannot forget ids; usually none), or None when the write cannot be undone."""

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` the shard holds and has not deleted."""

    def all_ids(self) -> np.ndarray:
        """Global ids of every vector ever added to the shard (deleted ones included)."""

    def save(self, location: str) -> None:
        """Write the shard's index file to ``location`` (a path or URI)."""

    def close(self) -> None:
        """Release the shard (an actor is ended); the handle cannot be used afterwards."""


def _search_index(index: Index, queries: np.ndarray, k: int, rows: np.ndarray | None, allowed: np.ndarray | None,
                  params: dict, live: np.ndarray | None, threads: int = 1):
    """One shard's search: the rows asked for, the allowed ids it holds, at most its size."""
    wall, cpu = time.perf_counter(), time.thread_time()
    Q = queries if rows is None else queries[rows]
    if not Q.flags.writeable:  # read from Ray's object store: numba would compile a read-only variant
        Q = Q.copy()
    n = len(index)
    sub = None
    if allowed is not None:
        sub = allowed[np.isin(allowed, live)]
    if n == 0 or Q.shape[0] == 0:
        d = np.full((Q.shape[0], 0), np.inf, np.float32)
        i = np.full((Q.shape[0], 0), -1, np.int64)
    else:
        res = index.search(Q, min(k, n), filter=sub, threads=threads, **params)
        d, i = res.distances, res.ids
    return d, i, time.perf_counter() - wall, time.thread_time() - cpu


def live_ids(index: Index) -> np.ndarray:
    """Global ids an index holds and has not deleted (sorted)."""
    live = index._live_mask()
    positions = np.arange(index.n_positions) if live is None else np.flatnonzero(live)
    return np.sort(index._external_ids(positions))


def index_stats(index: Index) -> ShardStats:
    """The :class:`ShardStats` of a built index."""
    return ShardStats(live=len(index), positions=index.n_positions, dim=index.dim, metric=index.metric,
                      family=index.family, memory_bytes=index.memory_bytes())


def build_from_spec(spec: ShardSpec, threads: int = 1) -> Index:
    """Build or load the index a spec describes."""
    if spec.location is not None:
        return storage.load_index_at(spec.location, mmap=spec.mmap)
    return Index.build(spec.vectors, method=spec.method, metric=spec.metric, ids=spec.ids, threads=threads,
                       progress=spec.progress, **spec.params)


class LocalShard:
    """A shard held in this process: an annlib index and nothing else.

    Writes apply at once; a rollback of an add deletes the batch's ids again (an annlib index
    never reuses an id, so those ids stay taken) where the family can delete; a delete, and an
    add to a family without delete, cannot be undone.

    Parameters
    ----------
    number : int
        The shard's position.
    index : Index
        The shard's built index.
    """

    def __init__(self, number: int, index: Index):
        self.number = number
        self.index = index
        self.restarts = 0
        self._stats = index_stats(index)
        self._live: np.ndarray | None = None

    @property
    def stats(self) -> ShardStats:
        """Sizes after the last write (see :class:`ShardStats`)."""
        return self._stats

    def _live_ids(self) -> np.ndarray:
        if self._live is None:
            self._live = live_ids(self.index)
        return self._live

    def _changed(self) -> None:
        self._live = None
        self._stats = index_stats(self.index)

    def search(self, queries, k, rows, allowed, params):
        """See :class:`ShardHandle`."""
        live = None if allowed is None else self._live_ids()
        return _search_index(self.index, queries, k, rows, allowed, params, live)

    def check_search_params(self, params):
        """See :class:`ShardHandle`."""
        self.index._validated_search_params(params)

    def write(self, version, op, vectors, ids):
        """See :class:`ShardHandle`."""
        try:
            if op == "add":
                self.index.add(vectors, ids=ids, threads=1)
            else:
                self.index.delete(ids)
        finally:
            self._changed()

    def commit(self, version):
        """See :class:`ShardHandle` (nothing to record in this process)."""

    def rollback(self, version, op, ids):
        """See :class:`ShardHandle`: an add is undone by deleting whatever part of it was added;
        returns those ids (taken by the shard, now deleted)."""
        if op != "add":
            return None  # a delete cannot be undone
        taken = ids[np.isin(ids, self.all_ids())]
        if taken.size and not self.index.supports_delete:
            return None  # this family cannot take vectors out again
        held = taken[self.holds(taken)]
        if held.size:
            self.index.delete(held)
        self._changed()
        return taken

    def holds(self, ids):
        """See :class:`ShardHandle`."""
        return np.isin(ids, self._live_ids())

    def all_ids(self):
        """See :class:`ShardHandle`."""
        return self.index._external_ids(np.arange(self.index.n_positions))

    def save(self, location):
        """See :class:`ShardHandle`."""
        storage.save_index(self.index, location)

    def close(self):
        """See :class:`ShardHandle` (the index is released with the handle)."""


def open_local_shards(executor: Any, specs: list[ShardSpec]) -> list[LocalShard]:
    """Build or load every spec's shard in this process, in parallel through ``executor.map``."""
    return executor.map(lambda spec: LocalShard(spec.number, build_from_spec(spec)), specs)
