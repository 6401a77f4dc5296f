"""Re-ranking from int8 rows, with exact float32 distances for the answer (docs/partitioned.md).

A partitioned index re-scores the ``reorder`` survivors of its 4-bit scan. With
``rerank="int8"`` it first scores all of them from an int8 copy of the vectors (one byte per
dimension, a quarter of a float32 row, so fewer cache misses per candidate), keeps the best
``k + margin`` (:func:`int8_keep`), and scores only those exactly from the float32 rows (with at
most twice that many candidates it scores them all exactly, skipping the int8 pass): the
distances returned are the exact ones and the order is by exact distance; int8 only decides
which candidates reach the exact stage.

Rows are quantized with one symmetric scale per row: ``x ~= scale * codes``, ``codes`` in
[-127, 127]. (On glove-50-angular-200k and kdewall-sift-128-100k a per-row scale lost less recall
before the exact stage than per-dimension scales, and it needs no refit when vectors are added:
each row is encoded on its own.) The approximate score of a row is the proxy of its
reconstruction: ``-scale * <q, codes>`` for the inner-product metrics, and for squared L2
``||x~||^2 / 2 - scale * <q, codes>``, i.e. ``(||q - x~||^2 - ||q||^2) / 2``, which ranks like
the distance to the reconstruction.

Only an index built with the option compiles these kernels; the float32 re-ranking of
:mod:`.fastscan` is untouched.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from .beam import FASTMATH, prefetch_row, row_lines
from .distances import exact_pair
from .fastscan import PQIndexArrays, _slot_kind, few_candidates, merge_exact_one, pq_one_query_prologue
from .query import BAD_QUERY, finish_one
from .table import f32_1d, i8_2d, int_at, make_table
from .threads import run_split
from .topk import heap_push, heap_sort_inplace, new_heaps

__all__ = ["Int8Rows", "INT8_MARGIN", "int8_keep", "int8_rows", "rerank_int8", "search_pq_few_int8",
           "pq_int8_one_query_table", "search_pq_one_int8"]

# Candidates kept past the int8 stage beyond ``k``. Measured at k=10, reorder 100 on
# glove-50-angular-200k (24 leaves) and kdewall-sift-128-100k (16 leaves): margin 0 lost 0.009
# and 0.010 recall@10 against float32 re-ranking, margin 2 at most 0.0004, margin 5 returned the
# same ids as float32 re-ranking for all 1,000 queries of both sets. 8 leaves slack for other
# data at the cost of 3 more exact rows per query.
INT8_MARGIN = 8
ENCODE_CHUNK = 65536  # rows quantized per step (bounds the float64 temporaries)


class Int8Rows(NamedTuple):
    """The int8 copy of an index's re-ranking rows.

    Attributes
    ----------
    codes : int8 (n, d)
        ``round(x / scale)``, in [-127, 127].
    scales : float32 (n,)
        Per-row scale ``max |x_j| / 127`` (1 for an all-zero row); positive and finite.
    half_sqnorms : float32 (n,) or (0,)
        For squared L2, ``||scale * codes||^2 / 2`` of each row; empty for inner products.
    """

    codes: np.ndarray
    scales: np.ndarray
    half_sqnorms: np.ndarray


def int8_rows(X: np.ndarray, l2: bool) -> Int8Rows:
    """Quantize float32 rows to :class:`Int8Rows` (new arrays; ``X`` is not kept).

    Parameters
    ----------
    X : float32 (n, d)
        Metric-prepared vectors (finite).
    l2 : bool
        Also compute the squared-L2 term ``half_sqnorms``.
    """
    n, d = X.shape
    codes = np.empty((n, d), dtype=np.int8)
    scales = np.empty(n, dtype=np.float32)
    half = np.empty(n if l2 else 0, dtype=np.float32)
    for s in range(0, n, ENCODE_CHUNK):
        e = min(n, s + ENCODE_CHUNK)
        block = np.asarray(X[s:e], dtype=np.float64)
        top = np.abs(block).max(axis=1) if d else np.zeros(e - s)
        sc = np.where(top > 0, top / 127.0, 1.0).astype(np.float32)
        c = np.clip(np.rint(block / sc[:, None].astype(np.float64)), -127, 127).astype(np.int8)
        codes[s:e] = c
        scales[s:e] = sc
        if l2:
            recon = c.astype(np.float64) * sc[:, None].astype(np.float64)
            half[s:e] = 0.5 * np.einsum("ij,ij->i", recon, recon)
    return Int8Rows(codes, scales, half)


def int8_keep(k: int, n_cand: int) -> int:
    """Candidates passed from the int8 stage to the exact one: ``k + INT8_MARGIN``, at most
    ``n_cand``."""
    return min(n_cand, k + INT8_MARGIN)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _int8_dot(qv, row):
    # the one int8 distance loop: re-association lets LLVM vectorise it (an approximate score,
    # used only to choose which candidates are scored exactly)
    acc = np.float32(0.0)
    for j in range(qv.shape[0]):
        acc += qv[j] * np.float32(row[j])
    return acc


@numba.njit(cache=True, nogil=True)
def _rerank_int8_rows(Q, codes, scales, half, X, cand_i, k, keep, proxy, out_d, out_i, q_lo, q_hi):
    R = cand_i.shape[1]
    has_half = half.shape[0] > 0
    lines8 = row_lines(codes)
    lines = row_lines(X)
    kd = np.empty(keep, dtype=np.float32)
    ki = np.empty(keep, dtype=np.int64)
    for q in range(q_lo, q_hi):
        ids = cand_i[q]
        qv = Q[q]
        if R <= 2 * keep:
            # few candidates: scoring them all exactly costs about what the int8 pass would
            # (which measured 3-14 % slower than float32 re-ranking at reorder 20, k 10)
            sel = ids
        else:
            # every candidate's int8 row requested first: the misses overlap instead of queueing
            # (gathering each candidate's scale and term into a local array in this loop as well
            # measured 5-20 % slower: the scoring loop's loads of them already overlap)
            for j in range(R):
                if ids[j] >= 0:
                    prefetch_row(codes, ids[j], lines8)
            for j in range(keep):
                kd[j] = np.inf
                ki[j] = -1
            for j in range(R):
                p = ids[j]
                if p < 0:
                    continue
                v = -scales[p] * _int8_dot(qv, codes[p])
                if has_half:
                    v += half[p]
                if v < kd[0]:
                    heap_push(kd, ki, v, p)
            sel = ki
        for j in range(sel.shape[0]):
            if sel[j] >= 0:
                prefetch_row(X, sel[j], lines)
        hd = out_d[q]
        hi = out_i[q]
        for j in range(sel.shape[0]):
            p = sel[j]
            if p < 0:
                continue
            # the same fixed-order sum as the float32 re-ranking: identical returned distances
            v = exact_pair(qv, X[p], proxy)
            if v < hd[0]:
                heap_push(hd, hi, v, p)
        heap_sort_inplace(hd, hi)


def rerank_int8(Q, rows: Int8Rows, X, cand_i, k: int, proxy: int, *, threads: int = 1):
    """Re-rank candidates from int8 rows, then score the best ``k + INT8_MARGIN`` exactly
    (all candidates exactly when there are at most ``2 (k + INT8_MARGIN)``).

    Parameters
    ----------
    Q : float32 (nq, d)
        Metric-prepared queries.
    rows : Int8Rows
        The int8 copy of ``X`` (:func:`int8_rows`).
    X : float32 (n, d)
        Full-precision rows (may be a memory map).
    cand_i : int64 (nq, c)
        Candidate positions, -1 = none; distinct within a row (as the scans return them).
    k : int
    proxy : int
        0 = squared L2, 1 = negative inner product.
    threads : int, default 1

    Returns
    -------
    (float32 (nq, k) exact proxies ascending, int64 (nq, k) positions), (+inf, -1) padded; the
    distances are those :func:`.fastscan.rerank` returns for the same positions.
    """
    nq = Q.shape[0]
    out_d, out_i = new_heaps(nq, k)
    keep = int8_keep(k, cand_i.shape[1])
    run_split(lambda lo, hi: _rerank_int8_rows(Q, rows.codes, rows.scales, rows.half_sqnorms, X, cand_i, k, keep,
                                               proxy, out_d, out_i, lo, hi), nq, threads)
    return out_d, out_i


@numba.njit(cache=True, nogil=True)
def _search_pq_few_int8(Q, index, codes, scales, half, t, mask, n_cand, k, proxy, out_d, out_i, slot_kind):
    cand = few_candidates(Q, index, t, mask, n_cand, slot_kind)
    keep = min(n_cand, k + INT8_MARGIN)
    _rerank_int8_rows(Q, codes, scales, half, index.vectors, cand, k, keep, proxy, out_d, out_i, np.int64(0),
                      Q.shape[0])


def search_pq_few_int8(Q, index: PQIndexArrays, rows: Int8Rows, t: int, mask, n_cand: int, k: int, proxy: int):
    """:func:`.fastscan.search_pq_few` with the int8 re-ranking of :func:`rerank_int8`.

    Parameters
    ----------
    Q, index, t, mask, n_cand, k, proxy
        As :func:`.fastscan.search_pq_few` takes them.
    rows : Int8Rows
        The int8 copy of ``index.vectors``.

    Returns
    -------
    (float32 (nq, k) exact proxies ascending, int64 (nq, k) positions), (+inf, -1) padded.
    """
    out_d, out_i = new_heaps(Q.shape[0], k)
    _search_pq_few_int8(Q, index, rows.codes, rows.scales, rows.half_sqnorms, t, mask, n_cand, k, proxy, out_d,
                        out_i, _slot_kind(n_cand))
    return out_d, out_i


def pq_int8_one_query_table(index: PQIndexArrays, rows: Int8Rows, exact_positions: np.ndarray, ids: np.ndarray,
                            proxy: int, terms: tuple):
    """The table :func:`search_pq_one_int8` reads: :func:`.fastscan.pq_one_query_table`'s
    layout (same offsets) followed by the three arrays of ``rows``."""
    return make_table(*index, exact_positions, ids, proxy, *terms, *rows)


@numba.njit(cache=True, nogil=True)
def search_pq_one_int8(q, table, t, n_cand, k, mask, out_d, out_i):
    """:func:`.fastscan.search_pq_one` with the int8 re-ranking: the raw query checked and
    prepared, the fused scan, int8 re-scoring of the candidates, the best ``k + INT8_MARGIN``
    scored exactly, the probed leaves doubled while they hold fewer than ``k`` allowed entries,
    the vectors without entries compared exactly, the result converted.

    Parameters
    ----------
    q : float32 (d,)
        The query as the caller gave it.
    table : int64
        :func:`pq_int8_one_query_table` of the index.
    t, n_cand, k
        As :func:`.fastscan.search_pq_one` takes them (``n_cand`` below
        :data:`.fastscan.ONE_QUERY_MAX_CANDIDATES`).
    mask : bool (n,) or (0,)
        Allowed positions; empty means all.
    out_d, out_i : float32 / int64 (k,)
        Receive the distances and ids, best first (+inf / -1 padded).

    Returns
    -------
    int
        0, or :data:`.query.BAD_QUERY` (nothing searched).
    """
    index, exact, ids, proxy, Qp, ok = pq_one_query_prologue(q, table)  # the same layout first
    if not ok:
        return BAD_QUERY
    codes = i8_2d(table, 48)
    scales = f32_1d(table, 52)
    half = f32_1d(table, 56)
    L = index.centres.shape[0]
    best_d = np.empty((1, k), dtype=np.float32)
    best_i = np.empty((1, k), dtype=np.int64)
    slots_u16 = np.zeros(0, dtype=np.uint16)
    while True:
        best_d[:] = np.inf
        best_i[:] = -1
        _search_pq_few_int8(Qp, index, codes, scales, half, t, mask, n_cand, k, proxy, best_d, best_i, slots_u16)
        # short of k allowed entries in the probed leaves: probe twice as many (as the batch path)
        if t >= L or best_i[0, k - 1] >= 0:
            break
        t = min(L, 2 * t)
    merge_exact_one(Qp[0], index.vectors, exact, mask, proxy, best_d[0], best_i[0], k)
    finish_one(best_d[0], best_i[0], k, int_at(table, 47), ids, out_d, out_i)
    return 0
