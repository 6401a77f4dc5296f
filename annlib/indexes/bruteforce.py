"""Exact search: blocked matrix multiplication fused with a running top-k.

The ground truth for every test and the baseline every family is measured against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._progress import progress_reporter
from .._state import PreparedVectors
from ..api import Index
from ..config import get_num_threads
from ..kernels.blockwise import exact_search
from ..kernels.query import RAW_TERMS

__all__ = ["BruteForce", "BruteForceState"]


class BruteForceState(PreparedVectors):
    """Everything a built :class:`BruteForce` holds: the prepared vectors and their squared
    norms (fields, file layout and ``validate`` in :class:`annlib._state.PreparedVectors`)."""


class BruteForce(Index):
    """Exact k-NN by blocked float32 GEMM and a numba top-k (like faiss ``IndexFlat``).

    Parameters
    ----------
    metric : {"l2", "cosine", "ip"}, default "l2"

    Notes
    -----
    No build or search parameters. Supports ``add``, ``filter=``, ids, save/load (mmap).
    Memory: the vectors (4·n·d bytes) plus their squared norms (4·n bytes). The index keeps its
    own copy of the vectors: changing the array given to ``build`` or ``add`` afterwards does
    not change it, and read-only arrays (also ``np.memmap``) are accepted.
    Returned distances are recomputed directly from the vectors for the k survivors, so they are
    free of the cancellation error of the norm expansion used for ranking.
    Concurrency: searches run together; ``add`` waits for them and they for it.

    Examples
    --------
    >>> import numpy as np, annlib
    >>> X = np.random.default_rng(0).normal(size=(1000, 16)).astype("float32")
    >>> ids, dist = annlib.BruteForce.build(X).search(X[:3], k=5)
    >>> ids[:, 0].tolist()
    [0, 1, 2]
    """

    family = "bruteforce"
    supports_add = True
    # the search kernels (the build itself compiles next to nothing): uncached means the first
    # searches compile (annlib.CompilationNotice, issued at build)
    first_kernels = ("annlib.kernels.blockwise:search_one", "annlib.kernels.blockwise:fold_block_serial")

    def __init__(self, metric: str = "l2", **params: Any):
        super().__init__(metric=metric, **params)
        self._st: BruteForceState | None = None
        self._one_plan: tuple = (None, None)  # BruteForceState.one_query_plan of the current state
        self._raw_plan: tuple = (None, None)  # the same for the ordinary path's single queries

    def _build(self, X: np.ndarray, progress: Any) -> None:
        with progress_reporter(progress, X.shape[0], desc="BruteForce build", unit="vec") as report:
            st = BruteForceState.of(X)
            report(X.shape[0])
        self._st = st

    def _add(self, X: np.ndarray, progress: Any) -> None:
        # The new state is complete before it replaces the old one: a failure changes nothing.
        with progress_reporter(progress, X.shape[0], desc="BruteForce add", unit="vec") as report:
            st = self._st.appended(X)
            report(X.shape[0])
        self._st = st

    def _search(self, Q: np.ndarray, k: int, mask: np.ndarray | None, **params: Any):
        st = self._st
        if Q.shape[0] == 1:  # the one-query kernel, unless a long scan can use the threads
            plan = self._raw_plan
            if plan[0] is not st:
                plan = self._raw_plan = st.one_query_plan(None, self._metric.proxy, RAW_TERMS)
            if not plan[5] or get_num_threads() == 1:
                return BruteForceState.search_raw(plan, Q[0], k, mask)
        return exact_search(Q, st.vectors, st.sqnorms, k, self._metric.proxy, mask,
                            workers=get_num_threads())

    def _search_one(self, q, k, params, threads):
        plan = self._one_plan
        if plan[0] is not self._st or plan[1] is not self._ids:  # made again after every change
            plan = self._one_plan = self._st.one_query_plan(self._ids, self._metric.proxy, self._one_query_terms())
        return BruteForceState.search_one(plan, q, k, threads, get_num_threads)

    def _vectors_at(self, positions: np.ndarray) -> np.ndarray:
        return self._st.vectors[positions]

    def _exact_over(self, Q: np.ndarray, k: int, rows: np.ndarray):
        if rows.size == self._n_positions:  # every row: scan the stored arrays, no gathered copy
            return self._search(Q, k, None)
        return super()._exact_over(Q, k, rows)

    def _state(self):
        return self._st.to_file()

    def _restore(self, meta, arrays) -> None:
        st = BruteForceState.from_file(meta, arrays)
        st.validate(self._dim, self._n_positions, self._metric)
        self._st = st

    @classmethod
    def _search_space(cls, n, dim):
        return {"build": {}, "search": {}}
