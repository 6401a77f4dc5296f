"""k-means clustering: BLAS-blocked nearest-centre assignment, Lloyd updates, seeding.

Used for the leaves of the partitioned index (many centres, full dimension) and, through
:func:`kmeans_small`, for product-quantization codebooks (16 centres in 1-4 dimensions, where a
direct loop beats BLAS). Distances are squared L2; assignment uses the expansion
``||x - c||^2 = ||x||^2 - 2<x, c> + ||c||^2`` with the ``||x||^2`` term dropped (it does not change
the arg-min), so one GEMM per block of points does the heavy work.
"""

from __future__ import annotations

import numba
import numpy as np

from .threads import run_split

__all__ = [
    "assign_nearest",
    "assign_top2",
    "kmeans",
    "kmeans_small",
    "kmeanspp_init",
]

# Points per GEMM block in the assignment passes: a 4096 x 1024 float32 score block is 16 MiB at
# most, and smaller for the usual leaf counts.
ASSIGN_BLOCK = 4096
# Fewest points a worker thread of the assignment passes gets (below it one thread does it all).
MIN_SPLIT_POINTS = 1024


@numba.njit(cache=True, nogil=True)
def _argmin_block(S, cnorm, out_idx, out_val, offset):
    # value of centre j for point i: ||c_j||^2 - 2 <x_i, c_j>
    for i in range(S.shape[0]):
        best = np.inf
        arg = 0
        row = S[i]
        for j in range(row.shape[0]):
            v = cnorm[j] - 2.0 * row[j]
            if v < best:
                best = v
                arg = j
        out_idx[offset + i] = arg
        out_val[offset + i] = best


@numba.njit(cache=True, nogil=True)
def _argmin2_block(S, cnorm, out_idx, offset):
    for i in range(S.shape[0]):
        b0 = np.inf
        b1 = np.inf
        a0 = 0
        a1 = -1
        row = S[i]
        for j in range(row.shape[0]):
            v = cnorm[j] - 2.0 * row[j]
            if v < b1:
                if v < b0:
                    b1 = b0
                    a1 = a0
                    b0 = v
                    a0 = j
                else:
                    b1 = v
                    a1 = j
        out_idx[offset + i, 0] = a0
        out_idx[offset + i, 1] = a1


def assign_nearest(X: np.ndarray, C: np.ndarray, block: int = ASSIGN_BLOCK, *,
                   threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre (squared L2) of every row of ``X``.

    Parameters
    ----------
    X : float32 (n, d)
    C : float32 (k, d)
    block : int, default 4096
        Rows per GEMM block.
    threads : int, default 1
        Worker threads; the rows are split into one contiguous range per thread, each running
        single-threaded GEMM and the serial arg-min (the result does not depend on it).

    Returns
    -------
    (int32 (n,), float32 (n,))
        Index of the nearest centre, and ``||c||^2 - 2<x, c>`` for it (add ``||x||^2`` for the
        squared distance).
    """
    n = X.shape[0]
    cnorm = np.einsum("ij,ij->i", C, C).astype(np.float32)
    idx = np.empty(n, dtype=np.int32)
    val = np.empty(n, dtype=np.float32)

    def rows(lo, hi):
        for s in range(lo, hi, block):
            e = min(hi, s + block)
            _argmin_block(X[s:e] @ C.T, cnorm, idx, val, s)

    run_split(rows, n, threads, MIN_SPLIT_POINTS)
    return idx, val


def assign_top2(X: np.ndarray, C: np.ndarray, block: int = ASSIGN_BLOCK, *, threads: int = 1) -> np.ndarray:
    """The two nearest centres (squared L2) of every row of ``X``, nearest first.

    ``threads`` splits the rows over worker threads as in :func:`assign_nearest`.

    Returns
    -------
    int32 (n, 2)
        Column 1 is -1 when there is a single centre.
    """
    n = X.shape[0]
    cnorm = np.einsum("ij,ij->i", C, C).astype(np.float32)
    out = np.empty((n, 2), dtype=np.int32)

    def rows(lo, hi):
        for s in range(lo, hi, block):
            e = min(hi, s + block)
            _argmin2_block(X[s:e] @ C.T, cnorm, out, s)

    run_split(rows, n, threads, MIN_SPLIT_POINTS)
    return out


@numba.njit(cache=True, nogil=True)
def _accumulate(X, labels, k):
    d = X.shape[1]
    sums = np.zeros((k, d), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    for i in range(X.shape[0]):
        c = labels[i]
        counts[c] += 1
        for t in range(d):
            sums[c, t] += X[i, t]
    return sums, counts


@numba.njit(cache=True, nogil=True)
def _min_sqdist_update(X, c, mind):
    # mind[i] = min(mind[i], ||x_i - c||^2); returns the new total
    total = 0.0
    for i in range(X.shape[0]):
        acc = 0.0
        for t in range(X.shape[1]):
            diff = X[i, t] - c[t]
            acc += diff * diff
        if acc < mind[i]:
            mind[i] = acc
        total += mind[i]
    return total


def kmeanspp_init(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D² sampling) of ``k`` centres from the rows of ``X``.

    Returns
    -------
    float32 (k, d)
    """
    n = X.shape[0]
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    mind = np.full(n, np.inf, dtype=np.float64)
    total = _min_sqdist_update(X, X[chosen[0]], mind)
    for j in range(1, k):
        if total <= 0.0:  # fewer distinct points than centres: fill with random rows
            chosen[j] = rng.integers(n)
        else:
            u = rng.random() * total
            chosen[j] = min(int(np.searchsorted(np.cumsum(mind), u)), n - 1)
        total = _min_sqdist_update(X, X[chosen[j]], mind)
    return np.ascontiguousarray(X[chosen], dtype=np.float32)


def _repair_empty(C, counts, labels, val, X, xnorm):
    """Re-seed empty centres with the worst-fitted points of the largest clusters.

    Keeps every leaf non-empty ("balanced leaves" in the weak sense ScaNN and faiss use): an
    empty centre takes the point farthest from its own centre among the members of the
    currently largest cluster, which splits that cluster on the next Lloyd round.
    """
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        return
    dist = val + xnorm  # squared distance of each point to its centre
    taken = set()
    for e in empty:
        big = int(np.argmax(counts))
        members = np.flatnonzero(labels == big)
        order = members[np.argsort(-dist[members], kind="stable")]
        pick = next((int(p) for p in order if int(p) not in taken), int(order[0]))
        taken.add(pick)
        C[e] = X[pick]
        counts[big] -= 1
        counts[e] = 1
        labels[pick] = e


def kmeans(
    X: np.ndarray,
    k: int,
    *,
    iters: int = 10,
    rng: np.random.Generator,
    init: str = "random",
    spherical: bool = False,
    init_sample: int = 32768,
    progress=None,
    threads: int = 1,
) -> np.ndarray:
    """Lloyd's k-means (squared L2) with sampled or k-means++ seeding.

    Parameters
    ----------
    X : float32 (n, d), C-contiguous
        Training points (callers pass a sample of the data set).
    k : int
        Number of centres, ``1 <= k <= n``.
    iters : int, default 10
        Lloyd rounds (assignment + mean update).
    rng : numpy Generator
        Source of every random choice (seeding), so one seed gives one result.
    init : {"random", "kmeans++"}, default "random"
        ``"random"`` takes ``k`` distinct rows; ``"kmeans++"`` runs D² sampling on at most
        ``init_sample`` rows.
    spherical : bool, default False
        Rescale centres to unit norm after every update (spherical k-means, for unit data).
    init_sample : int, default 32768
        Rows used by k-means++ seeding.
    progress : callable, optional
        Called as ``progress(done_rounds, iters)``.
    threads : int, default 1
        Worker threads of the assignment passes (:func:`assign_nearest`); the centres do not
        depend on it.

    Returns
    -------
    float32 (k, d)
        Centres; none is empty on the training points (empty ones are re-seeded each round).
    """
    n = X.shape[0]
    if init == "kmeans++":
        sub = X if n <= init_sample else X[np.sort(rng.choice(n, init_sample, replace=False))]
        C = kmeanspp_init(np.ascontiguousarray(sub), k, rng)
    else:
        C = np.ascontiguousarray(X[np.sort(rng.choice(n, k, replace=False))], dtype=np.float32)
    if spherical:
        C /= np.maximum(np.linalg.norm(C, axis=1, keepdims=True), 1e-30)
    xnorm = np.einsum("ij,ij->i", X, X).astype(np.float32)
    for it in range(iters):
        labels, val = assign_nearest(X, C, threads=threads)
        sums, counts = _accumulate(X, labels, k)
        nonempty = counts > 0
        C[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        _repair_empty(C, counts, labels, val, X, xnorm)
        if spherical:
            C /= np.maximum(np.linalg.norm(C, axis=1, keepdims=True), 1e-30)
        if progress is not None:
            progress(it + 1, iters)
    return np.ascontiguousarray(C, dtype=np.float32)


def kmeans_small(Xs, init, iters, threads=1):
    """Many independent small k-means problems at once (PQ codebook training).

    Parameters
    ----------
    Xs : float32 (m, n, w)
        ``m`` sub-spaces, each with ``n`` training points of width ``w`` (a few dimensions).
    init : float32 (m, k, w)
        Initial centres per sub-space (e.g. ``k`` distinct training rows).
    iters : int
        Lloyd rounds.
    threads : int, default 1
        Worker threads, each training a contiguous range of the sub-spaces (the result does not
        depend on it).

    Returns
    -------
    float32 (m, k, w)
        Centres; an empty centre is moved onto the point worst served by its centre.
    """
    out = np.ascontiguousarray(init, dtype=np.float32).copy()
    run_split(lambda lo, hi: _kmeans_small_range(Xs, out, iters, lo, hi), Xs.shape[0], threads)
    return out


@numba.njit(cache=True, nogil=True)
def _kmeans_small_range(Xs, out, iters, s_lo, s_hi):
    """:func:`kmeans_small` of the sub-spaces ``s_lo .. s_hi``, in place in ``out``."""
    m, n, w = Xs.shape
    k = out.shape[1]
    for s in range(s_lo, s_hi):
        C = out[s]
        X = Xs[s]
        labels = np.zeros(n, dtype=np.int64)
        dists = np.zeros(n, dtype=np.float32)
        for it in range(iters):
            for i in range(n):
                best = np.inf
                arg = 0
                for j in range(k):
                    acc = np.float32(0.0)
                    for t in range(w):
                        diff = X[i, t] - C[j, t]
                        acc += diff * diff
                    if acc < best:
                        best = acc
                        arg = j
                labels[i] = arg
                dists[i] = best
            sums = np.zeros((k, w), dtype=np.float64)
            counts = np.zeros(k, dtype=np.int64)
            for i in range(n):
                c = labels[i]
                counts[c] += 1
                for t in range(w):
                    sums[c, t] += X[i, t]
            for j in range(k):
                if counts[j] > 0:
                    for t in range(w):
                        C[j, t] = sums[j, t] / counts[j]
                else:
                    worst = int(np.argmax(dists))
                    for t in range(w):
                        C[j, t] = X[worst, t]
                    dists[worst] = 0.0
