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
from ..api import Index
from ..kernels.blockwise import exact_search
from ..kernels.distances import rows_proxy, sqnorms
from ..metrics import PROXY_L2SQ

__all__ = ["TPUKNN"]

DTYPES = ["float32", "bfloat16"]


def _done(progress: Any) -> None:
    """Build and add are one step each: report it to a progress callable."""
    if callable(progress) and not isinstance(progress, bool):
        progress(1, 1)


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

    def __init__(self, metric: str = "l2", **params: Any):
        super().__init__(metric=metric, **params)
        self._X: np.ndarray | None = None
        self._sqnorm: np.ndarray | None = None
        self._db = None  # annlib.accel.sharding.DeviceDatabase, made on first need
        self._db_lock = threading.Lock()

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
    def _terms(self, X=None, norms=None) -> np.ndarray:
        """Per-row score term: ||x||^2 / 2 for squared L2, 0 for inner product."""
        norms = self._sqnorm if norms is None else norms
        if self._metric.proxy == PROXY_L2SQ:
            return (norms * np.float32(0.5)).astype(np.float32)
        return np.zeros(norms.shape[0], dtype=np.float32)

    def _make_db(self, X: np.ndarray, norms: np.ndarray):
        from ..accel.sharding import DeviceDatabase

        return DeviceDatabase(X, self._terms(norms=norms), dtype=self.params["dtype"],
                              shards=self.params["shards"])

    def _device_db(self):
        """The device copy of the vectors (made again on first use after load)."""
        with self._db_lock:
            if self._db is None:
                self._db = self._make_db(self._X, self._sqnorm)
            return self._db

    def _build(self, X: np.ndarray, progress: Any) -> None:
        norms = sqnorms(X)
        db = self._make_db(X, norms)  # raises (e.g. too many shards) before anything changes
        self._X, self._sqnorm, self._db = X, norms, db
        _done(progress)

    def _add(self, X: np.ndarray, progress: Any) -> None:
        # New arrays first, then swap, so a failure leaves the index as it was.
        norms = sqnorms(X)
        new_X = np.concatenate([self._X, X])
        new_norms = np.concatenate([self._sqnorm, norms])
        if self._db is not None:
            self._db.append(X, self._terms(norms=norms), new_X, self._terms(norms=new_norms))
        self._X, self._sqnorm = new_X, new_norms
        _done(progress)

    def _state(self):
        return {}, {"vectors": self._X, "sqnorms": self._sqnorm}

    def _restore(self, meta, arrays) -> None:
        X, norms = arrays["vectors"], arrays["sqnorms"]
        if X.ndim != 2 or norms.shape != (X.shape[0],):
            raise ValueError("vectors and sqnorms do not match")
        self._X, self._sqnorm, self._db = X, norms, None

    def memory_bytes(self) -> int:
        """Bytes of the host arrays plus the device copy of the vectors."""
        host = super().memory_bytes()
        return host + (self._db.nbytes() if self._db is not None else 0)

    # ----------------------------------------------------------------- search
    def _search(self, Q: np.ndarray, k: int, mask: np.ndarray | None, recall_target: float):
        from ..accel import tpuknn as accel
        from ..accel.sharding import backend_platform

        n = self._X.shape[0]
        allowed = n if mask is None else int(np.count_nonzero(mask))
        if allowed == 0:
            return np.full((Q.shape[0], k), np.inf, np.float32), np.full((Q.shape[0], k), -1, np.int64)
        mode = accel.choose_mode(allowed, k, recall_target)
        if mode == "exact" and backend_platform() == "cpu":
            # The CPU's exact path is BruteForce's kernel: same results, faster than XLA's sort.
            return self._exact_host(Q, k, mask, allowed)
        db = self._device_db()
        terms = None
        if mask is not None:
            terms = db.put_terms(np.where(mask, self._terms(), np.float32(np.inf)))
        _, rows = accel.search(db, Q, k, recall_target, terms=terms, mode=mode, n_effective=allowed)
        # Exact float32 re-scoring of the k survivors, as BruteForce returns them.
        dist = rows_proxy(Q, self._X, rows, self._metric.proxy)
        order = np.argsort(dist, axis=1, kind="stable")
        return np.take_along_axis(dist, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def _exact_host(self, Q, k, mask, allowed):
        proxy = self._metric.proxy
        if mask is None or allowed * 4 > mask.shape[0]:
            return exact_search(Q, self._X, self._sqnorm, k, proxy, mask)
        rows = np.flatnonzero(mask)  # few rows allowed: search only those
        kk = min(k, allowed)
        dist, pos = exact_search(Q, np.ascontiguousarray(self._X[rows]), self._sqnorm[rows], kk, proxy)
        out_d = np.full((Q.shape[0], k), np.inf, np.float32)
        out_i = np.full((Q.shape[0], k), -1, np.int64)
        out_d[:, :kk], out_i[:, :kk] = dist, np.where(pos >= 0, rows[np.maximum(pos, 0)], -1)
        return out_d, out_i

    @classmethod
    def _search_space(cls, n, dim):
        return {"build": {}, "search": {"recall_target": [0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 1.0]}}
