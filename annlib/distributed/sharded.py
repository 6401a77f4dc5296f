"""``ShardedIndex``: one index API over several ordinary annlib indexes (shards).

The vectors are split into shards — at random, or by a k-means over a sample whose centres every
shard shares (then a query may be routed to its nearest shards only) — and each shard is an
ordinary annlib index built with the vectors' global ids, so a shard answers with global ids at
true distances. A search checks the queries once, scatters them to the shards through an
executor, and merges the per-shard top-k lists with the library's merge kernel.

Writes (``add``, ``delete``) are checked whole before any shard changes, and take the sharded
index's writer lock, so a search sees every shard before or after a write, never a mix.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .. import _validation as V
from .._locks import ReadWriteLock
from ..api import Index, SearchResult, get_family, load as load_index
from ..errors import IndexFormatError, NotBuiltError
from ..kernels.cluster import assign_nearest, kmeans
from ..kernels.blockwise import exact_search
from ..kernels.distances import sqnorms
from ..kernels.topk import merge_topk
from ..metrics import PROXY_L2SQ, get_metric
from .executors import ThreadExecutor

__all__ = ["ShardedIndex"]

_META = "sharded.json"
_FORMAT = 1
PARTITIONS = ("random", "kmeans")


def _shard_file(i: int) -> str:
    return f"shard-{i:04d}.annlib"


class ShardedIndex:
    """The ``Index`` API over ``shards`` annlib indexes of one family.

    Parameters
    ----------
    method : str, default "hnsw"
        The family of every shard (see ``annlib.families()``).
    shards : int, default 2
        Number of shards (at least 1).
    metric : {"l2", "cosine", "ip"}, default "l2"
    executor : object with ``map(fn, items)``, optional
        Runs a call on every shard; default :class:`~annlib.distributed.ThreadExecutor`.
    partition : {"random", "kmeans"}, default "random"
        How vectors are assigned: a seeded random balanced split, or the nearest of ``shards``
        k-means centres trained once on a sample (needed for ``shards_to_search``).
    random_state : int, default 0
        Seed of the split, the k-means and every shard's build.
    **params
        Build parameters of the family, passed to every shard.

    Raises
    ------
    ValueError
        Unknown method, metric or partition, ``shards`` < 1, or family parameters the family
        refuses (checked at construction).
    """

    def __init__(self, method: str = "hnsw", shards: int = 2, *, metric: str = "l2", executor: Any = None,
                 partition: str = "random", random_state: int = 0, **params: Any):
        self.method = method
        self._family = get_family(method)
        self.shards = V.check_int("shards", shards, 1)
        self._metric = get_metric(metric)
        self.partition = V.check_choice("partition", partition, list(PARTITIONS))
        self.random_state = V.resolve_seed(random_state)
        self.params = dict(params)
        self._family(metric=self._metric.name, **self.params)  # the family checks its parameters now
        self.executor = executor if executor is not None else ThreadExecutor()
        self._rw = ReadWriteLock()
        self._parts: list[Index] = []
        self._centres: np.ndarray | None = None
        self._owner: dict[int, int] | None = None  # global id -> shard, made on first need
        self._order: np.ndarray = np.zeros(0, np.int64)  # global ids in insertion order
        self._dim: int | None = None

    # ------------------------------------------------------------------ shape
    @property
    def metric(self) -> str:
        """Public metric name."""
        return self._metric.name

    @property
    def dim(self) -> int | None:
        """Vector dimension (None before build)."""
        return self._dim

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts)

    def shard_sizes(self) -> list[int]:
        """Live vectors per shard."""
        with self._rw.read():
            return [len(p) for p in self._parts]

    def __repr__(self) -> str:
        state = f"n={len(self)}, dim={self._dim}" if self._dim is not None else "not built"
        return f"ShardedIndex(method={self.method!r}, shards={self.shards}, partition={self.partition!r}) [{state}]"

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

    def build(self, X: Any, *, ids: Any = None, progress: Any = False) -> "ShardedIndex":
        """Split ``X`` into shards and build one index per shard; returns ``self``.

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
            self._centres = None
            where = self._assign(self._metric.prepare(X32), rng)
            rows = [np.flatnonzero(where == s) for s in range(self.shards)]
            if min(r.size for r in rows) == 0:
                raise V.empty_shard(self.partition)

            seeded = "random_state" in self._family.build_defaults and "random_state" not in self.params

            def build_one(s):
                extra = {"random_state": self.random_state + s} if seeded else {}
                return Index.build(np.ascontiguousarray(X32[rows[s]]), method=self.method, metric=self.metric,
                                   ids=glob[rows[s]], threads=1, progress=progress, **self.params, **extra)

            self._parts = self.executor.map(build_one, range(self.shards))
            self._order = glob.copy()
            self._owner = None
            self._dim = X32.shape[1]
        return self

    # ------------------------------------------------------------------ search
    def _require_built(self) -> None:
        if self._dim is None:
            raise NotBuiltError("this ShardedIndex has not been built; call build(X) first")

    @staticmethod
    def _live_ids(part: Index) -> np.ndarray:
        """Global ids a shard holds and has not deleted."""
        live = part._live_mask()
        positions = np.arange(part.n_positions) if live is None else np.flatnonzero(live)
        return part._external_ids(positions)

    def _owners(self) -> dict[int, int]:
        """Global id -> shard of every live vector (made on first need after a write)."""
        if self._owner is None:
            self._owner = {int(i): s for s, p in enumerate(self._parts) for i in self._live_ids(p)}
        return self._owner

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

    def search(self, Q: Any, k: int = 10, *, filter: Any = None, shards_to_search: int | None = None,
               **params: Any) -> SearchResult:
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
        **params
            The family's search parameters, passed to every shard.

        Returns
        -------
        SearchResult
            Global ids and true distances, best first; -1 / +inf where fewer than ``k`` exist.

        Raises
        ------
        TypeError, ValueError
            Bad queries, ``k``, filter or parameters — before any shard is searched.
        """
        self._require_built()
        Q32, was_1d = V.as_vectors(Q, "Q", allow_1d=True, limit=self._metric.max_abs)
        V.check_dim(Q32.shape[1], self._dim)
        with self._rw.read():
            k = V.check_k(k, len(self))
            allowed = self._allowed_ids(filter)
            if params:  # refused here, before the scatter, as every shard would refuse them
                self._parts[0]._validated_search_params(params)
            route = self._route(Q32, shards_to_search)

            def search_one(s):
                part = self._parts[s]
                rows = np.arange(Q32.shape[0]) if route is None else np.flatnonzero((route == s).any(axis=1))
                out_d = np.full((Q32.shape[0], k), np.inf, np.float32)
                out_i = np.full((Q32.shape[0], k), -1, np.int64)
                if rows.size == 0 or len(part) == 0:
                    return out_d, out_i
                sub = None if allowed is None else allowed[np.isin(allowed, self._live_ids(part))]
                kk = min(k, len(part))
                res = part.search(Q32[rows], kk, filter=sub, threads=1, **params)
                out_d[rows, :kk] = res.distances
                out_i[rows, :kk] = res.ids
                return out_d, out_i

            parts = self.executor.map(search_one, range(len(self._parts)))
        dist, ids = parts[0]
        for d, i in parts[1:]:
            dist, ids = merge_topk(dist, ids, d, i, k)
        if was_1d:
            return SearchResult(ids[0], dist[0])
        return SearchResult(ids, dist)

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
    def add(self, X: Any, *, ids: Any = None) -> "ShardedIndex":
        """Add vectors to their shards; returns ``self``. Checked whole before any shard changes.

        Raises
        ------
        TypeError, ValueError
            Bad vectors, ids already present, or a family without ``add``.
        """
        self._require_built()
        if not self._family.supports_add:
            raise ValueError(f"{self._family.__name__} does not support add")
        X32, _ = V.as_vectors(X, "X", limit=self._metric.max_abs)
        V.check_dim(X32.shape[1], self._dim, "X")
        with self._rw.write():
            start = int(self._order.max()) + 1 if self._order.size else 0
            new = np.arange(start, start + X32.shape[0], dtype=np.int64) if ids is None else V.check_ids(ids, X32.shape[0])
            if np.isin(new, self._order).any():
                raise ValueError(f"ids already in the index: {new[np.isin(new, self._order)][:5].tolist()}")
            rng = np.random.default_rng([self.random_state, self._order.size])
            if self.partition == "kmeans":
                where = self._assign(self._metric.prepare(X32), rng)
            else:  # keep the shards balanced: the smallest first
                sizes = np.array([p.n_positions for p in self._parts])
                where = np.empty(X32.shape[0], np.int64)
                for j in range(X32.shape[0]):
                    s = int(np.argmin(sizes))
                    where[j] = s
                    sizes[s] += 1

            def add_one(s):
                rows = np.flatnonzero(where == s)
                if rows.size:
                    self._parts[s].add(np.ascontiguousarray(X32[rows]), ids=new[rows], threads=1)

            self.executor.map(add_one, range(len(self._parts)))
            self._order = np.concatenate([self._order, new])
            self._owner = None
        return self

    def delete(self, ids: Any) -> None:
        """Delete vectors by global id (a family with ``delete``). Checked whole first.

        Raises
        ------
        ValueError
            An unknown or already deleted id (nothing is deleted), or a family without delete.
        """
        self._require_built()
        if not self._family.supports_delete:
            raise ValueError(f"{self._family.__name__} does not support delete")
        arr = V.check_id_list(ids, "ids")
        with self._rw.write():
            owners = self._owners()
            missing = [int(i) for i in arr if int(i) not in owners]
            if missing:
                raise V.sharded_unknown_ids(missing[:5])
            if np.unique(arr).size != arr.size:
                raise V.sharded_duplicate_ids()
            groups = {}
            for i in arr:
                groups.setdefault(owners[int(i)], []).append(int(i))
            for s, group in groups.items():
                self._parts[s].delete(np.asarray(group, np.int64))
            self._owner = None

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Save to a folder: ``sharded.json`` plus one annlib file per shard.

        Raises
        ------
        NotBuiltError
            Before build.
        """
        self._require_built()
        folder = os.fspath(path)
        os.makedirs(folder, exist_ok=True)
        with self._rw.read():
            for s, part in enumerate(self._parts):
                part.save(os.path.join(folder, _shard_file(s)))
            meta = {"format": _FORMAT, "method": self.method, "shards": self.shards, "metric": self.metric,
                    "partition": self.partition, "random_state": self.random_state, "params": self.params,
                    "dim": self._dim, "order": self._order.tolist(),
                    "centres": None if self._centres is None else self._centres.tolist()}
            tmp = os.path.join(folder, _META + ".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(meta, fh)
            os.replace(tmp, os.path.join(folder, _META))

    @classmethod
    def load(cls, path: str | os.PathLike, *, executor: Any = None, mmap: bool = False) -> "ShardedIndex":
        """Load a folder written by :meth:`save`; every shard file is checked by ``annlib.load``.

        Raises
        ------
        FileNotFoundError
            No ``sharded.json`` in the folder.
        IndexFormatError
            Inconsistent metadata, or a shard that does not match it.
        """
        folder = os.fspath(path)
        try:
            with open(os.path.join(folder, _META), encoding="utf-8") as fh:
                meta = json.load(fh)
        except json.JSONDecodeError as exc:
            raise IndexFormatError(f"{folder}: {_META} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise IndexFormatError(f"{folder}: {_META} is not a ShardedIndex description of format {_FORMAT}")
        try:
            index = cls(meta["method"], meta["shards"], metric=meta["metric"], executor=executor,
                        partition=meta["partition"], random_state=meta["random_state"], **meta["params"])
            index._parts = [load_index(os.path.join(folder, _shard_file(s)), mmap=mmap) for s in range(index.shards)]
            index._dim = int(meta["dim"])
            index._order = np.asarray(meta["order"], dtype=np.int64)
            index._centres = None if meta["centres"] is None else np.asarray(meta["centres"], np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, IndexFormatError):
                raise
            raise IndexFormatError(f"{folder}: inconsistent ShardedIndex metadata ({exc})") from None
        held = np.concatenate([p._external_ids(np.arange(p.n_positions)) for p in index._parts])
        if any(p.dim != index._dim or p.metric != index.metric or p.family != index.method for p in index._parts) \
                or np.sort(held).tolist() != np.sort(index._order).tolist():
            raise IndexFormatError(f"{folder}: the shard files do not match {_META} (family, dimension, metric or ids)")
        if index._centres is not None and index._centres.shape != (index.shards, index._dim):
            raise IndexFormatError(f"{folder}: centres of shape {index._centres.shape}, expected ({index.shards}, {index._dim})")
        return index
