"""Recall and cost measured by real searches: the held-out check and the 1-D tuners."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

__all__ = ["recall_at_k", "seconds_per_query"]

# ann-benchmarks counts a returned neighbour when its distance is within the true k-th distance
# plus a small epsilon, so ties at the k-th distance do not count as misses. Relative plus
# absolute slack keeps that true at any scale of the data.
_REL_EPS = 1e-4
_ABS_EPS = 1e-6


def recall_at_k(distances: np.ndarray, true_kth: np.ndarray, ids: np.ndarray | None = None) -> float:
    """ann-benchmarks recall@k: the share of returned neighbours within the true k-th distance.

    Parameters
    ----------
    distances : ndarray (q, k)
        Distances returned by a search (+inf for padding).
    true_kth : ndarray (q,)
        Exact k-th smallest distance of each query.
    ids : ndarray (q, k), optional
        Returned ids; -1 (padding) never counts.
    """
    threshold = true_kth[:, None] + _REL_EPS * np.abs(true_kth[:, None]) + _ABS_EPS
    hit = distances <= threshold
    if ids is not None:
        hit &= ids >= 0
    return float(hit.mean())


def per_query_recall(distances: np.ndarray, true_kth: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """Recall@k of each query (see :func:`recall_at_k`)."""
    threshold = true_kth[:, None] + _REL_EPS * np.abs(true_kth[:, None]) + _ABS_EPS
    hit = distances <= threshold
    if ids is not None:
        hit &= ids >= 0
    return hit.mean(axis=1)


def seconds_per_query(index: Any, Q: np.ndarray, k: int, params: dict[str, Any], repeats: int = 2) -> float:
    """Best-of-``repeats`` wall time of one batch search of ``Q``, per query, one thread."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        index.search(Q, k, threads=1, **params)
        best = min(best, time.perf_counter() - t0)
    return best / Q.shape[0]
