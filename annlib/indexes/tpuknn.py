"""TPU-KNN: brute-force matmul scoring with a bin-wise approximate top-k, in JAX.

A thin wrapper: it validates, keeps the vectors (for persistence, the exact path and the final
re-scoring) and hands the search to :mod:`annlib.accel.tpuknn`, imported on first use so that
``import annlib`` never imports jax.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .. import _validation as V
from .._progress import progress_reporter
from .._state import PreparedVectors
from ..api import Index
from ..config import get_num_threads
from ..kernels.blockwise import exact_search
from ..kernels.distances import rows_proxy
from ..kernels.query import RAW_TERMS
from ..metrics import PROXY_L2SQ

__all__ = ["TPUKNN", "TPUKNNState"]

DTYPES = ["float32", "bfloat16"]


class TPUKNNState(PreparedVectors):
    """The host side of a built :class:`TPUKNN` (the device copy is made from it when needed):
    the prepared vectors — saved, searched by the CPU's exact path, and used to re-score the
    device's candidates in float32 — and their squared norms (fields, file layout and
    ``validate`` in :class:`annlib._state.PreparedVectors`)."""

    def terms(self, proxy: int) -> np.ndarray:
        """Per-row score term: ``||x||^2 / 2`` for squared L2, 0 for inner product."""
        if proxy == PROXY_L2SQ:
            return (self.sqnorms * np.float32(0.5)).astype(np.float32)
        return np.zeros(self.sqnorms.shape[0], dtype=np.float32)


class TPUKNN(Index):
    """Brute-force k-NN at matmul speed with an expected-recall guarantee (TPU-KNN, JAX).

    Every query is scored against every vector by one matmul per database block; the scores are
    folded into ``L`` bins (row ``j`` in bin ``j mod L``), the best of each bin is kept, and the
    top-``k`` of the bin winners is returned after exact float32 re-scoring. ``L`` follows XLA's
    rule for ``jax.lax.approx_min_k`` so that the *expected* recall (averaged over queries) is at
    least ``recall_target``; ``recall_target=1.0`` is exact search and equals :class:`BruteForce`.
    The database is sharded over ``jax.devices()``; no training, ``add`` is cheap.

    Parameters
    ----------
    metric : {"l2", "cosine", "ip"}, default "l2"
    dtype : {"float32", "bfloat16"}, default "float32"
        Type of the device copy of the vectors and of the matmul (float32 accumulation).
        bfloat16 halves device memory and is fast where the hardware multiplies bfloat16 (TPU,
        recent GPUs); rankings near ties change, the returned k are re-scored in float32.
    recall_target : float in (0, 1], default 0.95
        Default expected recall of ``search``; more bins (slower selection) for higher targets.
    shards : int, optional
        Number of devices to split the database over (default: all of ``jax.devices()``).

    Search parameters
    -----------------
    recall_target : float in (0, 1], optional
        Overrides the build default for one call.

    Raises
    ------
    ValueError
        Unknown dtype, recall_target outside (0, 1], shards < 1 or more than the devices.

    Notes
    -----
    Memory: the float32 vectors and their squared norms on the host (4·n·d + 4·n bytes) plus the
    device copy (n·d·4 or ·2 bytes, padded to whole blocks). The guarantee is an expectation over
    queries for data whose order is unrelated to the queries; a database sorted by cluster is
    fine (strided bins spread runs), one periodic with period ``L`` is not. JAX uses its own
    thread pool: ``threads=`` only limits the re-scoring.
    The index keeps its own copy of the vectors: changing the array given to ``build`` or
    ``add`` afterwards does not change it, and read-only arrays (also ``np.memmap``) are accepted.
    Concurrency: searches run together; ``add`` waits for them and they for it, and the device
    copy is replaced, never modified, so a search always scores one consistent database.
    One query per call on the CPU backend is answered exactly by BruteForce's one-query kernel
    (numba), faster there than a JAX call (docs/tpuknn.md); exact results meet every target.

    Examples
    --------
    >>> import numpy as np, annlib
    >>> X = np.random.default_rng(0).normal(size=(5000, 32)).astype("float32")
    >>> index = annlib.TPUKNN(recall_target=0.95).build(X)   # doctest: +SKIP
    >>> ids, dist = index.search(X[:3], k=10)                 # doctest: +SKIP
    >>> ids[:, 0].tolist()                                    # doctest: +SKIP
    [0, 1, 2]
    """

    family = "tpuknn"
    build_defaults = {"dtype": "float32", "recall_target": 0.95, "shards": None}
    search_defaults = {"recall_target": None}
    supports_add = True
    # the CPU's exact search kernels (as BruteForce): uncached means the first searches compile
    first_kernels = ("annlib.kernels.blockwise:search_one",)

    def __init__(self, metric: str = "l2", **params: Any):
        super().__init__(metric=metric, **params)
        self._st: TPUKNNState | None = None
        self._db = None  # annlib.accel.sharding.DeviceDatabase of self._st, made on first need
        self._db_lock = threading.Lock()  # searches (readers) may race to make it after a load
        self._one_plan: tuple = (None, None)  # TPUKNNState.one_query_plan (CPU backend only)
        self._raw_plan: tuple = (None, None)  # the same for the ordinary path's single queries

    # ----------------------------------------------------------------- parameters
    def _check_build_params(self, params):
        V.check_choice("dtype", params["dtype"], DTYPES)
        params["recall_target"] = V.check_float("recall_target", params["recall_target"], 0.0, 1.0, low_open=True)
        if params["shards"] is not None:
            params["shards"] = V.check_int("shards", params["shards"], 1)
        return params

    def _check_search_params(self, params):
        if params["recall_target"] is None:
            params["recall_target"] = self.params["recall_target"]
        params["recall_target"] = V.check_float("recall_target", params["recall_target"], 0.0, 1.0, low_open=True)
        return params

    # ----------------------------------------------------------------- state
    def _make_db(self, st: TPUKNNState):
        try:
            from ..accel.sharding import DeviceDatabase
        except ImportError as exc:  # jax is an optional extra
            raise V.missing_extra("TPUKNN", "jax", exc) from None

        return DeviceDatabase(st.vectors, st.terms(self._metric.proxy), dtype=self.params["dtype"],
                              shards=self.params["shards"])

    def _device_db(self):
        """The device copy of the vectors (made again on first use after load)."""
        with self._db_lock:
            if self._db is None:
                self._db = self._make_db(self._st)
            return self._db

    def _build(self, X: np.ndarray, progress: Any) -> None:
        with progress_reporter(progress, 1, desc="TPUKNN build", unit="step") as report:
            st = TPUKNNState.of(X)
            db = self._make_db(st)  # raises (e.g. too many shards) before anything changes
            report(1)
        self._st, self._db = st, db

    def _add(self, X: np.ndarray, progress: Any) -> None:
        # New host state and device copy first, then swap both: a failure changes nothing, and
        # the old device copy is never modified.
        with progress_reporter(progress, 1, desc="TPUKNN add", unit="step") as report:
            st = self._st.appended(X)
            db = self._db
            if db is not None:
                db = db.appended(X.shape[0], st.vectors, st.terms(self._metric.proxy))
            report(1)
        self._st, self._db = st, db

    def _state(self):
        return self._st.to_file()

    def _restore(self, meta, arrays) -> None:
        st = TPUKNNState.from_file(meta, arrays)
        st.validate(self._dim, self._n_positions, self._metric)
        self._st, self._db = st, None

    def memory_bytes(self) -> int:
        """Bytes of the host arrays plus the device copy of the vectors."""
        self._require_built()
        with self._rw.read():
            host = sum(int(a.nbytes) for a in self._st.to_file()[1].values())
            ids = 0 if self._ids is None else int(self._ids.nbytes)
            return host + ids + (self._db.nbytes() if self._db is not None else 0)

    # ----------------------------------------------------------------- search
    def _on_cpu(self) -> bool:
        """Whether JAX's default backend is the CPU (asked once per index: asking costs microseconds)."""
        on_cpu = self.__dict__.get("_backend_is_cpu")
        if on_cpu is None:
            from ..accel.sharding import backend_platform

            on_cpu = self.__dict__["_backend_is_cpu"] = backend_platform() == "cpu"
        return on_cpu

    def _search_one(self, q, k, params, threads):
        # One query on the CPU backend is answered exactly by BruteForce's one-query kernel:
        # faster than a JAX dispatch at every size measured (docs/tpuknn.md), and exact results
        # meet any recall target.
        plan = self._one_plan
        if plan[0] is not self._st or plan[1] is not self._ids:  # made again after every change
            if not self._on_cpu():
                return None
            plan = self._one_plan = self._st.one_query_plan(self._ids, self._metric.proxy, self._one_query_terms())
        return TPUKNNState.search_one(plan, q, k, threads, get_num_threads)

    def _search(self, Q: np.ndarray, k: int, mask: np.ndarray | None, recall_target: float):
        from ..accel import tpuknn as accel

        st = self._st
        proxy = self._metric.proxy
        if Q.shape[0] == 1 and self._on_cpu():
            # a single query on the CPU: the exact numba path (see _search_one), filters included
            plan = self._raw_plan
            if plan[0] is not st:
                plan = self._raw_plan = st.one_query_plan(None, proxy, RAW_TERMS)
            if not plan[5] or get_num_threads() == 1:
                return TPUKNNState.search_raw(plan, Q[0], k, mask)
            return exact_search(Q, st.vectors, st.sqnorms, k, proxy, mask, workers=get_num_threads())
        allowed = st.vectors.shape[0] if mask is None else int(np.count_nonzero(mask))
        if allowed == 0:
            return np.full((Q.shape[0], k), np.inf, np.float32), np.full((Q.shape[0], k), -1, np.int64)
        mode = accel.choose_mode(allowed, k, recall_target)
        if mode == "exact" and self._on_cpu():
            # The CPU's exact path is BruteForce's kernel: same results, faster than XLA's sort.
            return exact_search(Q, st.vectors, st.sqnorms, k, proxy, mask, workers=get_num_threads())
        db = self._device_db()
        terms = None
        if mask is not None:
            terms = db.put_terms(np.where(mask, st.terms(proxy), np.float32(np.inf)))
        _, rows = accel.search(db, Q, k, recall_target, terms=terms, mode=mode, n_effective=allowed)
        # Exact float32 re-scoring of the k survivors, as BruteForce returns them.
        dist = rows_proxy(Q, st.vectors, rows, proxy)
        order = np.argsort(dist, axis=1, kind="stable")
        return np.take_along_axis(dist, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def _scan_is_cheaper(self, n_allowed: int, k: int, params: dict[str, Any]) -> bool:
        # Where the exact path runs on the host (CPU backend), a filter that leaves few rows is
        # answered by scanning only those rows rather than the whole database with a mask.
        from ..accel import tpuknn as accel
        from ..accel.sharding import backend_platform

        return (n_allowed * 4 <= self._n_positions
                and accel.choose_mode(n_allowed, k, params["recall_target"]) == "exact"
                and backend_platform() == "cpu")

    def _vectors_at(self, positions: np.ndarray) -> np.ndarray:
        return self._st.vectors[positions]

    def _exact_over(self, Q: np.ndarray, k: int, rows: np.ndarray):
        if rows.size == self._n_positions:  # every row: scan the stored arrays, no gathered copy
            st = self._st
            return exact_search(Q, st.vectors, st.sqnorms, k, self._metric.proxy, workers=get_num_threads())
        return super()._exact_over(Q, k, rows)

    @classmethod
    def _search_space(cls, n, dim):
        return {"build": {}, "search": {"recall_target": [0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 1.0]}}
