"""Distance kernels: scalar pairs, one query against many rows, and blocked query batches.

All kernels return a proxy monotone in the public distance (squared L2, or negative inner
product; see :mod:`annlib.metrics`), float32.
``proxy`` arguments take the codes of :mod:`annlib.metrics` (0 = squared L2, 1 = -<q, x>); the code
is a run-time integer so one compiled kernel serves every metric.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

__all__ = [
    "l2sq",
    "dot",
    "proxy_pair",
    "sqnorms",
    "one_to_many",
    "many_to_many",
    "rows_proxy",
    "exact_pair",
]

L2SQ = 0
NEG_IP = 1


@numba.njit(inline="always", fastmath=True, cache=True, nogil=True)
def l2sq(a, b):
    """Squared Euclidean distance of two float32 vectors."""
    acc = np.float32(0.0)
    for t in range(a.shape[0]):
        diff = a[t] - b[t]
        acc += diff * diff
    return acc


@numba.njit(inline="always", fastmath=True, cache=True, nogil=True)
def dot(a, b):
    """Inner product of two float32 vectors."""
    acc = np.float32(0.0)
    for t in range(a.shape[0]):
        acc += a[t] * b[t]
    return acc


@numba.njit(inline="always", cache=True, nogil=True)
def proxy_pair(a, b, proxy):
    """Proxy distance of one pair: squared L2 (``proxy == 0``) or ``-<a, b>``."""
    if proxy == L2SQ:
        return l2sq(a, b)
    return -dot(a, b)


@numba.njit(fastmath=True, cache=True, nogil=True)
def sqnorms(X):
    """Squared L2 norm of every row of ``X`` (float32, shape (n,)).

    Serial: one pass over the vectors at memory speed, where a parallel region would cost
    more to compile on first use than it saves.
    """
    out = np.empty(X.shape[0], dtype=np.float32)
    for i in range(X.shape[0]):
        out[i] = dot(X[i], X[i])
    return out


@numba.njit(fastmath=True, cache=True, nogil=True)
def one_to_many(q, X, proxy):
    """Proxy distances from one query ``q`` (d,) to every row of ``X`` (n, d)."""
    out = np.empty(X.shape[0], dtype=np.float32)
    for i in range(X.shape[0]):
        out[i] = proxy_pair(q, X[i], proxy)
    return out


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def many_to_many(Q, X, proxy):
    """Proxy distances between every row of ``Q`` (m, d) and every row of ``X`` (n, d).

    Loops over pairs directly; for large blocks the BLAS path in :mod:`annlib.kernels.blockwise`
    is faster, this one is exact (no norm expansion) and allocation-light.
    """
    out = np.empty((Q.shape[0], X.shape[0]), dtype=np.float32)
    for r in prange(Q.shape[0]):
        for i in range(X.shape[0]):
            out[r, i] = proxy_pair(Q[r], X[i], proxy)
    return out


@numba.njit(inline="always", cache=True, nogil=True)
def exact_pair(a, b, proxy):
    """Proxy of one pair in a fixed order of operations, for the distances users see.

    Eight running sums (entry ``t`` goes to sum ``t % 8``) added pairwise at the end, then the
    tail: the same result on every machine and compiler setting, and eight independent chains
    instead of one (a single running sum waits on each addition; 8x fewer of those waits).
    Callers compile it without fast-math, so the compiler keeps this order.
    """
    d = a.shape[0]
    d8 = d - d % 8
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    s3 = np.float32(0.0)
    s4 = np.float32(0.0)
    s5 = np.float32(0.0)
    s6 = np.float32(0.0)
    s7 = np.float32(0.0)
    if proxy == L2SQ:
        for t in range(0, d8, 8):
            e0 = a[t] - b[t]
            e1 = a[t + 1] - b[t + 1]
            e2 = a[t + 2] - b[t + 2]
            e3 = a[t + 3] - b[t + 3]
            e4 = a[t + 4] - b[t + 4]
            e5 = a[t + 5] - b[t + 5]
            e6 = a[t + 6] - b[t + 6]
            e7 = a[t + 7] - b[t + 7]
            s0 += e0 * e0
            s1 += e1 * e1
            s2 += e2 * e2
            s3 += e3 * e3
            s4 += e4 * e4
            s5 += e5 * e5
            s6 += e6 * e6
            s7 += e7 * e7
        acc = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
        for t in range(d8, d):
            e = a[t] - b[t]
            acc += e * e
        return acc
    for t in range(0, d8, 8):
        s0 += a[t] * b[t]
        s1 += a[t + 1] * b[t + 1]
        s2 += a[t + 2] * b[t + 2]
        s3 += a[t + 3] * b[t + 3]
        s4 += a[t + 4] * b[t + 4]
        s5 += a[t + 5] * b[t + 5]
        s6 += a[t + 6] * b[t + 6]
        s7 += a[t + 7] * b[t + 7]
    acc = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for t in range(d8, d):
        acc += a[t] * b[t]
    return -acc


@numba.njit(inline="always", cache=True, nogil=True)
def _rows_proxy_row(q, X, ids_row, out_row, proxy):
    for j in range(ids_row.shape[0]):
        p = ids_row[j]
        if p < 0:
            out_row[j] = np.inf
            continue
        out_row[j] = exact_pair(q, X[p], proxy)


@numba.njit(parallel=True, cache=True, nogil=True)
def _rows_proxy_parallel(Q, X, ids, proxy, out):
    for r in prange(ids.shape[0]):
        _rows_proxy_row(Q[r], X, ids[r], out[r], proxy)


@numba.njit(cache=True, nogil=True)
def _rows_proxy_serial(Q, X, ids, proxy, out):
    for r in range(ids.shape[0]):
        _rows_proxy_row(Q[r], X, ids[r], out[r], proxy)


# Below this many distance terms a parallel region costs more than it saves.
_PARALLEL_MIN_WORK = 1 << 20


def rows_proxy(Q, X, ids, proxy):
    """Exact proxy distance from each query row to the listed rows of ``X``.

    ``ids`` has shape (m, c) with row positions into ``X`` (-1 = none, gives +inf). Used to
    re-rank candidates and to recompute returned distances without the norm-expansion error.
    No ``fastmath`` here: these are the numbers users see. Small inputs run on the calling
    thread, large ones in parallel over rows.
    """
    out = np.empty(ids.shape, dtype=np.float32)
    if ids.size * X.shape[1] >= _PARALLEL_MIN_WORK:
        _rows_proxy_parallel(Q, X, ids, proxy, out)
    else:
        _rows_proxy_serial(Q, X, ids, proxy, out)
    return out
