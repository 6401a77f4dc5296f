"""Exact k-NN by blocked matrix multiplication fused with a running top-k.

Scores for a block of queries against a block of database rows come from one float32 GEMM (BLAS);
a numba pass then folds the block into per-query heaps, so the full (q, n) score matrix is never
materialised and memory stays at one block. Squared L2 uses the norm expansion
``||q - x||^2 = ||q||^2 - 2<q, x> + ||x||^2``; ``||q||^2`` is constant per query, so it is added
only to the k survivors.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange
from numba.cpython.unsafe.numbers import trailing_zeros

from .distances import L2SQ, _rows_proxy_row, rows_proxy, sqnorms
from .query import BAD_QUERY, finish_one, prepare_query
from .table import f32_2d, f64_at, i64_1d, int_at, make_table
from .threads import blas_limit, worker_pool
from .topk import heap_push, heap_sort_inplace, merge_topk, new_heaps, sort_rows_inplace

__all__ = ["exact_search", "fold_block", "fold_block_serial", "scan_topk", "search_one", "one_query_table",
           "QUERY_BLOCK", "DB_BLOCK", "SCAN_MAX_QUERIES", "ONE_QUERY_SERIAL_WORK", "NUMPY_EXACT_WORK"]

# A 1024 x 1024 float32 block is 4 MiB: large enough for GEMM to run near peak (many queries
# share each database row), small enough to stay in the last-level cache while it is folded.
QUERY_BLOCK = 1024
DB_BLOCK = 1024
# Below this many queries a GEMM cannot reuse database rows across queries, and one fused pass
# (distance + heap per row, vectors read once) beats GEMV plus a second pass over the scores.
SCAN_MAX_QUERIES = 4


# Up to this many query-row scores (q * n) one numpy pass can answer a batch exactly
# (``small_by_numpy``): one GEMM and a partial sort per row choose the survivors, whose distances
# are then recomputed and sorted as the fold path does. The fold kernel itself is not needed, so
# a first build's self-tune compiles little for its ground truth;
# it takes 1.5-2.5x the fold's time (tens of milliseconds at this size), and never more than this
# many scores are held at once (64 MiB).
NUMPY_EXACT_WORK = 1 << 24


# Scores are screened in chunks: the chunk's minimum is a branch-free, vectorisable reduction,
# and once the heaps are warm almost no chunk can beat the current k-th best, so the scalar
# heap path runs for a tiny fraction of the block.
_CHUNK = 32


@numba.njit(inline="always", cache=True, nogil=True)
def _fold_chunk(row, x_sqnorm, offset, j0, j1, proxy, use_mask, mask, hd, hi):
    two = np.float32(2.0)
    for j in range(j0, j1):
        if proxy == L2SQ:
            v = x_sqnorm[offset + j] - two * row[j]
        else:
            v = -row[j]
        if v < hd[0]:
            if use_mask and not mask[offset + j]:
                continue
            heap_push(hd, hi, v, offset + j)


@numba.njit(inline="always", fastmath=True, cache=True, nogil=True)
def _fold_row(row, x_sqnorm, offset, proxy, use_mask, mask, hd, hi):
    bn = row.shape[0]
    two = np.float32(2.0)
    j0 = 0
    while j0 + _CHUNK <= bn:
        best = np.float32(np.inf)
        if proxy == L2SQ:
            for j in range(j0, j0 + _CHUNK):
                best = min(best, x_sqnorm[offset + j] - two * row[j])
        else:
            for j in range(j0, j0 + _CHUNK):
                best = min(best, -row[j])
        if best < hd[0]:
            _fold_chunk(row, x_sqnorm, offset, j0, j0 + _CHUNK, proxy, use_mask, mask, hd, hi)
        j0 += _CHUNK
    _fold_chunk(row, x_sqnorm, offset, j0, bn, proxy, use_mask, mask, hd, hi)


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def fold_block(S, x_sqnorm, offset, proxy, mask, heap_d, heap_i, q_offset):
    """Fold one block of inner products into the running heaps (parallel over query rows).

    Parameters
    ----------
    S : float32 (bq, bn)
        Inner products of queries ``q_offset .. q_offset+bq`` with database rows
        ``offset .. offset+bn``.
    x_sqnorm : float32 (n,)
        Squared norms of all database rows (used when ``proxy`` is squared L2).
    offset : int
        Position of the block's first database row.
    proxy : int
        0 = squared L2 (without the query norm), 1 = negative inner product.
    mask : bool (n,) or (0,)
        Allowed database rows; an empty array means all are allowed.
    heap_d, heap_i : float32 / int64 (q, k)
        The running max-heaps, updated in place.
    q_offset : int
        Row of ``heap_d`` that corresponds to the block's first query.

    Notes
    -----
    ``fastmath`` is safe here: the k survivors are re-scored exactly by the caller.
    """
    use_mask = mask.shape[0] > 0
    for r in prange(S.shape[0]):
        _fold_row(S[r], x_sqnorm, offset, proxy, use_mask, mask, heap_d[q_offset + r], heap_i[q_offset + r])


@numba.njit(fastmath=True, cache=True, nogil=True)
def fold_block_serial(S, x_sqnorm, offset, proxy, mask, heap_d, heap_i, q_offset):
    """:func:`fold_block` on the calling thread only (for worker threads and one-thread runs)."""
    use_mask = mask.shape[0] > 0
    for r in range(S.shape[0]):
        _fold_row(S[r], x_sqnorm, offset, proxy, use_mask, mask, heap_d[q_offset + r], heap_i[q_offset + r])


@numba.njit(fastmath=True, cache=True, nogil=True)
def scan_topk(Q, X, k, proxy, mask, heap_d, heap_i, start=0, stop=-1):
    """Fused exact scan for a few queries: proxy of every row, folded straight into the heaps.

    Scans rows ``start .. stop`` of ``X`` (``stop=-1``: to the end); ids are row positions.
    Distances are computed directly (no norm expansion); the heaps are left unsorted.
    """
    use_mask = mask.shape[0] > 0
    d = X.shape[1]
    end = X.shape[0] if stop < 0 else stop
    for r in range(Q.shape[0]):
        q = Q[r]
        hd = heap_d[r]
        hi = heap_i[r]
        worst = hd[0]
        for i in range(start, end):
            if use_mask and not mask[i]:
                continue
            x = X[i]
            acc = np.float32(0.0)
            if proxy == L2SQ:
                for t in range(d):
                    diff = q[t] - x[t]
                    acc += diff * diff
            else:
                for t in range(d):
                    acc += q[t] * x[t]
                acc = -acc
            if acc < worst:
                heap_push(hd, hi, acc, i)
                worst = hd[0]


@numba.njit(cache=True, nogil=True)
def _finish_rows(heap_d, heap_i):
    for r in range(heap_d.shape[0]):
        heap_sort_inplace(heap_d[r], heap_i[r])


def _gemm_topk(Q, X, x_sqnorm, k, proxy, mask, x_start, x_stop, query_block, db_block):
    """Serial blocked GEMM + fold over database rows ``x_start .. x_stop``; unsorted heaps."""
    nq = Q.shape[0]
    heap_d, heap_i = new_heaps(nq, k)
    bq_max = min(query_block, nq)
    bn_max = min(db_block, x_stop - x_start)
    buf = np.empty(bq_max * bn_max, dtype=np.float32)
    for q0 in range(0, nq, bq_max):
        Qb = Q[q0:q0 + bq_max]
        for x0 in range(x_start, x_stop, bn_max):
            Xb = X[x0:min(x0 + bn_max, x_stop)]
            S = buf[: Qb.shape[0] * Xb.shape[0]].reshape(Qb.shape[0], Xb.shape[0])
            np.dot(Qb, Xb.T, out=S)
            fold_block_serial(S, x_sqnorm, x0, proxy, mask, heap_d, heap_i, q0)
    return heap_d, heap_i


def _partial_topk(Q, X, x_sqnorm, k, proxy, mask, x_start, x_stop, query_block, db_block):
    """Best-k candidates (unsorted heaps) of ``Q`` among database rows ``x_start .. x_stop``."""
    if Q.shape[0] <= SCAN_MAX_QUERIES:
        heap_d, heap_i = new_heaps(Q.shape[0], k)
        scan_topk(Q, X, k, proxy, mask, heap_d, heap_i, x_start, x_stop)
        return heap_d, heap_i
    return _gemm_topk(Q, X, x_sqnorm, k, proxy, mask, x_start, x_stop, query_block, db_block)


def _numpy_exact(Q, X, k, proxy, mask, exact_distances):
    """:func:`exact_search` of a small batch (``q * n <= NUMPY_EXACT_WORK``) with numpy alone."""
    nq, n = Q.shape[0], X.shape[0]
    S = Q @ X.T
    if proxy == L2SQ:
        S *= np.float32(-2.0)
        S += np.einsum("ij,ij->i", X, X)[None, :]
    else:
        np.negative(S, out=S)
    if mask.shape[0]:
        S[:, ~mask] = np.inf
    if k < n:
        ids = np.argpartition(S, k - 1, axis=1)[:, :k]
    else:
        ids = np.broadcast_to(np.arange(n), (nq, n)).copy()
    d = np.take_along_axis(S, ids, axis=1)
    ids = np.ascontiguousarray(np.where(np.isinf(d), -1, ids), dtype=np.int64)
    if exact_distances:
        # the fold path's own finish, so both paths return the same numbers in the same order
        d = rows_proxy(Q, X, ids, proxy)
        sort_rows_inplace(d, ids)
        return d, ids
    if proxy == L2SQ:
        d += np.einsum("ij,ij->i", Q, Q)[:, None]
    order = np.lexsort((ids, d))  # best first, equal distances by position, padding last
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(ids, order, axis=1)


def exact_search(
    Q: np.ndarray,
    X: np.ndarray,
    x_sqnorm: np.ndarray | None,
    k: int,
    proxy: int,
    mask: np.ndarray | None = None,
    *,
    exact_distances: bool = True,
    workers: int = 1,
    query_block: int = QUERY_BLOCK,
    db_block: int = DB_BLOCK,
    small_by_numpy: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest rows of ``X`` for every query, by proxy.

    Parameters
    ----------
    Q : float32 (q, d), C-contiguous
    X : float32 (n, d), C-contiguous (may be a memory map)
    x_sqnorm : float32 (n,) or None
        ``sqnorms(X)``; only read for squared L2 (None: computed here when needed).
    k : int
        Neighbours per query (``k <= n``); rows with fewer allowed rows are padded (+inf, -1).
    proxy : int
        0 = squared L2, 1 = negative inner product.
    mask : bool (n,), optional
        Allowed rows.
    exact_distances : bool, default True
        Recompute the proxies of the k survivors directly from the vectors (removes the
        cancellation error of the norm expansion) and re-sort.
    workers : int, default 1
        Threads. With more than one, the queries (or, for few queries, the database rows) are
        split over worker threads that each run single-threaded BLAS and serial numba code, and
        the partial results are merged; BLAS is held at one thread meanwhile.
    query_block, db_block : int
        Block sizes of the GEMM.
    small_by_numpy : bool, default False
        Choose the survivors of batches of at most ``NUMPY_EXACT_WORK`` scores with one numpy
        pass instead of the compiled fold (not compiled for them), at 1.5-2.5x the fold's time
        (for ground truth, not for search). Results equal the fold's up to ties.

    Returns
    -------
    (float32 (q, k) proxies ascending, int64 (q, k) row positions)
    """
    nq, n = Q.shape[0], X.shape[0]
    mask_arr = np.zeros(0, dtype=np.bool_) if mask is None else mask
    if small_by_numpy and SCAN_MAX_QUERIES < nq and nq * n <= NUMPY_EXACT_WORK:
        with blas_limit(max(1, workers)):
            return _numpy_exact(Q, X, k, proxy, mask_arr, exact_distances)
    if x_sqnorm is None:
        x_sqnorm = sqnorms(X) if proxy == L2SQ else np.zeros(0, dtype=np.float32)
    args = (x_sqnorm, k, proxy, mask_arr)
    workers = max(1, min(workers, n))
    if workers == 1 and nq <= SCAN_MAX_QUERIES:  # no BLAS on this path
        heap_d, heap_i = _partial_topk(Q, X, *args, 0, n, query_block, db_block)
    elif workers == 1:
        with blas_limit(1):
            heap_d, heap_i = _partial_topk(Q, X, *args, 0, n, query_block, db_block)
    elif nq >= workers * 64:
        # Enough queries for every worker: split them; each worker keeps whole heaps.
        bounds = np.linspace(0, nq, workers + 1).astype(np.int64)
        with blas_limit(1):
            parts = list(worker_pool(workers).map(
                lambda b: _partial_topk(Q[b[0]:b[1]], X, *args, 0, n, query_block, db_block),
                zip(bounds[:-1], bounds[1:]),
            ))
        heap_d = np.concatenate([p[0] for p in parts])
        heap_i = np.concatenate([p[1] for p in parts])
    else:
        # Few queries: split the database rows and merge the per-range candidates.
        bounds = np.linspace(0, n, workers + 1).astype(np.int64)
        with blas_limit(1):
            parts = list(worker_pool(workers).map(
                lambda b: _partial_topk(Q, X, *args, int(b[0]), int(b[1]), query_block, db_block),
                zip(bounds[:-1], bounds[1:]),
            ))
        heap_d, heap_i = parts[0]
        for d_part, i_part in parts[1:]:
            heap_d, heap_i = merge_topk(heap_d, heap_i, d_part, i_part, k)
    if exact_distances:
        heap_d = rows_proxy(Q, X, heap_i, proxy)
        sort_rows_inplace(heap_d, heap_i)
    else:
        _finish_rows(heap_d, heap_i)
        if proxy == L2SQ and nq > SCAN_MAX_QUERIES:
            heap_d += np.einsum("ij,ij->i", Q, Q)[:, None]
    return heap_d, heap_i


# ------------------------------------------------------------------------------------ one query
# Up to this many multiply-adds (n * d) one query scans on the calling thread whatever the thread
# setting: below it, handing halves of the rows to worker threads costs more than it saves.
ONE_QUERY_SERIAL_WORK = 1 << 21


def one_query_table(X: np.ndarray, ids: np.ndarray, proxy: int, terms: tuple):
    """The :class:`~.table.ArrayTable` :func:`search_one` reads.

    Parameters
    ----------
    X : float32 (n, d)
        The stored (prepared) vectors.
    ids : int64 (n,) or (0,)
        External id per row; empty: ids are rows.
    proxy : int
        0 = squared L2, 1 = negative inner product.
    terms : (bound, normalize, out_metric)
        As :func:`.query.prepare_query` and :func:`.query.finish_one` take them.
    """
    return make_table(X, ids, proxy, *terms)


_ONE_BLOCK = 1024  # rows whose proxies _scan_one computes before screening them


@numba.njit(fastmath=True, cache=True, nogil=True)
def _proxies(q, X, i0, i1, l2, out):
    """Proxies of rows ``i0 .. i1`` to ``q`` into ``out[: i1 - i0]``.

    Four rows at a time: their four sums are independent, so the vectorised loop over the
    dimensions keeps four reductions in flight instead of waiting on one (2-3x faster than a
    row at a time at d = 32). Nothing else happens in this loop: with heap offers in it, it ran
    2-3x slower.
    """
    d = q.shape[0]
    m = i1 - i0
    m4 = m - m % 4
    for j in range(0, m4, 4):
        i = i0 + j
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        if l2:
            for t in range(d):
                qt = q[t]
                e0 = qt - X[i, t]
                e1 = qt - X[i + 1, t]
                e2 = qt - X[i + 2, t]
                e3 = qt - X[i + 3, t]
                a0 += e0 * e0
                a1 += e1 * e1
                a2 += e2 * e2
                a3 += e3 * e3
        else:
            for t in range(d):
                qt = q[t]
                a0 -= qt * X[i, t]
                a1 -= qt * X[i + 1, t]
                a2 -= qt * X[i + 2, t]
                a3 -= qt * X[i + 3, t]
        out[j] = a0
        out[j + 1] = a1
        out[j + 2] = a2
        out[j + 3] = a3
    for j in range(m4, m):
        i = i0 + j
        acc = np.float32(0.0)
        if l2:
            for t in range(d):
                diff = q[t] - X[i, t]
                acc += diff * diff
        else:
            for t in range(d):
                acc -= q[t] * X[i, t]
        out[j] = acc


@numba.njit(fastmath=True, cache=True, nogil=True)
def _scan_one(q, X, proxy, mask, hd, hi):
    """Every row's proxy to ``q``, folded into the max-heap ``(hd, hi)`` (unsorted).

    A block of rows is scored first (:func:`_proxies`); then each run of 32 scores is compared
    with the heap's worst at once (a bit mask the compiler builds with vector compares) and only
    the rows whose bit is set are offered, lowest first: the unpredictable branch per row of a
    plain loop cost more than the scoring itself.
    """
    use_mask = mask.shape[0] > 0
    n = X.shape[0]
    l2 = proxy == L2SQ
    buf = np.empty(min(n, _ONE_BLOCK), dtype=np.float32)
    worst = hd[0]
    k = hd.shape[0]
    one = np.uint32(1)
    for i0 in range(0, n, _ONE_BLOCK):
        i1 = min(n, i0 + _ONE_BLOCK)
        m = i1 - i0
        _proxies(q, X, i0, i1, l2, buf)
        for c0 in range(0, m, 32):
            c1 = min(c0 + 32, m)
            bits = np.uint32(0)
            for j in range(c0, c1):
                if buf[j] < worst:
                    bits |= one << np.uint32(j - c0)
            while bits:
                j = c0 + trailing_zeros(bits)
                bits &= bits - one
                v = buf[j]
                if v < worst and (not use_mask or mask[i0 + j]):
                    # heap_push written out: an array handed to a function, even an inlined
                    # one, costs reference counting per call (10 % of this kernel)
                    pos = 0
                    while True:
                        child = 2 * pos + 1
                        if child >= k:
                            break
                        if child + 1 < k and hd[child + 1] > hd[child]:
                            child += 1
                        if hd[child] <= v:
                            break
                        hd[pos] = hd[child]
                        hi[pos] = hi[child]
                        pos = child
                    hd[pos] = v
                    hi[pos] = i0 + j
                    worst = hd[0]


@numba.njit(cache=True, nogil=True)
def search_one(q, table, k, mask, out_d, out_i):
    """The exact search of one query, from the raw query to the returned ids and distances.

    Parameters
    ----------
    q : float32 (d,)
        The query as the caller gave it; checked and prepared here (:func:`.query.prepare_query`).
    table : int64
        :func:`one_query_table` of the stored vectors.
    k : int
        ``1 <= k <= n``.
    mask : bool (n,) or (0,)
        Allowed rows; empty means all.
    out_d, out_i : float32 / int64 (k,)
        Receive the distances and ids, best first (+inf / -1 padded).

    Returns
    -------
    int
        0, or :data:`.query.BAD_QUERY` (nothing searched).

    Notes
    -----
    The same answer as :func:`exact_search` (the proxies of the ``k`` survivors re-computed
    by :func:`.distances.exact_pair`, ties by lower row), in one call and one pass over the
    vectors.
    """
    X = f32_2d(table, 0)
    ids = i64_1d(table, 4)
    proxy = int_at(table, 8)
    if q.shape[0] != X.shape[1]:  # (the caller checked; a rebuild may have come in between)
        return BAD_QUERY
    qp = np.empty(q.shape[0], dtype=np.float32)
    if prepare_query(q, f64_at(table, 9), int_at(table, 10) != 0, qp):
        return BAD_QUERY
    hd = np.full((1, k), np.inf, dtype=np.float32)
    hi = np.full((1, k), -1, dtype=np.int64)
    _scan_one(qp, X, proxy, mask, hd[0], hi[0])
    _rows_proxy_row(qp, X, hi[0], hd[0], proxy)
    sort_rows_inplace(hd, hi)
    finish_one(hd[0], hi[0], k, int_at(table, 11), ids, out_d, out_i)
    return 0
