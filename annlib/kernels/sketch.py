"""Sketch kernels for Mahalanobis distance estimation: median-of-copies scoring, updates, re-ranking.

Layout shared by every function here:

* ``P``  float32 (L, m, d): per copy ``j`` the sketch map ``P_j = Pi_j U`` (``Pi_j`` Gaussian).
* ``S``  float32 (L, m + e, n): per copy the sketches ``s_{j,i} = P_j x_i`` as columns in the
  first ``m`` rows (row-major ``m x n`` per copy is what the GEMM ``Z @ S_j`` reads fastest, and a
  metric update then sweeps contiguous rows); ``sn`` (L, n) their squared norms, so
  ``||z - s||^2 = ||z||^2 - 2<z, s> + ||s||^2`` scores a block by one GEMM.
* Deferred metric updates: rows ``m .. m + r`` of every copy hold the coefficients ``c_{t,i}``
  of ``r`` pending low-rank updates and ``pending`` (L, m, r) their projection columns ``g_{j,t}``;
  the current sketch is ``s_{j,i} + sum_t g_{j,t} c_{t,i}``. A query row ``z`` is extended by
  ``<z, g_{j,t}>`` so that the same GEMM (inner size ``m + r``) scores the current sketches;
  ``sn`` always holds the current norms.
* ``sel`` int64 (q, R): the ``R`` copies each query uses; the estimate of ``d_M(q, x_i)^2`` is the
  median over those copies of ``||P_j q - s_{j,i}||^2`` (the median of squares is the square of
  the median of distances, so no square root is taken while ranking).

Query rows are grouped by copy so that each copy's sketches are read by one GEMM per database
block, whatever mix of copies the queries chose. The scoring functions take the stored arrays as
one :class:`Sketches` bundle and produce one :class:`QueryBlock` per block; the numba folds take
the block's arrays unpacked, because a tuple argument costs microseconds of dispatch per call.
"""

from __future__ import annotations

import threading
from typing import Callable, NamedTuple

import numba
import numpy as np
from numba import prange

from .distances import sqnorms
from .query import BAD_QUERY, prepare_query
from .siphash import keyed_choices, siphash24_rows
from .table import bool_1d, f32_2d, f32_3d, f64_1d, f64_2d, f64_at, i64_1d, int_at, make_table
from .threads import blas_limit, run_split, split_ranges
from .topk import heap_push, heap_sort_inplace, new_heaps, sort_heaps

__all__ = [
    "Sketches",
    "QueryBlock",
    "sketch_points",
    "column_sqnorms",
    "quadratic_forms",
    "matvec64",
    "rank_update",
    "gram_update",
    "sqnorm_update",
    "row_combinations",
    "outer_update",
    "quadform_rows",
    "median_estimate",
    "median_search",
    "median_search_one",
    "one_query_table",
    "BAD_QUADFORM",
    "ROWS_PER_COPY",
    "DB_BLOCK",
]

# Queries are blocked so that each copy sees about ROWS_PER_COPY sketched query rows: each copy's
# sketches are then read once per block by a GEMM with enough rows to be compute-bound rather than
# memory-bound (with L copies and R votes a block holds ROWS_PER_COPY * L / R queries). The score
# block is (ROWS_PER_COPY * L) x DB_BLOCK float32 (48 MiB for L = 16): at d = 784, 1,000 queries,
# whole-batch query blocks with 2-4k database columns measured 10-20% faster than 96 rows per
# copy with 8k columns (more rows per copy GEMM run closer to the single big GEMM's speed).
ROWS_PER_COPY = 192
MAX_QUERY_BLOCK = 2048
DB_BLOCK = 4096
MIN_SPLIT_QUERIES = 16  # fewest queries a worker thread of median_search gets
MIN_SPLIT_COLUMNS = 1024  # fewest sketched points a worker thread of median_search multiplies per block


class Sketches(NamedTuple):
    """The stored arrays a query is scored against (the layout of the module docstring).

    Attributes
    ----------
    maps : float32 (L, m, d)
        ``P_j`` per copy.
    sketches : float32 (L, m + e, n)
        Sketches as columns; rows ``m ..`` hold the coefficients of pending updates.
    sqnorms : float32 (L, n)
        Current squared norms of the sketches (pending updates included).
    pending : float32 (L, m, r)
        Projection columns of the ``r <= e`` pending updates (``r = 0``: none).
    """

    maps: np.ndarray
    sketches: np.ndarray
    sqnorms: np.ndarray
    pending: np.ndarray


class QueryBlock(NamedTuple):
    """One block of sketched queries against one database block.

    The numba folds take its four arrays unpacked (``fold_median_block(*block, ...)``): a tuple
    argument costs about 2 us of dispatch per call, paid once per database block of every search.

    Attributes
    ----------
    products : float32 (rows, bn)
        Inner products of the block's sketched query rows with the block's sketches.
    row_of : int64 (bq, R)
        Row of ``products`` holding query ``r``'s copy ``s``.
    copy_of : int64 (rows,)
        Copy of each row of ``products``.
    query_sqnorms : float32 (rows,)
        Squared norms of the sketched query rows.
    """

    products: np.ndarray
    row_of: np.ndarray
    copy_of: np.ndarray
    query_sqnorms: np.ndarray


# ----------------------------------------------------------------------------- build and updates
def sketch_points(
    X: np.ndarray, P: np.ndarray, report: Callable[[int], None] | None = None, extra: int = 0, threads: int = 1,
):
    """Sketch every row of ``X`` with every copy.

    Parameters
    ----------
    X : float32 (n, d)
    P : float32 (L, m, d)
    report : callable (done,), optional
        Called with the number of copies done after each copy.
    extra : int, default 0
        Zero rows appended to each copy (room for deferred-update coefficients; a point sketched
        with the current maps has none pending).
    threads : int, default 1
        Worker threads, each sketching a contiguous range of the copies with single-threaded GEMM
        (the result does not depend on it; ``report`` still sees 1, 2, ..., L in order).

    Returns
    -------
    (float32 (L, m + extra, n) sketches, float32 (L, n) squared norms)
    """
    L, m, _ = P.shape
    S = np.empty((L, m + extra, X.shape[0]), dtype=np.float32)
    S[:, m:] = 0.0
    sn = np.empty((L, X.shape[0]), dtype=np.float32)

    done = [0]
    lock = threading.Lock()

    def copies(lo, hi):
        for j in range(lo, hi):
            np.dot(P[j], X.T, out=S[j, :m])  # the first m rows of a copy are contiguous
            column_sqnorms(S[j, :m], sn[j])
            if report is not None:
                with lock:  # workers finish copies in any order; the count only goes up by one
                    done[0] += 1
                    report(done[0])

    run_split(copies, L, threads)
    return S, sn


@numba.njit(cache=True, nogil=True)
def column_sqnorms(A, out):
    """``out[i] = sum_a A[a, i]^2`` for a float32 (m, n) matrix, written into ``out`` (n,)."""
    m, n = A.shape
    for c in range((n + 1023) // 1024):
        i0, i1 = c * 1024, min(n, c * 1024 + 1024)
        for i in range(i0, i1):
            out[i] = 0.0
        for a in range(m):
            row = A[a]
            for i in range(i0, i1):
                out[i] += row[i] * row[i]


def quadratic_forms(X: np.ndarray, M: np.ndarray | None, block: int = 2048, threads: int = 1) -> np.ndarray:
    """``x_i^T M x_i`` for every row, in float64 (the exact re-ranking needs these to ~1e-12).

    Parameters
    ----------
    X : float32 (n, d)
    M : float64 (d, d), symmetric, or None for the identity (squared norms, ``O(n·d)``)
    block : int, default 2048
        Rows converted to float64 at a time (bounds the temporary memory).
    threads : int, default 1
        Worker threads, each taking a contiguous range of the rows with single-threaded BLAS
        (small products in a multi-threaded BLAS cost more in start-up than they save).

    Returns
    -------
    ndarray float64 (n,)
    """
    out = np.empty(X.shape[0], dtype=np.float64)

    def rows(lo, hi):
        for a in range(lo, hi, block):
            e = min(hi, a + block)
            Xb = X[a:e].astype(np.float64)
            out[a:e] = np.einsum("ij,ij->i", Xb if M is None else Xb @ M, Xb)

    run_split(rows, X.shape[0], threads, block)
    return out


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def matvec64(X, W):
    """``X @ W.T`` with float64 accumulation: X float32 (n, d), W float64 (r, d) -> float64 (n, r).

    Used for the coefficients ``<w, x_i>`` of a metric update, which feed the float64 quadratic
    forms of the exact path; one pass over ``X`` without a float64 copy of it. ``fastmath`` only
    reorders the float64 sum (all inputs are finite), which lets it vectorise.
    """
    n, d = X.shape
    r = W.shape[0]
    out = np.empty((n, r), dtype=np.float64)
    for i in prange(n):
        x = X[i]
        for t in range(r):
            w = W[t]
            acc = 0.0
            for c in range(d):
                acc += x[c] * w[c]
            out[i, t] = acc
    return out


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def rank_update(S, sn, CT, G):
    """Low-rank update of every sketch in one sweep: ``s_{j,i} += G_j c_i``, norms refreshed.

    Memory-bound: each sketch entry is read and written once (the last direction's update and
    the norm are fused into one loop), so the cost is one pass over ``S``. ``fastmath`` is safe
    (finite inputs) and lets the row loops vectorise. Parallel over copies.

    Parameters
    ----------
    S : float32 (L, m + e, n), first ``m`` rows updated in place (``m`` from ``G``)
    sn : float32 (L, n), updated in place
    CT : float32 (r, n), r >= 1
        Coefficients per point (``<w_t, x_i>``), one row per update direction.
    G : float32 (L, m, r)
        Per copy the projection columns the update adds along.
    """
    L, _, n = S.shape
    m, r = G.shape[1], CT.shape[0]
    for j in prange(L):
        snj = sn[j]
        for i in range(n):
            snj[i] = 0.0
        for a in range(m):
            row = S[j, a]
            for t in range(r - 1):
                g = G[j, a, t]
                ct = CT[t]
                for i in range(n):
                    row[i] += g * ct[i]
            g = G[j, a, r - 1]
            ct = CT[r - 1]
            for i in range(n):
                x = row[i] + g * ct[i]
                row[i] = x
                snj[i] += x * x


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def row_combinations(S, Wt, out):
    """``out[j, t, i] = sum_a Wt[j, a, t] S[j, a, i]`` over the first ``Wt.shape[1]`` rows.

    One read-only streaming pass over those rows of the sketches (no writes to ``S``): the
    products ``<g_{j,t}, s_{j,i}>`` a deferred update needs for the new sketch norms. Parallel
    over copies; ``fastmath`` is safe (finite inputs) and lets the row loops vectorise.

    Parameters
    ----------
    S : float32 (L, k', n), k' >= k
    Wt : float32 (L, k, r)
    out : float32 (L, r, n), written
    """
    L, k, r = Wt.shape
    n = S.shape[2]
    for j in prange(L):
        for t in range(r):
            o = out[j, t]
            for i in range(n):
                o[i] = 0.0
            for a in range(k):
                w = Wt[j, a, t]
                row = S[j, a]
                for i in range(n):
                    o[i] += w * row[i]


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def sqnorm_update(sn, C, D, GG):
    """Squared sketch norms after ``s_{j,i} += sum_t g_{j,t} c_{t,i}``, without writing ``S``.

    ``||s + G c||^2 = ||s||^2 + 2 sum_t c_t <g_t, s> + c^T (G^T G) c``.

    Parameters
    ----------
    sn : float32 (L, n), updated in place
    C : float64 (n, r)
        Coefficients ``c_{t,i}``.
    D : float32 (L, r, n)
        ``<g_{j,t}, s_{j,i}>`` with the current (pre-update) sketches.
    GG : float32 (L, r, r)
        ``G_j^T G_j``.
    """
    L, n = sn.shape
    r = C.shape[1]
    for j in prange(L):
        for i in range(n):
            acc = 0.0
            for t in range(r):
                ct = C[i, t]
                acc += 2.0 * ct * D[j, t, i]
                for u in range(r):
                    acc += ct * C[i, u] * GG[j, t, u]
            sn[j, i] += acc


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def outer_update(P, G, W):
    """In place ``P_j += G_j W`` for every copy: P float32 (L, m, d), G (L, m, r), W (r, d)."""
    L, m, d = P.shape
    for j in prange(L):
        for a in range(m):
            row = P[j, a]
            for t in range(W.shape[0]):
                g = G[j, a, t]
                w = W[t]
                for c in range(d):
                    row[c] += g * w[c]


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def gram_update(M, plus, minus):
    """In place ``M += plus^T plus - minus^T minus`` (float64; ``minus`` may have zero rows).

    The metric change of a factor update, without a (d, d) temporary.
    """
    d = M.shape[0]
    for a in prange(d):
        row = M[a]
        for t in range(plus.shape[0]):
            pa = plus[t, a]
            pt = plus[t]
            for b in range(d):
                row[b] += pa * pt[b]
        for t in range(minus.shape[0]):
            ma = minus[t, a]
            mt = minus[t]
            for b in range(d):
                row[b] -= ma * mt[b]


@numba.njit(parallel=True, cache=True, nogil=True)
def quadform_rows(MQ, qmq, X, xmx, ids):
    """Exact squared Mahalanobis distance from each query to the listed rows, in float64.

    ``d^2 = q^T M q - 2 <M q, x> + x^T M x`` with every term in float64, so the expansion loses
    nothing to cancellation at float32 scale (near-duplicates come out as ~0, not as noise).

    Parameters
    ----------
    MQ : float64 (q, d)
        ``M q`` per query.
    qmq : float64 (q,)
        ``q^T M q``.
    X : float32 (n, d)
    xmx : float64 (n,)
        ``x^T M x``.
    ids : int64 (q, c)
        Row positions, -1 = none (gives +inf).

    Returns
    -------
    ndarray float64 (q, c)
    """
    out = np.empty(ids.shape, dtype=np.float64)
    for r in prange(ids.shape[0]):
        mq = MQ[r]
        for j in range(ids.shape[1]):
            p = ids[r, j]
            if p < 0:
                out[r, j] = np.inf
                continue
            x = X[p]
            acc = 0.0
            for t in range(x.shape[0]):
                acc += mq[t] * x[t]
            v = qmq[r] - 2.0 * acc + xmx[p]
            out[r, j] = v if v > 0.0 else 0.0
    return out


# ----------------------------------------------------------------------------- median scoring
@numba.njit(fastmath=True, cache=True, nogil=True)
def _median_row(G, t_row, copy_of, zn, sn, offset, out, tmp):
    """``out[i]`` = median over the query's copies of ``||z - s_{col}||^2``, clamped at 0.

    ``col = offset + i`` for ``i < out.shape[0]``. One and three copies get straight-line loops
    the compiler vectorises (median of three by a min/max network); other counts sort a small
    buffer ``tmp`` (R,) per point. All inputs are finite, so ``fastmath`` is safe here.
    """
    R = t_row.shape[0]
    bn = out.shape[0]
    two = np.float32(2.0)
    if R == 1:
        t = t_row[0]
        g, z, sj = G[t], zn[t], sn[copy_of[t]]
        for i in range(bn):
            out[i] = max(z + sj[offset + i] - two * g[i], np.float32(0.0))
    elif R == 3:
        t0, t1, t2 = t_row[0], t_row[1], t_row[2]
        g0, g1, g2 = G[t0], G[t1], G[t2]
        z0, z1, z2 = zn[t0], zn[t1], zn[t2]
        s0, s1, s2 = sn[copy_of[t0]], sn[copy_of[t1]], sn[copy_of[t2]]
        for i in range(bn):
            a = z0 + s0[offset + i] - two * g0[i]
            b = z1 + s1[offset + i] - two * g1[i]
            c = z2 + s2[offset + i] - two * g2[i]
            med = max(min(a, b), min(max(a, b), c))
            out[i] = max(med, np.float32(0.0))
    else:
        for i in range(bn):
            for s in range(R):
                t = t_row[s]
                v = zn[t] + sn[copy_of[t], offset + i] - two * G[t, i]
                u = s
                while u > 0 and tmp[u - 1] > v:  # insertion sort: R is small
                    tmp[u] = tmp[u - 1]
                    u -= 1
                tmp[u] = v
            out[i] = max(tmp[R // 2], np.float32(0.0))


@numba.njit(cache=True, nogil=True)
def fold_median_block(G, t_of, copy_of, zn, sn, offset, mask, heap_d, heap_i, q_offset):
    """Fold one database block of median estimates into the running per-query heaps.

    Parameters
    ----------
    G, t_of, copy_of, zn
        The fields of a :class:`QueryBlock` (products with sketches ``offset .. offset+bn``).
    sn : float32 (L, n)
    offset : int
    mask : bool (n,) or (0,)
        Allowed points; empty means all.
    heap_d, heap_i : float32 / int64 (q, c), updated in place
    q_offset : int

    Serial: threads split the queries (:func:`median_search`).
    """
    use_mask = mask.shape[0] > 0
    bn = G.shape[1]
    for r in range(t_of.shape[0]):
        hd = heap_d[q_offset + r]
        hi = heap_i[q_offset + r]
        est = np.empty(bn, dtype=np.float32)
        tmp = np.empty(t_of.shape[1], dtype=np.float32)
        _median_row(G, t_of[r], copy_of, zn, sn, offset, est, tmp)
        for i in range(bn):
            v = est[i]
            if v < hd[0]:
                if use_mask and not mask[offset + i]:
                    continue
                heap_push(hd, hi, v, offset + i)


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def median_block(G, t_of, copy_of, zn, sn, offset, out, q_offset, root):
    """Write one database block of median estimates into ``out`` (q, n): squared, or their
    square roots when ``root`` (taken while the row is still in cache, not in a second pass).
    ``G, t_of, copy_of, zn`` are the fields of a :class:`QueryBlock`."""
    bn = G.shape[1]
    for r in prange(t_of.shape[0]):
        tmp = np.empty(t_of.shape[1], dtype=np.float32)
        row = out[q_offset + r, offset:offset + bn]
        _median_row(G, t_of[r], copy_of, zn, sn, offset, row, tmp)
        if root:
            for i in range(bn):
                row[i] = np.sqrt(row[i])


def _sketch_queries(Qb: np.ndarray, P: np.ndarray, sel: np.ndarray, pending: np.ndarray):
    """Sketch a query block with the copies it chose, rows grouped by copy.

    Returns ``(Z, zn, copy_of, t_of, groups)`` where ``groups`` lists ``(copy, start, stop)``
    row ranges of ``Z`` that share a copy. With ``r > 0`` pending columns (L, m, r), ``Z`` has
    ``m + r`` columns: the sketch ``z`` and its products ``<z, g_{j,t}>`` with them.
    """
    bq, R = sel.shape
    flat = sel.ravel()
    order = np.argsort(flat, kind="stable")
    copy_of = np.ascontiguousarray(flat[order])
    t_of = np.empty(bq * R, dtype=np.int64)
    t_of[order] = np.arange(bq * R)
    t_of = t_of.reshape(bq, R)
    query_of = order // R
    Z = np.empty((bq * R, P.shape[1]), dtype=np.float32)
    cuts = np.flatnonzero(np.diff(copy_of)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [bq * R]])
    groups = [(int(copy_of[a]), int(a), int(b)) for a, b in zip(starts, stops)]
    for j, a, b in groups:
        np.dot(Qb[query_of[a:b]], P[j].T, out=Z[a:b])
    zn = sqnorms(Z)
    if pending.shape[2]:
        Zx = np.empty((Z.shape[0], Z.shape[1] + pending.shape[2]), dtype=np.float32)
        Zx[:, :Z.shape[1]] = Z
        for j, a, b in groups:
            Zx[a:b, Z.shape[1]:] = Z[a:b] @ pending[j]
        Z = Zx
    return Z, zn, copy_of, t_of, groups


def _blocks(Q, sk: Sketches, sel, query_block, db_block):
    """Yield ``(q0, x0, QueryBlock)`` for every (query block, database block) pair."""
    P, S, pending = sk.maps, sk.sketches, sk.pending
    nq, n = Q.shape[0], S.shape[2]
    if query_block is None:
        query_block = _default_query_block(P.shape[0], sel.shape[1])
    bq_max = min(query_block, nq)
    bn_max = min(db_block, n)
    buf = np.empty(bq_max * sel.shape[1] * bn_max, dtype=np.float32)
    k = P.shape[1] + pending.shape[2]  # inner size of the GEMMs
    for q0 in range(0, nq, bq_max):
        Z, zn, copy_of, t_of, groups = _sketch_queries(Q[q0:q0 + bq_max], P, sel[q0:q0 + bq_max], pending)
        for x0 in range(0, n, bn_max):
            bn = min(bn_max, n - x0)
            G = buf[: Z.shape[0] * bn].reshape(Z.shape[0], bn)
            for j, a, b in groups:
                np.dot(Z[a:b], S[j, :k, x0:x0 + bn], out=G[a:b])
            yield q0, x0, QueryBlock(G, t_of, copy_of, zn)


def median_estimate(
    Q: np.ndarray, sk: Sketches, sel: np.ndarray, *, root: bool = False,
    query_block: int | None = None, db_block: int = DB_BLOCK,
) -> np.ndarray:
    """Median-of-copies estimates of the squared distance from every query to every sketched point.

    Parameters
    ----------
    Q : float32 (q, d)
    sk : Sketches
        Maps, sketches, their norms and the pending update columns (``r <= e``).
    sel : int64 (q, R)
        Copies per query (distinct, in ``[0, L)``).
    root : bool, default False
        Return distances (square roots) instead of squared distances.

    Returns
    -------
    ndarray float32 (q, n)
        Squared estimates, or distances with ``root``.
    """
    out = np.empty((Q.shape[0], sk.sketches.shape[2]), dtype=np.float32)
    for q0, x0, block in _blocks(Q, sk, sel, query_block, db_block):
        median_block(*block, sk.sqnorms, x0, out, q0, root)
    return out


def median_search(
    Q: np.ndarray, sk: Sketches, sel: np.ndarray, c: int, mask: np.ndarray | None = None, *,
    query_block: int | None = None, db_block: int = DB_BLOCK, threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``c`` points with the smallest median squared estimate, per query, ascending.

    Same arguments as :func:`median_estimate` (without ``root``), plus ``c`` (candidates per query, ``<= n``) and an
    optional boolean ``mask`` (n,) of allowed points. Rows with fewer allowed points are padded
    with (+inf, -1). ``threads`` worker threads (BLAS at one thread) share every database block:
    each multiplies a range of its columns, then each folds a range of the queries
    (:func:`_median_search_split`); every query's heap sees the points in the order of one thread.

    Returns
    -------
    (float32 (q, c) squared estimates, int64 (q, c) positions)
    """
    heap_d, heap_i = new_heaps(Q.shape[0], c)
    mask_arr = np.zeros(0, dtype=np.bool_) if mask is None else mask
    workers = max(1, min(int(threads), sk.sketches.shape[2] // MIN_SPLIT_COLUMNS))
    if workers == 1:
        for q0, x0, block in _blocks(Q, sk, sel, query_block, db_block):
            fold_median_block(*block, sk.sqnorms, x0, mask_arr, heap_d, heap_i, q0)
    else:
        _median_search_split(Q, sk, sel, mask_arr, heap_d, heap_i, query_block, db_block, workers)
    sort_heaps(heap_d, heap_i)
    return heap_d, heap_i


def _median_search_split(Q, sk: Sketches, sel, mask_arr, heap_d, heap_i, query_block, db_block, workers):
    """The folds of :func:`median_search` on ``workers`` threads, in two phases per database block.

    Splitting the queries instead (one range per thread) halves each copy's GEMM rows and has
    every thread stream all the sketches: at two threads that cost 1.2x the CPU time of one.
    Here every thread multiplies the block's whole query sketch (as many rows per copy as one
    thread) with its own contiguous range of the block's columns, then every thread folds its
    range of the queries over the column ranges in ascending order: each query's heap sees the
    points in the order one thread gives them, so the candidates are those of one thread.
    """
    nq, n = Q.shape[0], sk.sketches.shape[2]
    if query_block is None:
        query_block = _default_query_block(sk.maps.shape[0], sel.shape[1])
    bq_max = min(query_block, nq)
    bn_max = min(db_block, n)
    buf = np.empty(bq_max * sel.shape[1] * bn_max, dtype=np.float32)
    # BLAS at one thread for the whole search: the query sketches run on this thread between
    # the phases, and the phases would otherwise each set and restore the BLAS thread count
    with blas_limit(1):
        for q0 in range(0, nq, bq_max):
            block = _sketch_queries(Q[q0:q0 + bq_max], sk.maps, sel[q0:q0 + bq_max], sk.pending)
            for x0 in range(0, n, bn_max):
                _split_db_block(block, sk, x0, min(bn_max, n - x0), buf, mask_arr, heap_d, heap_i, q0, workers)


def _split_db_block(block, sk: Sketches, x0, bn, buf, mask_arr, heap_d, heap_i, q0, workers):
    """One database block of :func:`_median_search_split`: the products of the sketched query
    ``block`` (``_sketch_queries``'s tuple) with the columns ``x0 .. x0 + bn``, one column range
    per thread, then the folds, one range of the queries per thread."""
    Z, zn, copy_of, t_of, groups = block
    rows, k = Z.shape
    cols = split_ranges(bn, workers)
    # columns c0..c1 of the block as a (rows, c1 - c0) matrix of their own at
    # buf[rows * c0 : rows * c1] (contiguous, as np.dot's out= requires)
    parts = [buf[rows * c0:rows * c1].reshape(rows, c1 - c0) for c0, c1 in cols]

    def products(lo, hi):
        for w in range(lo, hi):
            c0, c1 = cols[w]
            for j, a, b in groups:
                np.dot(Z[a:b], sk.sketches[j, :k, x0 + c0:x0 + c1], out=parts[w][a:b])

    def folds(lo, hi):
        for w, (c0, _) in enumerate(cols):
            fold_median_block(parts[w], t_of[lo:hi], copy_of, zn, sk.sqnorms, x0 + c0, mask_arr, heap_d, heap_i,
                              q0 + lo)

    run_split(products, workers, workers)
    run_split(folds, t_of.shape[0], workers, MIN_SPLIT_QUERIES)


def _default_query_block(copies: int, votes: int) -> int:
    """Queries per block: about ROWS_PER_COPY sketched rows per copy (module note)."""
    return min(MAX_QUERY_BLOCK, max(1, -(-ROWS_PER_COPY * copies // votes)))


# ----------------------------------------------------------------------------- one query
BAD_QUADFORM = 2  # status of median_search_one: the query's q^T M q is above the limit


def one_query_table(sk: Sketches, vectors: np.ndarray, quadforms: np.ndarray, matrix: np.ndarray | None,
                    deleted: np.ndarray | None, ids: np.ndarray, key: bytes, votes: int, limit: float,
                    bound: float):
    """The :class:`~.table.ArrayTable` :func:`median_search_one` reads.

    Parameters
    ----------
    sk : Sketches
    vectors : float32 (n, d)
    quadforms : float64 (n,)
        ``x^T M x``.
    matrix : float64 (d, d) or None
        ``M`` (None: the identity).
    deleted : bool (n,) or None
        Deleted points (None: none).
    ids : int64 (n,) or (0,)
        External id per position; empty: ids are positions.
    key : bytes
        The copy-choice key (:func:`annlib.kernels.jl.query_keys`; its first 16 bytes are used).
    votes : int
        Copies per query.
    limit : float
        Largest ``q^T M q`` allowed.
    bound : float
        Largest magnitude of a query entry.
    """
    k0, k1 = (int(w) for w in np.frombuffer(key[:16], dtype=np.int64))  # uint64 words, as bits
    return make_table(sk.maps, sk.sketches, sk.sqnorms, np.ascontiguousarray(sk.pending), vectors, quadforms,
                      np.zeros((0, 0)) if matrix is None else matrix,
                      np.zeros(0, np.bool_) if deleted is None else deleted, ids, k0, k1, int(votes),
                      float(limit), float(bound))


@numba.njit(cache=True, nogil=True)
def median_search_one(q, table, c, k, mask, out_d, out_i):
    """One query of a Mahalanobis sketch index, from the raw query to the returned ids and
    distances: the copy choice of :func:`annlib.kernels.jl.choose_copies`, the median-of-copies
    estimates of :func:`median_search` (their ``c`` best), the exact re-ranking of
    :func:`quadform_rows` and the distances (square roots), in one call.

    Parameters
    ----------
    q : float32 (d,)
        The query as the caller gave it (checked here: NaN, inf, entries above the bound).
    table : int64
        :func:`one_query_table`.
    c : int
        Candidates re-ranked exactly (``k <= c <= n``).
    k : int
    mask : bool (n,) or (0,)
        Allowed points; empty means all.
    out_d, out_i : float32 / int64 (k,)
        Receive the distances and ids, best first (+inf / -1 padded).

    Returns
    -------
    int
        0, :data:`.query.BAD_QUERY` or :data:`BAD_QUADFORM` (nothing searched).

    Notes
    -----
    Serial: one pass over the chosen copies' sketches (``votes * (m + r) * n`` multiply-adds)
    plus ``c * d`` for the re-ranking.
    """
    P = f32_3d(table, 0)
    S = f32_3d(table, 4)
    sn = f32_2d(table, 8)
    pend = f32_3d(table, 12)
    X = f32_2d(table, 16)
    xmx = f64_1d(table, 20)
    M = f64_2d(table, 24)
    deleted = bool_1d(table, 28)
    ids = i64_1d(table, 32)
    key0 = np.uint64(int_at(table, 36))
    key1 = np.uint64(int_at(table, 37))
    votes = int_at(table, 38)
    limit = f64_at(table, 39)
    bound = f64_at(table, 40)
    L, m, d = P.shape
    r = pend.shape[2]
    n = S.shape[2]
    if q.shape[0] != d:  # (the caller checked; a rebuild may have come in between)
        return BAD_QUERY
    qp = np.empty(d, dtype=np.float32)
    if prepare_query(q, bound, False, qp):
        return BAD_QUERY
    # exact query form, as the batch path computes it (float64)
    q64 = qp.astype(np.float64)
    if M.shape[0] > 0:
        mq = np.zeros(d, dtype=np.float64)
        for a in range(d):
            qa = q64[a]
            for b in range(d):
                mq[b] += qa * M[a, b]
    else:
        mq = q64
    qmq = 0.0
    for a in range(d):
        qmq += mq[a] * q64[a]
    if not qmq <= limit:
        return BAD_QUADFORM
    # the copies this query uses: SipHash-2-4 of its bytes, as choose_copies
    nbytes = d * 4
    words = np.zeros((1, nbytes // 8 + 1), dtype=np.uint64)
    wbytes = words[0].view(np.uint8)
    qbytes = qp.view(np.uint8)
    for a in range(nbytes):
        wbytes[a] = qbytes[a]
    sel = keyed_choices(siphash24_rows(words, nbytes, key0, key1), L, votes)[0]
    # sketched query rows (extended by their products with the pending update columns) and
    # their products with every stored sketch of the chosen copies
    G = np.zeros((votes, n), dtype=np.float32)
    zn = np.empty(votes, dtype=np.float32)
    zx = np.empty(m + r, dtype=np.float32)
    for s in range(votes):
        j = sel[s]
        acc2 = np.float32(0.0)
        for a in range(m):
            acc = np.float32(0.0)
            for b in range(d):
                acc += P[j, a, b] * qp[b]
            zx[a] = acc
            acc2 += acc * acc
        zn[s] = acc2
        for u in range(r):
            acc = np.float32(0.0)
            for a in range(m):
                acc += zx[a] * pend[j, a, u]
            zx[m + u] = acc
        _axpy_rows(zx, S[j], G[s])
    # median over the copies, the c best allowed points
    use_mask = mask.shape[0] > 0
    use_deleted = deleted.shape[0] > 0
    hd = np.full(c, np.inf, dtype=np.float32)
    hi = np.full(c, -1, dtype=np.int64)
    est = np.empty(n, dtype=np.float32)
    tmp = np.empty(votes, dtype=np.float32)
    t_row = np.arange(votes)
    _median_row(G, t_row, sel, zn, sn, np.int64(0), est, tmp)  # a plain offset: the batch path's copy
    for i in range(n):
        v = est[i]
        if v < hd[0]:
            if (use_mask and not mask[i]) or (use_deleted and deleted[i]):
                continue
            heap_push(hd, hi, v, i)
    heap_sort_inplace(hd, hi)
    # exact squared distances of the candidates (float64), the k best
    bd = np.full(k, np.inf, dtype=np.float32)
    bi = np.full(k, -1, dtype=np.int64)
    for j in range(c):
        p = hi[j]
        if p < 0:
            continue
        acc64 = 0.0
        for t in range(d):
            acc64 += mq[t] * X[p, t]
        v64 = qmq - 2.0 * acc64 + xmx[p]
        v = np.float32(v64 if v64 > 0.0 else 0.0)
        if v < bd[0]:
            heap_push(bd, bi, v, p)
    heap_sort_inplace(bd, bi)
    for j in range(k):
        p = bi[j]
        if p < 0:
            out_i[j] = -1
            out_d[j] = np.inf
        else:
            out_i[j] = ids[p] if ids.shape[0] > 0 else p
            out_d[j] = np.sqrt(bd[j])
    return 0


@numba.njit(fastmath=True, cache=True, nogil=True)
def _axpy_rows(z, S, out):
    """``out += sum_a z[a] * S[a]`` over the first ``len(z)`` rows of ``S`` (a row at a time:
    each row of a copy's sketches is contiguous over the points)."""
    n = out.shape[0]
    for a in range(z.shape[0]):
        za = z[a]
        for i in range(n):
            out[i] += za * S[a, i]
