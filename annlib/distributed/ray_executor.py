"""The Ray executor: one Ray actor per shard, each holding its shard warm.

Every actor builds its shard (or loads it with ``annlib.load``, memory-mapped on request) and
saves it as an artefact in the executor's storage: a path or URI every node of the cluster can
read. A search puts the query batch into Ray's object store once and hands the reference to
every actor, which reads it without a copy; each actor returns its top-k lists through the store.

Faults: a call that finds its actor dead restarts it — a new actor loads the shard's artefact
and replays the writes committed since, as logged in the storage — and repeats the call once;
if the restart or the repeated call fails, the call raises
:class:`~annlib.distributed.ShardUnavailableError`. Writes are versioned (see
:mod:`annlib.distributed.shards`): an actor logs a write's batch before applying it, a batch
counts only once every shard it touches has taken it, and a rollback reloads the actor at its
last committed state.

Ray is imported when a :class:`RayExecutor` is made, never by ``import annlib``.
"""

from __future__ import annotations

import atexit
import functools
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from .. import _validation as V
from ..api import Index
from . import storage
from .shards import ShardSpec, ShardStats, _search_index, index_stats, live_ids

__all__ = ["RayExecutor", "RayShard", "ShardServer"]


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise V.ray_not_installed(exc) from None
    return ray


class _Raised:
    """An exception raised inside an actor, returned as a value so the caller re-raises it
    as it was (a Ray task error would wrap it in a remote traceback)."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def _guarded(method):
    @functools.wraps(method)
    def run(self, *args):
        try:
            return method(self, *args)
        except Exception as exc:
            return _Raised(exc)
    return run


class ShardServer:
    """One shard inside its actor: the index, its live ids, and how to rebuild both.

    A plain class (the executor wraps it with ``ray.remote``), so it can also be run in-process.
    """

    def __init__(self) -> None:
        self.index: Index | None = None
        self._live: np.ndarray | None = None
        self.threads = 1

    # ------------------------------------------------------------ state
    def _stats(self) -> ShardStats:
        self._live = None
        return index_stats(self.index)

    @staticmethod
    def _replay(index: Index, entries: list[str]) -> None:
        for location in entries:
            arrays = storage.load_arrays(location)
            if "vectors" in arrays:
                index.add(arrays["vectors"], ids=arrays["ids"], threads=1)
            else:
                index.delete(arrays["ids"])

    def _load(self, base: str, mmap: bool, log: list[str]) -> Index:
        index = storage.load_index_at(base, mmap=mmap)
        self._replay(index, log)
        index.warmup()
        return index

    @_guarded
    def open(self, base: str, mmap: bool, vectors: np.ndarray | None, ids: np.ndarray | None,
             method: str, metric: str, params: dict, progress: Any, log: list[str], threads: int) -> ShardStats:
        """Build the shard from ``vectors`` and save it at ``base``, or load ``base`` and replay
        the committed writes in ``log``; then warm it up."""
        self.threads = threads
        if vectors is not None:
            index = Index.build(vectors, method=method, metric=metric, ids=ids, threads=threads,
                                progress=progress, **params)
            storage.save_index(index, base)
            index.warmup()
        else:
            index = self._load(base, mmap, log)
        self.index = index
        return self._stats()

    @_guarded
    def reset(self, base: str, mmap: bool, log: list[str]) -> ShardStats:
        """Reload the shard at its last committed state (a rollback)."""
        self.index = None
        self.index = self._load(base, mmap, log)
        return self._stats()

    # ------------------------------------------------------------ calls
    def search(self, queries: np.ndarray, k: int, rows: np.ndarray | None, allowed: np.ndarray | None,
               params: dict):
        """See :meth:`annlib.distributed.shards.ShardHandle.search`; returns three objects
        (distances, ids, timings), called with ``num_returns=3`` so that each list of a batch of
        1,000 stays under Ray's inline size and never goes through the shared-memory store."""
        try:
            live = None
            if allowed is not None:
                if self._live is None:
                    self._live = live_ids(self.index)
                live = self._live
            d, i, wall, cpu = _search_index(self.index, queries, k, rows, allowed, params, live, self.threads)
            return d, i, (wall, cpu)
        except Exception as exc:
            return _Raised(exc), None, None

    @_guarded
    def check_search_params(self, params: dict) -> None:
        """Raise as ``search`` would for these parameters."""
        self.index._validated_search_params(params)

    @_guarded
    def write(self, op: str, vectors: np.ndarray | None, ids: np.ndarray, location: str) -> ShardStats:
        """Log the batch at ``location``, then apply it."""
        if op == "add":
            storage.save_arrays(location, vectors=vectors, ids=ids)
            self.index.add(vectors, ids=ids, threads=self.threads)
        else:
            storage.save_arrays(location, ids=ids)
            self.index.delete(ids)
        return self._stats()

    @_guarded
    def holds(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` the shard holds, live."""
        if self._live is None:
            self._live = live_ids(self.index)
        return np.isin(ids, self._live)

    @_guarded
    def all_ids(self) -> np.ndarray:
        """Global ids of every position."""
        return self.index._external_ids(np.arange(self.index.n_positions))

    @_guarded
    def save(self, location: str) -> None:
        """Write the shard's index file to ``location``."""
        storage.save_index(self.index, location)

    def pid(self) -> int:
        """The actor's process id."""
        return os.getpid()


_REMOTE: dict[int, Any] = {}


def _remote_class(ray):
    if id(ray) not in _REMOTE:
        _REMOTE[id(ray)] = ray.remote(ShardServer)
    return _REMOTE[id(ray)]


class _Folder:
    """A working folder shared by the handles of one ``open_shards`` call; the last handle
    closed removes it (when the executor made it)."""

    def __init__(self, location: str | None):
        self.location = location
        self.users = 0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self.users += 1

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            last = self.users == 0
        if last and self.location is not None:
            storage.remove_tree(self.location)


class RayShard:
    """The handle of one shard actor (see :class:`annlib.distributed.shards.ShardHandle`).

    Attributes
    ----------
    number : int
        The shard's position.
    actor : ray.actor.ActorHandle or None
        The live actor (None after a failed restart, until the next call restarts it).
    base : str
        Location of the shard's artefact (what a restart loads).
    restarts : int
        Restarts so far.
    last_recovery_seconds : float or None
        Time the last restart took (new actor, load, replay, warm-up).
    """

    def __init__(self, executor: "RayExecutor", number: int, actor: Any, base: str, log_root: str,
                 stats: ShardStats, folder: _Folder):
        self._executor = executor
        self.number = number
        self.actor = actor
        self.base = base
        self._log_root = log_root
        self._log: list[str] = []  # committed write batches, in order
        self._pending: dict[int, str] = {}
        self._stats = stats
        self._generation = 0
        self._lock = threading.Lock()
        self.restarts = 0
        self.last_recovery_seconds: float | None = None
        self._folder = folder
        self._spare = None  # a live actor without a shard (its open failed), used by the next restart
        folder.acquire()

    @property
    def stats(self) -> ShardStats:
        """Sizes after the last build, load or write."""
        return self._stats

    # ------------------------------------------------------------ calls with one restart
    def _get(self, ref):
        value = self._executor._ray.get(ref, timeout=self._executor.call_timeout)
        first = value[0] if isinstance(value, list) else value
        if isinstance(first, _Raised):
            raise first.exc
        return value

    def _send(self, actor, name: str, returns: int, args: tuple):
        method = getattr(actor, name)
        if returns > 1:
            method = method.options(num_returns=returns)
        return self._get(method.remote(*args))

    def _call(self, name: str, *args, returns: int = 1):
        ray = self._executor._ray
        dead = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError)
        actor, generation = self.actor, self._generation
        if actor is not None:
            try:
                return self._send(actor, name, returns, args)
            except dead:
                pass
        actor = self._restart(generation)
        try:
            return self._send(actor, name, returns, args)
        except dead as exc:
            with self._lock:
                if self.actor is actor:
                    self.actor = None
            raise V.shard_died_again(self.number, exc) from exc

    def _restart(self, seen: int):
        """A new actor at the last committed state (unless another thread already made one
        since generation ``seen``); returns it."""
        with self._lock:
            if self._generation != seen and self.actor is not None:
                return self.actor
            start = time.perf_counter()
            old, self.actor = self.actor, None
            if old is not None:
                try:
                    self._executor._ray.kill(old)
                except Exception:  # already gone
                    pass
            # an actor whose last open failed is alive and empty: use it rather than start a process
            actor, self._spare = (self._spare, None) if self._spare is not None else (self._executor._new_actor(), None)
            try:
                stats = self._get(actor.open.remote(self.base, self._executor.mmap, None, None, "", "", {},
                                                    False, list(self._log), self._executor._threads))
            except Exception as exc:
                if isinstance(exc, (self._executor._ray.exceptions.RayActorError,
                                    self._executor._ray.exceptions.GetTimeoutError)):
                    try:
                        self._executor._ray.kill(actor)
                    except Exception:
                        pass
                else:  # the open raised inside a live actor (an unreadable artefact): keep it
                    self._spare = actor
                self._generation += 1
                raise V.shard_restart_failed(self.number, exc) from exc
            self.actor, self._stats = actor, stats
            self._generation += 1
            self.restarts += 1
            self.last_recovery_seconds = time.perf_counter() - start
            return actor

    # ------------------------------------------------------------ the handle protocol
    def search(self, queries, k, rows, allowed, params):
        """See :class:`~annlib.distributed.shards.ShardHandle`."""
        d, i, (wall, cpu) = self._call("search", queries, k, rows, allowed, params, returns=3)
        # arrays read from the object store are read-only: hand the caller (and the merge
        # kernel, which would compile a read-only variant) ordinary arrays
        return np.array(d), np.array(i), wall, cpu

    def check_search_params(self, params):
        """See :class:`~annlib.distributed.shards.ShardHandle`."""
        self._call("check_search_params", params)

    def write(self, version, op, vectors, ids):
        """See :class:`~annlib.distributed.shards.ShardHandle`; the batch is logged in the
        storage before the actor applies it."""
        location = storage.join(self._log_root, f"v{version:08d}-{op}.npz")
        self._pending[version] = location
        self._committed_stats = self._stats
        self._stats = self._call("write", op, vectors, ids, location)

    def commit(self, version):
        """See :class:`~annlib.distributed.shards.ShardHandle`."""
        self._log.append(self._pending.pop(version))

    def rollback(self, version, op, ids):
        """See :class:`~annlib.distributed.shards.ShardHandle`: the actor reloads its last
        committed state; if it cannot, it is ended and the next call restarts it."""
        self._pending.pop(version, None)
        self._stats = getattr(self, "_committed_stats", self._stats)
        if self.actor is None:  # no actor holds the batch: the next call restarts at the committed state
            return np.zeros(0, np.int64)
        try:
            self._stats = self._call("reset", self.base, self._executor.mmap, list(self._log))
        except Exception:
            with self._lock:
                actor, self.actor = self.actor, None
            if actor is not None:
                try:
                    self._executor._ray.kill(actor)
                except Exception:
                    pass
            raise
        return np.zeros(0, np.int64)

    def holds(self, ids):
        """See :class:`~annlib.distributed.shards.ShardHandle`."""
        return self._call("holds", ids)

    def all_ids(self):
        """See :class:`~annlib.distributed.shards.ShardHandle`."""
        return self._call("all_ids")

    def save(self, location):
        """See :class:`~annlib.distributed.shards.ShardHandle` (the actor writes the file)."""
        self._call("save", location)

    def close(self):
        """End the actor; the last handle of a build removes the working folder."""
        with self._lock:
            actors, self.actor, self._spare = (self.actor, self._spare), None, None
        for actor in actors:
            if actor is not None:
                try:
                    self._executor._ray.kill(actor)
                except Exception:
                    pass
        folder, self._folder = self._folder, None
        if folder is not None:
            folder.release()


class RayExecutor:
    """Shards as Ray actors: one actor per shard, holding its index in memory.

    Parameters
    ----------
    address : str, optional
        The Ray cluster to join (``ray.init(address=...)``). Default: the Ray already
        initialised in this process, else a local one (``ray.init()``).
    storage : str, optional
        A path or URI (``s3://...`` and the like need fsspec) every node can read and write:
        each shard's artefact and the batches written since are kept there, under a folder of
        its own per built index, removed by ``ShardedIndex.close()``. Default: a temporary
        folder of this machine, removed when the process ends — allowed only when Ray runs on
        one node.
    num_cpus : float, optional
        CPUs each actor reserves in Ray's scheduler (and threads it searches with, at least 1).
        Default: 1 on a cluster of several nodes (one actor per reserved core); 0 on one node,
        so any number of shards and indexes fit (the operating system shares the cores). A
        reservation is checked against the free CPUs when the actors start.
    mmap : bool, default False
        Actors memory-map the shard files they load (a loaded index, a restart) instead of
        reading them: a restart is quicker and the pages are shared with the page cache, but
        searches on mapped (small-page) memory measured up to 1.35x slower for HNSW here (see
        docs/distributed.md).
    actor_options : dict, optional
        More ``.options(...)`` for every actor (``resources``, ``scheduling_strategy``,
        ``max_concurrency``, ...).
    init_options : dict, optional
        Keyword arguments of ``ray.init`` when this executor starts Ray.
    call_timeout : float, optional
        Seconds to wait for one shard call before counting the actor as dead (default: wait).

    Raises
    ------
    ImportError
        Ray cannot be imported.
    TypeError, ValueError
        Arguments of the wrong type or out of range.
    """

    def __init__(self, address: str | None = None, *, storage: str | None = None, num_cpus: float | None = None,
                 mmap: bool = False, actor_options: dict | None = None, init_options: dict | None = None,
                 call_timeout: float | None = None):
        self._ray = _import_ray()
        self.address = address
        self.storage = None if storage is None else os.fspath(storage)
        if self.storage is not None and "://" not in self.storage:
            self.storage = os.path.abspath(self.storage)  # actors may run in another folder
        self.num_cpus = None if num_cpus is None else V.check_float("num_cpus", num_cpus, 0.0)
        self.mmap = V.check_bool("mmap", mmap)
        self.actor_options = dict(actor_options or {})
        self.init_options = dict(init_options or {})
        self.call_timeout = None if call_timeout is None else V.check_float("call_timeout", call_timeout, 0.0,
                                                                            low_open=True)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._temp_root: str | None = None
        self._cpus_per_actor = 0.0
        self._threads = 1

    def __getstate__(self):  # pools, locks and the ray module stay behind; a copy makes its own
        state = {k: v for k, v in self.__dict__.items() if k not in ("_pool", "_pool_lock", "_ray")}
        return {**state, "_pool": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pool_lock = threading.Lock()
        self._ray = _import_ray()

    # ------------------------------------------------------------ Ray itself
    def _ensure_started(self):
        ray = self._ray
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_options)
        return ray

    def _root(self, ray) -> str:
        if self.storage is not None:
            return self.storage
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        if nodes > 1:
            raise V.ray_storage_required(nodes)
        if self._temp_root is None:
            self._temp_root = tempfile.mkdtemp(prefix="annlib-shards-")
            atexit.register(storage.remove_tree, self._temp_root)
        return self._temp_root

    def _new_actor(self):
        ray = self._ray
        options = {"num_cpus": self._cpus_per_actor, "max_restarts": 0, "max_task_retries": 0,
                   **self.actor_options}
        return _remote_class(ray).options(**options).remote()

    # ------------------------------------------------------------ the executor protocol
    def map(self, fn, items):
        """``[fn(item) for item in items]`` on a pool of threads of this process (each call
        waits on its actor); raises the first failure after every call has ended."""
        items = list(items)
        if len(items) <= 1:
            return [fn(item) for item in items]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="annlib-ray-shard")
        futures = [self._pool.submit(fn, item) for item in items]
        wait(futures)
        return [f.result() for f in futures]

    def share(self, array: np.ndarray) -> Any:
        """Put ``array`` into Ray's object store once; every actor reads it from there."""
        return self._ray.put(array)

    def open_shards(self, specs: list[ShardSpec]) -> list[RayShard]:
        """Start one actor per spec, each building (and saving) or loading its shard.

        Raises
        ------
        ValueError
            Not enough free CPUs for the actors, or no ``storage`` on a multi-node cluster.
        Exception
            What a shard's build or load raised (every actor started is ended first).
        """
        ray = self._ensure_started()
        root = self._root(ray)
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        per = self.num_cpus if self.num_cpus is not None else (1.0 if nodes > 1 else 0.0)
        if per > 0:
            free = float(ray.available_resources().get("CPU", 0.0))
            if len(specs) * per > free + 1e-9:
                raise V.ray_not_enough_cpus(len(specs), per, free)
        self._cpus_per_actor = per
        self._threads = max(1, int(per))
        folder = _Folder(storage.new_folder(root, "sharded"))
        folder.acquire()  # held until every handle exists
        actors, refs, bases = [], [], []
        try:
            for spec in specs:
                actor = self._new_actor()
                actors.append(actor)
                base = spec.location or storage.join(folder.location, f"shard-{spec.number:04d}.annlib")
                bases.append(base)
                refs.append(actor.open.remote(base, self.mmap or spec.mmap, spec.vectors, spec.ids, spec.method,
                                              spec.metric, spec.params, spec.progress if spec.progress is True else False,
                                              [], self._threads))
            answers = ray.get(refs)
            for answer in answers:
                if isinstance(answer, _Raised):
                    raise answer.exc
        except BaseException:
            for actor in actors:
                try:
                    ray.kill(actor)
                except Exception:
                    pass
            folder.release()
            raise
        handles = [RayShard(self, spec.number, actor, base,
                            storage.join(folder.location, f"shard-{spec.number:04d}.log"), stats, folder)
                   for spec, actor, base, stats in zip(specs, actors, bases, answers)]
        for h in handles:
            storage.makedirs(h._log_root)
        folder.release()
        return handles
