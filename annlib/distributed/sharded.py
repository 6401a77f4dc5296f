"""``ShardedIndex``: one index API over several ordinary annlib indexes (shards).

The vectors are split into shards — at random, or by a k-means over a sample whose centres every
shard shares (then a query may be routed to its nearest shards only) — and each shard is an
ordinary annlib index built with the vectors' global ids, so a shard answers with global ids at
true distances. A search checks the queries once, scatters them to the shards through an
executor, and merges the per-shard top-k lists with the library's merge kernel.

The sharded index holds a *handle* per shard (:mod:`annlib.distributed.shards`): the index in this
process, or a Ray actor. Writes (``add``, ``delete``) are checked whole before any shard changes,
take the sharded index's writer lock (a search sees every shard before or after a write, never a
mix), and are versioned: a batch is committed on every shard it touches or on none.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from .. import _validation as V
from .._locks import ReadWriteLock
from ..api import SearchResult, get_family
from ..errors import IndexFormatError, NotBuiltError, ShardUnavailableError
from ..kernels.cluster import assign_nearest, kmeans
from ..kernels.blockwise import exact_search
from ..kernels.distances import sqnorms
from ..kernels.topk import merge_topk
from ..metrics import PROXY_L2SQ, get_metric
from . import storage as _store
from .executors import resolve_executor
from .shards import ShardSpec, open_local_shards

__all__ = ["ShardedIndex", "ShardedSearchResult"]

_META = "sharded.json"
_FORMAT = 1
PARTITIONS = ("random", "kmeans")


def _shard_file(i: int) -> str:
    return f"shard-{i:04d}.annlib"


class ShardedSearchResult(SearchResult):
    """A :class:`~annlib.SearchResult` (unpacks as ``ids, distances``) with what the scatter saw.

    Attributes
    ----------
    partial : bool
        True when some shards could not answer and the caller passed ``allow_partial=True``:
        the rows then hold the best results of the shards that did answer.
    missing_shards : tuple of int
        The shards that did not answer (empty unless ``partial``).
    shard_seconds : tuple of float
        Wall time each searched shard spent in its own search (in shard order; 0 for a shard
        not searched).
    shard_cpu_seconds : tuple of float
        CPU time of the thread that ran each shard's search.
    merge_seconds : float
        Time spent merging the per-shard lists into the global top-k.
    """

    partial: bool
    missing_shards: tuple
    shard_seconds: tuple
    shard_cpu_seconds: tuple
    merge_seconds: float

    def __new__(cls, ids, distances, *, missing_shards=(), shard_seconds=(), shard_cpu_seconds=(),
                merge_seconds=0.0):
        self = super().__new__(cls, ids, distances)
        self.missing_shards = tuple(missing_shards)
        self.partial = bool(self.missing_shards)
        self.shard_seconds = tuple(shard_seconds)
        self.shard_cpu_seconds = tuple(shard_cpu_seconds)
        self.merge_seconds = float(merge_seconds)
        return self


class _Failed:
    """A shard call's exception, carried back through ``executor.map`` as a value."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def _catching(fn):
    def run(item):
        try:
            return fn(item)
        except Exception as exc:  # every shard's outcome is needed before deciding
            return _Failed(exc)
    return run


class ShardedIndex:
    """The ``Index`` API over ``shards`` annlib indexes of one family.

    Parameters
    ----------
    method : str, default "hnsw"
        The family of every shard (see ``annlib.families()``).
    shards : int, default 2
        Number of shards (at least 1).
    metric : {"l2", "cosine", "ip"}, default "l2"
    executor : None, "thread", "serial", "ray" or an executor object, default None
        Where the shards live and how a call reaches all of them: None or "thread" is a
        :class:`~annlib.distributed.ThreadExecutor` (the shards in this process, searched in
        parallel); "serial" a :class:`~annlib.distributed.SerialExecutor`; "ray" a
        :class:`~annlib.distributed.RayExecutor` (one Ray actor per shard) with ``address`` and
        ``storage``; or any object with ``map(fn, items)`` (and optionally ``open_shards`` and
        ``share``, see :mod:`annlib.distributed.executors`).
    partition : {"random", "kmeans"}, default "random"
        How vectors are assigned: a seeded random balanced split, or the nearest of ``shards``
        k-means centres trained once on a sample (needed for ``shards_to_search``).
    random_state : int, default 0
        Seed of the split, the k-means and every shard's build.
    address : str, optional
        With ``executor="ray"``: the Ray cluster to join (default: the Ray already initialised
        in this process, else a local one started with ``ray.init()``).
    storage : str, optional
        With ``executor="ray"``: a path or URI every node can read, where the shard artefacts
        are saved (default: a temporary folder, allowed only on a one-node Ray).
    **params
        Build parameters of the family, passed to every shard.

    Raises
    ------
    ValueError
        Unknown method, metric, partition or executor, ``shards`` < 1, family parameters the
        family refuses (checked at construction), or ``address``/``storage`` without
        ``executor="ray"``.
    ImportError
        ``executor="ray"`` where Ray cannot be imported.
    """

    def __init__(self, method: str = "hnsw", shards: int = 2, *, metric: str = "l2", executor: Any = None,
                 partition: str = "random", random_state: int = 0, address: str | None = None,
                 storage: str | None = None, **params: Any):
        self.method = method
        self._family = get_family(method)
        self.shards = V.check_int("shards", shards, 1)
        self._metric = get_metric(metric)
        self.partition = V.check_choice("partition", partition, list(PARTITIONS))
        self.random_state = V.resolve_seed(random_state)
        self.params = dict(params)
        self._family(metric=self._metric.name, **self.params)  # the family checks its parameters now
        self.executor = resolve_executor(executor, address, storage)
        self._rw = ReadWriteLock()
        self._handles: list[Any] = []
        self._centres: np.ndarray | None = None
        self._order: np.ndarray = np.zeros(0, np.int64)  # global ids in insertion order
        self._dim: int | None = None
        self._version = 0  # committed writes since build or load
        self._params_ok: set = set()  # (params, version) already accepted by a shard

    # ------------------------------------------------------------------ shape
    @property
    def metric(self) -> str:
        """Public metric name."""
        return self._metric.name

    @property
    def dim(self) -> int | None:
        """Vector dimension (None before build)."""
        return self._dim

    @property
    def handles(self) -> tuple:
        """The shard handles, in shard order (:mod:`annlib.distributed.shards`); for a Ray
        executor each has ``actor`` (the Ray actor), ``restarts`` and ``base`` (its artefact)."""
        return tuple(self._handles)

    def __len__(self) -> int:
        return sum(h.stats.live for h in self._handles)

    def shard_sizes(self) -> list[int]:
        """Live vectors per shard."""
        with self._rw.read():
            return [h.stats.live for h in self._handles]

    def memory_bytes(self) -> int:
        """Bytes held by the arrays of every shard (as each shard last reported them)."""
        self._require_built()
        return sum(h.stats.memory_bytes for h in self._handles)

    def __repr__(self) -> str:
        state = f"n={len(self)}, dim={self._dim}" if self._dim is not None else "not built"
        return f"ShardedIndex(method={self.method!r}, shards={self.shards}, partition={self.partition!r}) [{state}]"

    def close(self) -> None:
        """Release every shard (a Ray executor ends the actors and removes their working
        artefacts). The index is unbuilt afterwards; calling it again does nothing."""
        with self._rw.write():
            handles, self._handles = self._handles, []
            self._dim = None
            for h in handles:
                h.close()

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ build
    def _assign(self, X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Shard of every row of ``X`` (prepared vectors)."""
        n = X.shape[0]
        if self.partition == "random":
            return (rng.permutation(n) % self.shards).astype(np.int64)
        if self._centres is None:
            sample = X if n <= 50_000 else X[rng.choice(n, 50_000, replace=False)]
            self._centres = kmeans(np.ascontiguousarray(sample), self.shards, rng=rng)
        return assign_nearest(X, self._centres)[0].astype(np.int64)

    def _open(self, specs: list[ShardSpec]) -> list[Any]:
        opener = getattr(self.executor, "open_shards", None)
        return opener(specs) if opener is not None else open_local_shards(self.executor, specs)

    def _share(self, array: Any) -> Any:
        share = getattr(self.executor, "share", None)
        return array if share is None or array is None else share(array)

    def build(self, X: Any, *, ids: Any = None, progress: Any = False) -> "ShardedIndex":
        """Split ``X`` into shards and build one index per shard; returns ``self``.

        Parameters
        ----------
        X : array-like (n, d)
        ids : array-like of int (n,), optional
            Global ids (default: positions).
        progress : bool or callable, default False
            Passed to every shard's build.

        Raises
        ------
        TypeError, ValueError
            Bad vectors or ids (as ``Index.build``), or fewer vectors than shards.
        """
        X32, _ = V.as_vectors(X, "X", limit=self._metric.max_abs)
        n = X32.shape[0]
        if n < self.shards:
            raise V.too_few_for_shards(n, self.shards)
        glob = np.arange(n, dtype=np.int64) if ids is None else V.check_ids(ids, n)
        rng = np.random.default_rng(self.random_state)
        with self._rw.write():
            centres_before = self._centres
            self._centres = None
            where = self._assign(self._metric.prepare(X32), rng)
            rows = [np.flatnonzero(where == s) for s in range(self.shards)]
            if min(r.size for r in rows) == 0:
                self._centres = centres_before
                raise V.empty_shard(self.partition)
            seeded = "random_state" in self._family.build_defaults and "random_state" not in self.params
            specs = [ShardSpec(s, self.method, self.metric,
                               {**self.params, **({"random_state": self.random_state + s} if seeded else {})},
                               vectors=np.ascontiguousarray(X32[rows[s]]), ids=glob[rows[s]], progress=progress)
                     for s in range(self.shards)]
            try:
                handles = self._open(specs)
            except BaseException:
                self._centres = centres_before
                raise
            old, self._handles = self._handles, handles
            for h in old:
                h.close()
            self._order = glob.copy()
            self._dim = X32.shape[1]
            self._version = 0
            self._params_ok.clear()
        return self

    # ------------------------------------------------------------------ search
    def _require_built(self) -> None:
        if self._dim is None:
            raise NotBuiltError("this ShardedIndex has not been built; call build(X) first")

    def _allowed_ids(self, filter: Any) -> np.ndarray | None:
        """The ``filter=`` argument as sorted allowed global ids (None: everything)."""
        if filter is None:
            return None
        arr = np.asarray(filter)
        if arr.dtype == np.bool_:
            if arr.ndim != 1 or arr.shape[0] != self._order.shape[0]:
                raise V.sharded_mask_length(self._order.shape[0], arr.shape)
            return np.sort(self._order[arr])
        # the same type and shape checks as Index.search (positions are not needed here)
        V.check_filter(filter, self._order.shape[0], lambda ids: np.full(ids.shape, -1, np.int64))
        return np.unique(arr.astype(np.int64))

    def _check_search_params(self, params: dict) -> None:
        """Refuse parameters every shard would refuse, before the scatter (asked of the first
        shard that answers, once per setting and write)."""
        try:
            key = (tuple(sorted(params.items())), self._version)
            if key in self._params_ok:
                return
        except TypeError:
            key = None
        last: Exception | None = None
        for h in self._handles:
            try:
                h.check_search_params(params)
                break
            except ShardUnavailableError as exc:
                last = exc
        else:
            raise last  # no shard could answer
        if key is not None:
            if len(self._params_ok) > 256:
                self._params_ok.clear()
            self._params_ok.add(key)

    def search(self, Q: Any, k: int = 10, *, filter: Any = None, shards_to_search: int | None = None,
               allow_partial: bool = False, **params: Any) -> ShardedSearchResult:
        """The ``k`` nearest vectors over every shard (or the nearest ``shards_to_search``).

        Parameters
        ----------
        Q : array-like (q, d) or (d,)
        k : int, default 10
        filter : bool array (one entry per vector ever added, in insertion order) or int array
            of allowed ids, optional
        shards_to_search : int, optional
            With ``partition="kmeans"``: search only the shards whose centres are nearest to
            each query (all shards when None).
        allow_partial : bool, default False
            When a shard cannot answer (its actor died and could not be restarted): False
            raises :class:`~annlib.distributed.ShardUnavailableError`; True returns the merged
            results of the other shards with ``result.partial`` True and
            ``result.missing_shards`` naming the missing ones.
        **params
            The family's search parameters, passed to every shard.

        Returns
        -------
        ShardedSearchResult
            Global ids and true distances, best first; -1 / +inf where fewer than ``k`` exist;
            plus ``partial``, ``missing_shards`` and per-shard timings.

        Raises
        ------
        TypeError, ValueError
            Bad queries, ``k``, filter or parameters — before any shard is searched.
        ShardUnavailableError
            A shard could not answer even after one restart (unless ``allow_partial``).
        """
        self._require_built()
        Q32, was_1d = V.as_vectors(Q, "Q", allow_1d=True, limit=self._metric.max_abs)
        V.check_dim(Q32.shape[1], self._dim)
        allow_partial = V.check_bool("allow_partial", allow_partial)
        with self._rw.read():
            k = V.check_k(k, len(self))
            allowed = self._allowed_ids(filter)
            if params:  # refused here, before the scatter, as every shard would refuse them
                self._check_search_params(params)
            route = self._route(Q32, shards_to_search)
            targets = []
            for s in range(len(self._handles)):
                rows = None if route is None else np.flatnonzero((route == s).any(axis=1))
                if rows is None or rows.size:
                    targets.append((s, rows))
            queries, allowed_shared = self._share(Q32), self._share(allowed)

            def search_one(target):
                s, rows = target
                try:
                    return self._handles[s].search(queries, k, rows, allowed_shared, params)
                except ShardUnavailableError as exc:
                    if allow_partial:
                        return _Failed(exc)
                    raise

            answers = self.executor.map(search_one, targets)
        t0 = time.perf_counter()
        q = Q32.shape[0]
        dist = ids = None
        missing, wall, cpu = [], [0.0] * len(self._handles), [0.0] * len(self._handles)
        for (s, rows), answer in zip(targets, answers):
            if isinstance(answer, _Failed):
                missing.append(s)
                continue
            d, i, wall[s], cpu[s] = answer
            if rows is not None and rows.size < q:
                full_d = np.full((q, d.shape[1]), np.inf, np.float32)
                full_i = np.full((q, d.shape[1]), -1, np.int64)
                full_d[rows], full_i[rows] = d, i
                d, i = full_d, full_i
            if dist is None:
                dist, ids = d, i
            else:
                dist, ids = merge_topk(dist, ids, d, i, k)
        if dist is None:  # every shard missing
            dist, ids = np.full((q, k), np.inf, np.float32), np.full((q, k), -1, np.int64)
        elif dist.shape[1] < k:  # one shard answered with fewer than k: pad (rows stay sorted)
            pad = k - dist.shape[1]
            dist = np.hstack([dist, np.full((q, pad), np.inf, np.float32)])
            ids = np.hstack([ids, np.full((q, pad), -1, np.int64)])
        merge = time.perf_counter() - t0
        extra = dict(missing_shards=missing, shard_seconds=wall, shard_cpu_seconds=cpu, merge_seconds=merge)
        if was_1d:
            return ShardedSearchResult(ids[0], dist[0], **extra)
        return ShardedSearchResult(ids, dist, **extra)

    def _route(self, Q: np.ndarray, shards_to_search: int | None) -> np.ndarray | None:
        """(q, s) shard numbers each query visits, or None for all shards."""
        if shards_to_search is None:
            return None
        s = V.check_int("shards_to_search", shards_to_search, 1)
        if self._centres is None:
            raise V.routing_needs_centres()
        if s >= self.shards:
            return None
        # the nearest centres by the library's exact search (squared L2, as the split used)
        _, nearest = exact_search(self._metric.prepare(Q), self._centres, sqnorms(self._centres), s, PROXY_L2SQ)
        return nearest

    # ------------------------------------------------------------------ writes
    def _write(self, op: str, batches: dict[int, tuple[np.ndarray | None, np.ndarray]]) -> None:
        """Apply one versioned write to the shards in ``batches`` (shard -> (vectors, ids)):
        committed on all of them, or rolled back on all of them and raised."""
        version = self._version + 1
        targets = sorted(batches)

        def write_one(s):
            vectors, ids = batches[s]
            self._handles[s].write(version, op, vectors, ids)

        outcome = self.executor.map(_catching(write_one), targets)
        failed = [(s, o.exc) for s, o in zip(targets, outcome) if isinstance(o, _Failed)]
        if not failed:
            for s in targets:
                self._handles[s].commit(version)
            self._version = version
            self._params_ok.clear()
            return

        def undo(s):
            return self._handles[s].rollback(version, op, batches[s][1])

        undone = self.executor.map(_catching(undo), targets)
        self._params_ok.clear()
        shards, first = [s for s, _ in failed], failed[0][1]
        kept_by = [s for s, u in zip(targets, undone) if u is None]
        if kept_by and op == "delete":
            raise V.sharded_delete_not_undone(shards, first) from first
        if kept_by:
            raise V.sharded_add_not_undone(shards, kept_by, self._family.__name__, first) from first
        kept = [u for u in undone if not isinstance(u, _Failed) and len(u)]
        if kept:  # local shards keep the undone ids as deleted ones: they stay taken
            self._order = np.concatenate([self._order, np.unique(np.concatenate(kept))])
        raise V.sharded_write_failed(op, shards, first) from first

    def add(self, X: Any, *, ids: Any = None) -> "ShardedIndex":
        """Add vectors to their shards; returns ``self``.

        Checked whole before any shard changes; then every shard that receives part of the
        batch takes it, or none does: a shard actor that dies on the way is restarted from its
        artefact and given its part again (once); if a shard still fails, the others are
        returned to their state before the call and the call raises.

        Parameters
        ----------
        X : array-like (m, d)
        ids : array-like of int (m,), optional
            Global ids of the new vectors (default: after the largest id so far).

        Raises
        ------
        TypeError, ValueError
            Bad vectors, ids already present, or a family without ``add``.
        ShardUnavailableError
            A shard could not take its part; no shard kept the batch.
        """
        self._require_built()
        if not self._family.supports_add:
            raise V.sharded_add_not_supported(self._family.__name__)
        X32, _ = V.as_vectors(X, "X", limit=self._metric.max_abs)
        V.check_dim(X32.shape[1], self._dim, "X")
        with self._rw.write():
            start = int(self._order.max()) + 1 if self._order.size else 0
            new = np.arange(start, start + X32.shape[0], dtype=np.int64) if ids is None else V.check_ids(ids, X32.shape[0])
            if np.isin(new, self._order).any():
                raise V.sharded_ids_present(new[np.isin(new, self._order)][:5].tolist())
            rng = np.random.default_rng([self.random_state, self._order.size])
            if self.partition == "kmeans":
                where = self._assign(self._metric.prepare(X32), rng)
            else:  # keep the shards balanced: the smallest first
                sizes = np.array([h.stats.positions for h in self._handles])
                where = np.empty(X32.shape[0], np.int64)
                for j in range(X32.shape[0]):
                    s = int(np.argmin(sizes))
                    where[j] = s
                    sizes[s] += 1
            batches = {}
            for s in range(len(self._handles)):
                rows = np.flatnonzero(where == s)
                if rows.size:
                    batches[s] = (np.ascontiguousarray(X32[rows]), new[rows])
            self._write("add", batches)
            self._order = np.concatenate([self._order, new])
        return self

    def delete(self, ids: Any) -> None:
        """Delete vectors by global id (a family with ``delete``). Checked whole first.

        Parameters
        ----------
        ids : array-like of int

        Raises
        ------
        ValueError
            An unknown or already deleted id, or an id given twice (nothing is deleted), or a
            family without delete.
        ShardUnavailableError
            A shard could not delete its part: shard actors are returned to their state before
            the call (shards in this process cannot undo a delete they completed).
        """
        self._require_built()
        if not self._family.supports_delete:
            raise V.sharded_delete_not_supported(self._family.__name__)
        arr = V.check_id_list(ids, "ids")
        with self._rw.write():
            held = np.array(self.executor.map(lambda h: h.holds(arr), self._handles)).reshape(len(self._handles), -1)
            missing = arr[~held.any(axis=0)]
            if missing.size:
                raise V.sharded_unknown_ids(missing[:5].tolist())
            if np.unique(arr).size != arr.size:
                raise V.sharded_duplicate_ids()
            batches = {s: (None, arr[held[s]]) for s in range(len(self._handles)) if held[s].any()}
            if batches:
                self._write("delete", batches)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Save to a folder (a path, or a URI with fsspec installed): ``sharded.json`` plus one
        annlib file per shard, written by the shard itself (a Ray actor writes its own file, so
        the folder must be one every node can write).

        Parameters
        ----------
        path : str or path-like

        Raises
        ------
        NotBuiltError
            Before build.
        ShardUnavailableError
            A shard could not be reached even after a restart.
        """
        self._require_built()
        folder = _absolute(os.fspath(path))
        _store.makedirs(folder)
        with self._rw.read():
            self.executor.map(lambda h: h.save(_store.join(folder, _shard_file(h.number))), self._handles)
            meta = {"format": _FORMAT, "method": self.method, "shards": self.shards, "metric": self.metric,
                    "partition": self.partition, "random_state": self.random_state, "params": self.params,
                    "dim": self._dim, "order": self._order.tolist(),
                    "centres": None if self._centres is None else self._centres.tolist()}
            _store.write_bytes(_store.join(folder, _META), json.dumps(meta).encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike, *, executor: Any = None, mmap: bool = False, address: str | None = None,
             storage: str | None = None) -> "ShardedIndex":
        """Load a folder written by :meth:`save`; every shard file is checked by ``annlib.load``.

        Parameters
        ----------
        path : str or path-like
            The folder (a path, or a URI with fsspec installed).
        executor, address, storage
            As for the constructor. With a Ray executor each actor loads its shard file from
            this folder and restarts from it, so the folder must stay in place (and readable by
            every node) while the index is used.
        mmap : bool, default False
            Memory-map the shard files instead of reading them.

        Raises
        ------
        FileNotFoundError
            No ``sharded.json`` in the folder.
        IndexFormatError
            Inconsistent metadata, or a shard that does not match it.
        """
        folder = _absolute(os.fspath(path))
        try:
            meta = json.loads(_read_meta(folder))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IndexFormatError(f"{folder}: {_META} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise IndexFormatError(f"{folder}: {_META} is not a ShardedIndex description of format {_FORMAT}")
        try:
            index = cls(meta["method"], meta["shards"], metric=meta["metric"], executor=executor,
                        partition=meta["partition"], random_state=meta["random_state"], address=address,
                        storage=storage, **meta["params"])
            index._dim = int(meta["dim"])
            index._order = np.asarray(meta["order"], dtype=np.int64)
            index._centres = None if meta["centres"] is None else np.asarray(meta["centres"], np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"{folder}: inconsistent ShardedIndex metadata ({exc})") from None
        if index._centres is not None and index._centres.shape != (index.shards, index._dim):
            raise IndexFormatError(f"{folder}: centres of shape {index._centres.shape}, expected ({index.shards}, {index._dim})")
        specs = [ShardSpec(s, index.method, index.metric, index.params,
                           location=_store.join(folder, _shard_file(s)), mmap=mmap) for s in range(index.shards)]
        index._handles = index._open(specs)
        try:
            held = np.concatenate(index.executor.map(lambda h: h.all_ids(), index._handles))
            stats = [h.stats for h in index._handles]
            if any(st.dim != index._dim or st.metric != index.metric or st.family != index.method for st in stats) \
                    or np.sort(held).tolist() != np.sort(index._order).tolist():
                raise IndexFormatError(f"{folder}: the shard files do not match {_META} (family, dimension, metric or ids)")
        except BaseException:
            index.close()
            raise
        return index



def _absolute(location: str) -> str:
    """A local path made absolute (shard actors may run in another folder); a URI as it is."""
    return location if "://" in location else os.path.abspath(location)


def _read_meta(folder: str) -> bytes:
    return _store.read_bytes(_store.join(folder, _META))
