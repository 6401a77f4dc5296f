"""What a benchmark run measures: recall@k as ann-benchmarks defines it, timings, sizes.

Recall is computed the way ann-benchmarks computes it, so our figures can be set beside
theirs: the distance of every returned id is recomputed from the raw vectors (an index cannot
report flattering distances), and a returned id counts when that distance is within the true
k-th distance plus ``1e-3``. That threshold makes the measure tie-tolerant: when several points
sit at the k-th distance, any of them is a correct answer.

The distances here are recomputed with plain numpy in float64, independently of the library's
own kernels, so a kernel bug cannot hide itself in the measurement.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

__all__ = [
    "EPSILON",
    "canonical_metric",
    "check_unique_ids",
    "recompute_distances",
    "recall_per_query",
    "recall_at_k",
    "true_kth_distances",
    "qps",
    "best_time",
    "path_bytes",
]

#: Slack added to the true k-th distance before counting a result, as in ann-benchmarks.
EPSILON = 1e-3

_METRIC_ALIASES = {
    "l2": "l2",
    "euclidean": "l2",
    "cosine": "cosine",
    "angular": "cosine",
    "ip": "ip",
    "dot": "ip",
}

# Rows of gathered vectors per block when recomputing distances: bounds the temporary
# (block, k, d) array to a few tens of MB whatever q, k and d are.
_GATHER_ELEMENTS = 8_000_000


def canonical_metric(metric: str) -> str:
    """Map a metric name or an ann-benchmarks ``distance`` attribute to ``l2``/``cosine``/``ip``.

    Parameters
    ----------
    metric : str
        ``"l2"``/``"euclidean"``, ``"cosine"``/``"angular"`` or ``"ip"``/``"dot"``.

    Returns
    -------
    str
        The annlib metric name.

    Raises
    ------
    ValueError
        For any other name; the message lists the accepted names.
    """
    try:
        return _METRIC_ALIASES[str(metric).lower()]
    except KeyError:
        accepted = ", ".join(sorted(_METRIC_ALIASES))
        raise ValueError(f"metric must be one of {accepted}; got {metric!r}") from None


def check_unique_ids(ids: np.ndarray) -> None:
    """Raise when a row of returned ids names the same point twice.

    An index that returns a point twice would otherwise be credited twice for it. Padding ids
    (``-1``) may repeat.

    Parameters
    ----------
    ids : ndarray of int, shape (q, k)
        Returned ids, one row per query.

    Raises
    ------
    ValueError
        Naming the first offending row and the repeated id.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] < 2:
        return
    ordered = np.sort(ids, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    rows = np.flatnonzero(repeated.any(axis=1))
    if rows.size:
        row = int(rows[0])
        dup = int(ordered[row, 1:][repeated[row]][0])
        raise ValueError(
            f"returned ids must be unique within a row; row {row} contains id {dup} more "
            f"than once ({rows.size} row(s) affected)"
        )


def _as_ids(ids: np.ndarray, n: int) -> np.ndarray:
    """Return ids as a 2-D int64 array, checking they name points of the train set."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2:
        raise ValueError(f"ids must be a 2-D array (queries, k); got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers; got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    bad = (ids < -1) | (ids >= n)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"returned id {int(ids[row, col])} in row {int(row)} is outside 0..{n - 1} "
            "(and is not the padding id -1)"
        )
    return ids


def recompute_distances(
    train: np.ndarray, queries: np.ndarray, ids: np.ndarray, metric: str
) -> np.ndarray:
    """Distances from each query to each of its returned points, from the raw vectors.

    Parameters
    ----------
    train : ndarray, shape (n, d)
        The indexed vectors as stored in the data set (unnormalised for angular data).
    queries : ndarray, shape (q, d)
    ids : ndarray of int, shape (q, k)
        Returned ids; ``-1`` marks padding.
    metric : str
        ``l2`` (Euclidean, not squared), ``cosine`` (1 - cosine) or ``ip`` (minus the dot
        product), or their ann-benchmarks names.

    Returns
    -------
    ndarray of float64, shape (q, k)
        ``+inf`` where the id is ``-1``, so padding never counts as a hit.
    """
    metric = canonical_metric(metric)
    train = np.asarray(train)
    queries = np.asarray(queries)
    if queries.ndim == 1:
        queries = queries[None, :]
    ids = _as_ids(ids, train.shape[0])
    if ids.shape[0] != queries.shape[0]:
        raise ValueError(f"got {ids.shape[0]} rows of ids for {queries.shape[0]} queries")
    q, k = ids.shape
    out = np.full((q, k), np.inf)
    if k == 0:
        return out
    block = max(1, _GATHER_ELEMENTS // max(1, k * train.shape[1]))
    for lo in range(0, q, block):
        hi = min(q, lo + block)
        rows = ids[lo:hi]
        valid = rows >= 0
        x = train[np.where(valid, rows, 0)].astype(np.float64)  # (b, k, d)
        v = queries[lo:hi].astype(np.float64)[:, None, :]  # (b, 1, d)
        if metric == "l2":
            dist = np.sqrt(np.sum((x - v) ** 2, axis=2))
        elif metric == "ip":
            dist = -np.sum(x * v, axis=2)
        else:
            norms = np.linalg.norm(x, axis=2) * np.linalg.norm(v, axis=2)
            dots = np.sum(x * v, axis=2)
            # A zero vector has no direction; call it orthogonal to everything (distance 1)
            # rather than letting 0/0 turn into NaN, which would never count.
            with np.errstate(invalid="ignore", divide="ignore"):
                dist = np.where(norms > 0, 1.0 - dots / np.where(norms > 0, norms, 1.0), 1.0)
        out[lo:hi] = np.where(valid, dist, np.inf)
    return out


def true_kth_distances(
    k: int,
    *,
    distances: np.ndarray | None = None,
    neighbors: np.ndarray | None = None,
    train: np.ndarray | None = None,
    queries: np.ndarray | None = None,
    metric: str | None = None,
) -> np.ndarray:
    """The exact k-th nearest distance of every query.

    Taken from the data set's ``distances`` when it has them, otherwise recomputed from its
    exact ``neighbors``.

    Returns
    -------
    ndarray of float64, shape (q,)
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if distances is not None:
        distances = np.asarray(distances)
        if distances.shape[1] < k:
            raise ValueError(
                f"the ground truth holds {distances.shape[1]} neighbours per query; k={k} asks "
                "for more"
            )
        return distances[:, k - 1].astype(np.float64)
    if neighbors is None or train is None or queries is None or metric is None:
        raise ValueError("give either distances or neighbors with train, queries and metric")
    neighbors = np.asarray(neighbors)
    if neighbors.shape[1] < k:
        raise ValueError(
            f"the ground truth holds {neighbors.shape[1]} neighbours per query; k={k} asks for more"
        )
    exact = recompute_distances(train, queries, neighbors[:, :k], metric)
    return np.sort(exact, axis=1)[:, k - 1]


def recall_per_query(
    ids: np.ndarray,
    train: np.ndarray,
    queries: np.ndarray,
    kth_distance: np.ndarray,
    metric: str,
    k: int,
    epsilon: float = EPSILON,
) -> np.ndarray:
    """Fraction of the first ``k`` returned ids within the true k-th distance + ``epsilon``.

    Parameters
    ----------
    ids : ndarray of int, shape (q, >=k) or (k,)
        Returned ids, best first; only the first ``k`` columns are scored. Rows shorter than
        ``k`` score their missing entries as misses, like ``-1`` padding.
    train, queries : ndarray
        The raw vectors the distances are recomputed from.
    kth_distance : ndarray, shape (q,)
        The true k-th nearest distance of each query (see :func:`true_kth_distances`).
    metric : str
    k : int
    epsilon : float
        Tie tolerance, ``1e-3`` in ann-benchmarks.

    Returns
    -------
    ndarray of float64, shape (q,)

    Raises
    ------
    ValueError
        When a row repeats an id, or an id is outside the train set.
    """
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    ids = ids[:, :k]
    check_unique_ids(ids)
    dist = recompute_distances(train, queries, ids, metric)
    threshold = np.asarray(kth_distance, dtype=np.float64)[:, None] + epsilon
    hits = np.sum(dist <= threshold, axis=1)
    return hits / float(k)


def recall_at_k(
    ids: np.ndarray,
    train: np.ndarray,
    queries: np.ndarray,
    kth_distance: np.ndarray,
    metric: str,
    k: int,
    epsilon: float = EPSILON,
) -> float:
    """Mean recall@k over the queries (see :func:`recall_per_query`)."""
    return float(np.mean(recall_per_query(ids, train, queries, kth_distance, metric, k, epsilon)))


def qps(n_queries: int, seconds: float) -> float:
    """Queries per second; ``inf`` when the clock saw no time pass."""
    return n_queries / seconds if seconds > 0 else float("inf")


def best_time(
    fn: Callable[[], Any],
    *,
    min_reps: int = 3,
    min_seconds: float = 0.5,
    max_reps: int = 10_000,
) -> tuple[float, int, Any]:
    """Call ``fn`` repeatedly and keep its fastest wall-clock time.

    The best of several repetitions is the figure least disturbed by other jobs on a shared
    machine. Repetitions continue until both ``min_reps`` calls were made and ``min_seconds``
    were spent, so very fast calls are still timed over a useful span.

    Returns
    -------
    best_seconds : float
    reps : int
    result : object
        What the last call returned.
    """
    best = float("inf")
    total = 0.0
    reps = 0
    result = None
    while reps < max_reps and (reps < min_reps or total < min_seconds):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        total += elapsed
        reps += 1
    return best, reps, result


def path_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a file, or of every file below a directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(path)
            for name in names
        )
    return os.path.getsize(path)
