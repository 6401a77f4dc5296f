"""Exact search: blocked matrix multiplication fused with a running top-k.

The ground truth for every test and the baseline every family is measured against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..api import Index
from ..config import get_num_threads
from ..kernels.blockwise import exact_search
from ..kernels.distances import sqnorms

__all__ = ["BruteForce"]


class BruteForce(Index):
    """Exact k-NN by blocked float32 GEMM and a numba top-k (like faiss ``IndexFlat``).

    Parameters
    ----------
    metric : {"l2", "cosine", "ip"}, default "l2"

    Notes
    -----
    No build or search parameters. Supports ``add``, ``filter=``, ids, save/load (mmap).
    Memory: the vectors (4·n·d bytes) plus their squared norms (4·n bytes).
    Returned distances are recomputed directly from the vectors for the k survivors, so they are
    free of the cancellation error of the norm expansion used for ranking.

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

    def __init__(self, metric: str = "l2", **params: Any):
        super().__init__(metric=metric, **params)
        self._X: np.ndarray | None = None
        self._sqnorm: np.ndarray | None = None

    def _build(self, X: np.ndarray, progress: Any) -> None:
        norms = sqnorms(X)
        self._X, self._sqnorm = X, norms

    def _add(self, X: np.ndarray, progress: Any) -> None:
        # Build the new arrays first, then swap, so a failure leaves the old ones in place.
        new_X = np.concatenate([self._X, X])
        new_norms = np.concatenate([self._sqnorm, sqnorms(X)])
        self._X, self._sqnorm = new_X, new_norms

    def _search(self, Q: np.ndarray, k: int, mask: np.ndarray | None, **params: Any):
        return exact_search(Q, self._X, self._sqnorm, k, self._metric.proxy, mask,
                            workers=get_num_threads())

    def _state(self):
        return {}, {"vectors": self._X, "sqnorms": self._sqnorm}

    def _restore(self, meta, arrays) -> None:
        X, norms = arrays["vectors"], arrays["sqnorms"]
        if X.ndim != 2 or norms.shape != (X.shape[0],):
            raise ValueError("vectors and sqnorms do not match")
        self._X, self._sqnorm = X, norms

    @classmethod
    def _search_space(cls, n, dim):
        return {"build": {}, "search": {}}
