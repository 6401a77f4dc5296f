"""Scanning 4-bit PQ codes with 8-bit lookup tables, and exact re-ranking (ALGORITHMS §2.5-§2.6).

The inner look-up is :func:`annlib.kernels.lut16.lut16_block`: 32 packed points against one
query's tables with the CPU's byte shuffle (64 or 32 look-ups per instruction), or a portable
loop. Around it this module walks the probed leaves, either query by query (few queries) or leaf
by leaf (batches: a leaf's codes stay in cache while every query that probes it is scored).

Sums are exact 16-bit integers (the scale chosen in
:func:`annlib.kernels.quantization.build_luts` keeps them in range); they become an approximate
proxy ``acc * scale + base + leaf_bias + point_term`` only to be compared, a whole block at a
time, against the worst of the per-query candidate heap of size ``reorder``.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange
from numba.cpython.unsafe.numbers import trailing_zeros

from .distances import proxy_pair
from .quantization import _build_luts_rows
from .lut16 import lut16_block, lut16_block_generic, lut16_block_mask
from .topk import heap_push, heap_sort_inplace, new_heaps

__all__ = [
    "POINT_BLOCK",
    "lut_accumulate",
    "scan_pq",
    "scan_int8",
    "rerank",
    "select_leaves",
    "block_min",
    "search_pq_few",
]

POINT_BLOCK = 32  # points per packed block (the layout of quantization.pack_codes)


@numba.njit(cache=True, nogil=True)
def lut_accumulate(T, codes, generic=False):
    """Raw 16-bit sums of one query's table over every packed point (tests, tools).

    Parameters
    ----------
    T : uint8 (M, 16)
        One query's quantized table.
    codes : uint8 (nb, M/2, 32)
        Packed codes.
    generic : bool, default False
        Use the portable loop instead of the CPU's shuffle kernel.

    Returns
    -------
    (uint16 (nb * 32,), uint16 (nb,))
        The sums, and the smallest sum of each block (what the kernel returns).
    """
    nb, n_pairs = codes.shape[0], codes.shape[1]
    flat = codes.reshape(-1)
    table = T.reshape(-1)
    out = np.empty(nb * POINT_BLOCK, dtype=np.uint16)
    mins = np.empty(nb, dtype=np.uint16)
    for b in range(nb):
        if generic:
            mins[b] = lut16_block_generic(flat, b * n_pairs * 32, table, 0, n_pairs, out, b * POINT_BLOCK)
        else:
            mins[b] = lut16_block(flat, b * n_pairs * 32, table, 0, n_pairs, out, b * POINT_BLOCK)
    return out, mins


@numba.njit(cache=True, nogil=True)
def _compact(bd, bi, n, keep, seen):
    """Quickselect: move the ``keep`` smallest of ``bd[:n]`` (with their ids) to the front.

    Returns the largest kept value, the new admission threshold of the buffer. Evicted ids are
    cleared in ``seen`` (the per-query set of ids held, empty when not tracked).
    """
    lo = 0
    hi = n - 1
    kth = keep - 1
    while lo < hi:
        pivot = bd[(lo + hi) // 2]
        i = lo
        j = hi
        while i <= j:
            while bd[i] < pivot:
                i += 1
            while bd[j] > pivot:
                j -= 1
            if i <= j:
                td = bd[i]
                bd[i] = bd[j]
                bd[j] = td
                ti = bi[i]
                bi[i] = bi[j]
                bi[j] = ti
                i += 1
                j -= 1
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            break
    worst = bd[0]
    for t in range(1, keep):
        worst = max(worst, bd[t])
    if seen.shape[0] > 0:
        for t in range(keep, n):
            seen[bi[t]] = 0
    return worst


@numba.njit(inline="always", cache=True, nogil=True)
def _int_bar(lim, a):
    """Integer admission bar: an accumulator ``acc`` can pass ``acc * a < lim`` only if ``acc < bar``.

    Two units of slack cover the float rounding of ``lim``; survivors are re-checked in float, so
    the bar only has to be conservative. 65536 (above every 16-bit sum) admits everything.
    """
    if not lim < np.float32(np.inf) or not a > np.float32(0.0):
        return np.int64(65536)
    r = lim / a
    if r >= np.float32(65534.0):
        return np.int64(65536)
    if r < np.float32(-2.0):
        return np.int64(0)
    return np.int64(math.floor(r)) + 2


@numba.njit(inline="always", cache=True, nogil=True)
def _scan_leaf(q, leaf, cst, T, scale, leaf_start, flat, n_pairs, entry_pos, pt, pt_min, mask,
               buf_d, buf_i, cnt, thr, keep, acc, has_pt, use_mask, seen):
    # Candidates are rejected on the integer sums, against a bar derived once from the float
    # threshold (per block when a per-point term exists, using the block's smallest term): the
    # shuffle kernel returns the bit mask of the sums under the bar, and only those are
    # converted to floats and appended to a buffer of 2 * keep (+ one block of slack) slots,
    # compacted to the best ``keep`` when full (which is also the only time the bar moves).
    # With ``seen`` (query-major order) a point already held is not admitted again, so spilled
    # copies do not take two of the ``keep`` slots.
    dedupe = seen.shape[0] > 0
    table = T[q].reshape(-1)
    a = scale[q]
    cap = buf_d.shape[1] - POINT_BLOCK
    bd = buf_d[q]
    bi = buf_i[q]
    bar = _int_bar(thr[q] - cst, a)
    for blk in range(leaf_start[leaf], leaf_start[leaf + 1]):
        if has_pt:
            bar = _int_bar(thr[q] - cst - pt_min[blk], a)
        if bar <= 0:
            if has_pt:
                continue
            break  # without a per-point term the bar only falls: nothing left in this leaf
        # the shuffle kernel compares its sums with the bar on the vector registers and
        # returns the mask of the points under it; 65536 and above admit every point
        bits = lut16_block_mask(flat, blk * n_pairs * 32, table, 0, n_pairs, acc, 0,
                                np.uint16(min(bar, 65535)))
        if bar > 65535:
            bits = np.uint32(0xFFFFFFFF)
        if bits == 0:
            continue
        e0 = blk * POINT_BLOCK
        t_q = thr[q]
        c = cnt[q]
        while bits != 0:
            p = trailing_zeros(bits)
            bits &= bits - np.uint32(1)
            v = np.float32(acc[p]) * a + cst
            if has_pt:
                v += pt[e0 + p]
            pos = entry_pos[e0 + p]
            if v < t_q and pos >= 0:
                if use_mask and not mask[pos]:
                    continue
                if dedupe:
                    if seen[pos] != 0:
                        continue
                    seen[pos] = 1
                bd[c] = v
                bi[c] = pos
                c += 1
        if c >= cap:
            thr[q] = _compact(bd, bi, c, keep, seen)
            c = keep
            bar = _int_bar(thr[q] - cst, a)
        cnt[q] = c


@numba.njit(cache=True, nogil=True)
def _scan_query_major(T, scale, base, leaf_ids, leaf_bias, leaf_start, codes, entry_pos, pt,
                      pt_min, mask, buf_d, buf_i, cnt, thr, keep, q_lo, q_hi, n_points):
    n_pairs = codes.shape[1]
    flat = codes.reshape(-1)
    has_pt = pt.shape[0] > 0
    use_mask = mask.shape[0] > 0
    acc = np.empty(POINT_BLOCK, dtype=np.uint16)
    # ids held in the current query's buffer (all zero again after each query); n_points <= 0
    # turns the de-duplication off
    seen = np.zeros(max(n_points, 0), dtype=np.uint8)
    for q in range(q_lo, q_hi):
        for t in range(leaf_ids.shape[1]):
            leaf = leaf_ids[q, t]
            if leaf >= 0:
                _scan_leaf(q, leaf, base[q] + leaf_bias[q, t], T, scale, leaf_start, flat, n_pairs,
                           entry_pos, pt, pt_min, mask, buf_d, buf_i, cnt, thr, keep, acc, has_pt,
                           use_mask, seen)
        if seen.shape[0] > 0:
            if cnt[q] > keep:
                thr[q] = _compact(buf_d[q], buf_i[q], cnt[q], keep, seen)
                cnt[q] = keep
            for j in range(cnt[q]):
                seen[buf_i[q, j]] = 0


@numba.njit(cache=True, nogil=True)
def _group_by_leaf(leaf_ids, n_leaves, q_lo, q_hi):
    # counting sort of the (query, probe) pairs of queries q_lo..q_hi by leaf
    counts = np.zeros(n_leaves + 1, dtype=np.int64)
    for q in range(q_lo, q_hi):
        for t in range(leaf_ids.shape[1]):
            if leaf_ids[q, t] >= 0:
                counts[leaf_ids[q, t] + 1] += 1
    for l in range(n_leaves):
        counts[l + 1] += counts[l]
    fill = counts[:-1].copy()
    qq = np.empty(counts[n_leaves], dtype=np.int64)
    tt = np.empty(counts[n_leaves], dtype=np.int64)
    for q in range(q_lo, q_hi):
        for t in range(leaf_ids.shape[1]):
            leaf = leaf_ids[q, t]
            if leaf >= 0:
                qq[fill[leaf]] = q
                tt[fill[leaf]] = t
                fill[leaf] += 1
    return counts, qq, tt


@numba.njit(cache=True, nogil=True)
def _scan_leaf_major(T, scale, base, leaf_ids, leaf_bias, leaf_start, codes, entry_pos, pt,
                     pt_min, mask, buf_d, buf_i, cnt, thr, keep, q_lo, q_hi):
    # Same work as the query-major order, visited leaf by leaf so that a leaf's codes stay in
    # cache while every query that probes it is scored.
    n_pairs = codes.shape[1]
    n_leaves = leaf_start.shape[0] - 1
    flat = codes.reshape(-1)
    has_pt = pt.shape[0] > 0
    use_mask = mask.shape[0] > 0
    acc = np.empty(POINT_BLOCK, dtype=np.uint16)
    seen = np.zeros(0, dtype=np.uint8)  # queries interleave here: no de-duplication
    offsets, qq, tt = _group_by_leaf(leaf_ids, n_leaves, q_lo, q_hi)
    for leaf in range(n_leaves):
        for g in range(offsets[leaf], offsets[leaf + 1]):
            q = qq[g]
            _scan_leaf(q, leaf, base[q] + leaf_bias[q, tt[g]], T, scale, leaf_start, flat, n_pairs,
                       entry_pos, pt, pt_min, mask, buf_d, buf_i, cnt, thr, keep, acc, has_pt,
                       use_mask, seen)


@numba.njit(parallel=True, cache=True, nogil=True)
def _scan_parallel(leaf_major, T, scale, base, leaf_ids, leaf_bias, leaf_start, codes, entry_pos,
                   pt, pt_min, mask, buf_d, buf_i, cnt, thr, keep, chunks, n_points):
    nq = T.shape[0]
    step = (nq + chunks - 1) // chunks
    for c in prange(chunks):
        lo = c * step
        hi = min(nq, lo + step)
        if lo >= hi:
            continue
        if leaf_major:
            _scan_leaf_major(T, scale, base, leaf_ids, leaf_bias, leaf_start, codes, entry_pos,
                             pt, pt_min, mask, buf_d, buf_i, cnt, thr, keep, lo, hi)
        else:
            _scan_query_major(T, scale, base, leaf_ids, leaf_bias, leaf_start, codes, entry_pos,
                              pt, pt_min, mask, buf_d, buf_i, cnt, thr, keep, lo, hi, n_points)


def scan_pq(T, scale, base, leaf_ids, leaf_bias, leaf_start, codes, entry_pos, pt, mask,
            n_cand, *, leaf_major=False, threads=1, pt_block_min=None, n_points=0):
    """Approximate top-``n_cand`` candidates of every query from packed 4-bit PQ codes.

    Parameters
    ----------
    T, scale, base : from :func:`annlib.kernels.quantization.build_luts`
    leaf_ids : int64 (nq, t)
        Leaves each query probes (-1 = none).
    leaf_bias : float32 (nq, t)
        Proxy contribution of each probed leaf (e.g. ``-<q, centre>``).
    leaf_start : int64 (L + 1,)
        First packed block of each leaf.
    codes : uint8 (nb, M/2, 32)
        Packed codes (:func:`annlib.kernels.quantization.pack_codes`).
    entry_pos : int32 (nb * 32,)
        Vector position of each packed entry, -1 for padding.
    pt : float32 (nb * 32,) or (0,)
        Per-entry term added to the score (``||x||^2 / 2`` for squared L2), or empty.
    mask : bool (n,) or (0,)
        Allowed positions; empty means all.
    n_cand : int
        Heap size per query.
    leaf_major : bool, default False
        Visit the probes leaf by leaf instead of query by query (keeps a leaf's codes in cache
        across queries, but scatters the candidate buffers; measured slower on this project's
        machine, kept for experiments).
    threads : int, default 1
        Query chunks scanned in parallel (1 runs the serial kernel without a thread launch).
    pt_block_min : float32 (nb,) or None, default None
        Smallest ``pt`` of each packed block (:func:`block_min`); computed here when None and
        ``pt`` is not empty (callers that search often should compute it once).
    n_points : int, default 0
        Number of vector positions (``> max(entry_pos)``). When given (> 0), the query-major
        scan admits each position once, so spilled copies do not crowd the ``n_cand`` slots;
        0 keeps duplicates (they are removed by :func:`rerank`).

    Returns
    -------
    (float32 (nq, n_cand), int64 (nq, n_cand))
        The best approximate proxies and their positions, unsorted; (+inf, -1) where empty. A
        spilled point may appear twice.
    """
    nq = T.shape[0]
    buf_d = np.full((nq, 2 * n_cand + POINT_BLOCK), np.inf, dtype=np.float32)
    buf_i = np.full((nq, 2 * n_cand + POINT_BLOCK), -1, dtype=np.int64)
    cnt = np.zeros(nq, dtype=np.int64)
    thr = np.full(nq, np.inf, dtype=np.float32)
    if pt_block_min is None:
        pt_block_min = block_min(pt)
    args = (T, scale, base, leaf_ids, leaf_bias, leaf_start, codes, entry_pos, pt, pt_block_min, mask,
            buf_d, buf_i, cnt, thr, n_cand)
    if threads > 1 and nq > 1:
        _scan_parallel(bool(leaf_major), *args, min(threads, nq), int(n_points))
    elif leaf_major:
        _scan_leaf_major(*args, 0, nq)
    else:
        _scan_query_major(*args, 0, nq, int(n_points))
    _finish_buffers(buf_d, buf_i, cnt, n_cand)
    # slots past the fill count may hold rejected writes; blank them before returning
    live = np.arange(n_cand)[None, :] < cnt[:, None]
    buf_d[:, :n_cand][~live] = np.inf
    buf_i[:, :n_cand][~live] = -1
    cand_d = np.ascontiguousarray(buf_d[:, :n_cand])
    cand_i = np.ascontiguousarray(buf_i[:, :n_cand])
    return cand_d, cand_i


def block_min(pt):
    """Smallest per-entry term of each packed block (float32 (nb,)), empty for an empty ``pt``.

    The scan turns it into a per-block integer bar on the 16-bit sums.
    """
    pt = np.asarray(pt, dtype=np.float32)
    if pt.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    return np.ascontiguousarray(pt.reshape(-1, POINT_BLOCK).min(axis=1))


@numba.njit(cache=True, nogil=True)
def _finish_buffers(buf_d, buf_i, cnt, keep):
    for q in range(buf_d.shape[0]):
        if cnt[q] > keep:
            _compact(buf_d[q], buf_i[q], cnt[q], keep, np.zeros(0, dtype=np.uint8))


@numba.njit(cache=True, nogil=True)
def _scan_int8_rows(Qs, leaf_ids, leaf_bias, leaf_start, codes8, entry_pos, pt, mask,
                    cand_d, cand_i, q_lo, q_hi):
    has_pt = pt.shape[0] > 0
    use_mask = mask.shape[0] > 0
    d = codes8.shape[1]
    for q in range(q_lo, q_hi):
        qv = Qs[q]
        hd = cand_d[q]
        hi = cand_i[q]
        for t in range(leaf_ids.shape[1]):
            leaf = leaf_ids[q, t]
            if leaf < 0:
                continue
            cst = leaf_bias[q, t]
            for e in range(leaf_start[leaf] * POINT_BLOCK, leaf_start[leaf + 1] * POINT_BLOCK):
                acc = np.float32(0.0)
                row = codes8[e]
                for j in range(d):
                    acc += qv[j] * np.float32(row[j])
                v = cst - acc
                if has_pt:
                    v += pt[e]
                if v < hd[0]:
                    pos = entry_pos[e]
                    if pos < 0 or (use_mask and not mask[pos]):
                        continue
                    heap_push(hd, hi, v, pos)


@numba.njit(parallel=True, cache=True, nogil=True)
def _scan_int8_parallel(Qs, leaf_ids, leaf_bias, leaf_start, codes8, entry_pos, pt, mask,
                        cand_d, cand_i, chunks):
    nq = Qs.shape[0]
    step = (nq + chunks - 1) // chunks
    for c in prange(chunks):
        lo = c * step
        hi = min(nq, lo + step)
        if lo < hi:
            _scan_int8_rows(Qs, leaf_ids, leaf_bias, leaf_start, codes8, entry_pos, pt, mask,
                            cand_d, cand_i, lo, hi)


def scan_int8(Qs, leaf_ids, leaf_bias, leaf_start, codes8, entry_pos, pt, mask, n_cand, *, threads=1):
    """Like :func:`scan_pq` for int8 scalar-quantized residuals.

    ``Qs`` (float32 (nq, d)) holds the queries already divided by the per-dimension multipliers,
    so ``<q, r> ~= <Qs, codes8>``; ``codes8`` is int8 (nb * 32, d) in the packed entry order.
    """
    nq = Qs.shape[0]
    cand_d = np.full((nq, n_cand), np.inf, dtype=np.float32)
    cand_i = np.full((nq, n_cand), -1, dtype=np.int64)
    args = (Qs, leaf_ids, leaf_bias, leaf_start, codes8, entry_pos, pt, mask, cand_d, cand_i)
    if threads > 1 and nq > 1:
        _scan_int8_parallel(*args, min(threads, nq))
    else:
        _scan_int8_rows(*args, 0, nq)
    return cand_d, cand_i


@numba.njit(cache=True, nogil=True)
def _rerank_rows(Q, X, cand_i, k, proxy, out_d, out_i, q_lo, q_hi):
    R = cand_i.shape[1]
    ids = np.empty(R, dtype=np.int64)
    for q in range(q_lo, q_hi):
        # de-duplicate (spilled points can be candidates twice) by sorting the ids
        ids[:] = cand_i[q]
        ids.sort()
        hd = out_d[q]
        hi = out_i[q]
        # touch every candidate row first: independent loads overlap their cache misses,
        # where the scoring loop below would wait for one row at a time
        touch = np.float32(0.0)
        for j in range(R):
            p = ids[j]
            if p >= 0:
                x = X[p]
                for t in range(0, x.shape[0], 16):
                    touch += x[t]
        # keeps the loads alive: a test against NaN is folded to "false" by the compiler, which
        # then deleted this whole loop; a finite constant cannot be folded (and is never hit
        # by real data; if it were, the heap's first slot is overwritten by the scoring below)
        if touch == np.float32(-3.0e38):
            hd[0] = np.float32(np.inf)
        prev = -1
        for j in range(R):
            p = ids[j]
            if p < 0 or p == prev:
                continue
            prev = p
            v = proxy_pair(Q[q], X[p], proxy)
            if v < hd[0]:
                heap_push(hd, hi, v, p)
        heap_sort_inplace(hd, hi)


@numba.njit(parallel=True, cache=True, nogil=True)
def _rerank_parallel(Q, X, cand_i, k, proxy, out_d, out_i, chunks):
    nq = Q.shape[0]
    step = (nq + chunks - 1) // chunks
    for c in prange(chunks):
        lo = c * step
        hi = min(nq, lo + step)
        if lo < hi:
            _rerank_rows(Q, X, cand_i, k, proxy, out_d, out_i, lo, hi)


def rerank(Q, X, cand_i, k, proxy, *, threads=1):
    """Exact re-ranking of candidate positions: de-duplicate, re-score, keep the best ``k``.

    Parameters
    ----------
    Q : float32 (nq, d)
    X : float32 (n, d)
        Full-precision vectors (may be a memory map).
    cand_i : int64 (nq, c)
        Candidate positions, -1 = none; duplicates allowed.
    k : int
    proxy : int
        0 = squared L2, 1 = negative inner product.
    threads : int, default 1

    Returns
    -------
    (float32 (nq, k) exact proxies ascending, int64 (nq, k) positions), (+inf, -1) padded.
    """
    nq = Q.shape[0]
    out_d, out_i = new_heaps(nq, k)
    if threads > 1 and nq > 1:
        _rerank_parallel(Q, X, cand_i, k, proxy, out_d, out_i, min(threads, nq))
    else:
        _rerank_rows(Q, X, cand_i, k, proxy, out_d, out_i, 0, nq)
    return out_d, out_i


@numba.njit(cache=True, nogil=True)
def _select_rows(D, t, out_d, out_i, lo, hi):
    for r in range(lo, hi):
        hd = out_d[r]
        hi_ = out_i[r]
        row = D[r]
        for j in range(row.shape[0]):
            if row[j] < hd[0]:
                heap_push(hd, hi_, row[j], j)
        heap_sort_inplace(hd, hi_)


@numba.njit(parallel=True, cache=True, nogil=True)
def _select_parallel(D, t, out_d, out_i, chunks):
    n = D.shape[0]
    step = (n + chunks - 1) // chunks
    for c in prange(chunks):
        lo = c * step
        hi = min(n, lo + step)
        if lo < hi:
            _select_rows(D, t, out_d, out_i, lo, hi)


def select_leaves(D, t, *, threads=1):
    """The ``t`` smallest entries of each row of ``D`` (leaf scores), best first.

    A serial kernel when ``threads == 1`` so a single query pays no thread launch.

    Returns
    -------
    (float32 (m, t), int64 (m, t))
    """
    m = D.shape[0]
    out_d = np.full((m, t), np.inf, dtype=np.float32)
    out_i = np.full((m, t), -1, dtype=np.int64)
    D = np.ascontiguousarray(D, dtype=np.float32)
    if threads > 1 and m > 1:
        _select_parallel(D, t, out_d, out_i, min(threads, m))
    else:
        _select_rows(D, t, out_d, out_i, 0, m)
    return out_d, out_i


@numba.njit(cache=True, nogil=True)
def _search_pq_few(Q, C, cn, l2, t, cb, leaf_start, codes, entry_pos, pt, pt_min, mask,
                   n_cand, X, k, proxy, out_d, out_i):
    nq, d = Q.shape
    L = C.shape[0]
    M, K, w = cb.shape
    Qp = np.zeros((nq, M * w), dtype=np.float32)
    Qp[:, :d] = Q
    T = np.empty((nq, M, K), dtype=np.uint8)
    scale = np.empty(nq, dtype=np.float32)
    base = np.empty(nq, dtype=np.float32)
    _build_luts_rows(Qp, cb, T, scale, base, 0, nq)
    leaf_ids = np.full((nq, t), -1, dtype=np.int64)
    leaf_bias = np.zeros((nq, t), dtype=np.float32)
    sd = np.empty(t, dtype=np.float32)
    for q in range(nq):
        S = np.dot(C, Q[q])
        sd[:] = np.inf
        ids = leaf_ids[q]
        for j in range(L):
            v = cn[j] - np.float32(2.0) * S[j] if l2 else -S[j]
            if v < sd[0]:
                heap_push(sd, ids, v, j)
        heap_sort_inplace(sd, ids)
        for j in range(t):
            if ids[j] >= 0:
                leaf_bias[q, j] = -S[ids[j]]
    width = 2 * n_cand + POINT_BLOCK
    buf_d = np.full((nq, width), np.inf, dtype=np.float32)
    buf_i = np.full((nq, width), -1, dtype=np.int64)
    cnt = np.zeros(nq, dtype=np.int64)
    thr = np.full(nq, np.inf, dtype=np.float32)
    _scan_query_major(T, scale, base, leaf_ids, leaf_bias, leaf_start, codes, entry_pos, pt,
                      pt_min, mask, buf_d, buf_i, cnt, thr, n_cand, 0, nq, X.shape[0])
    _finish_buffers(buf_d, buf_i, cnt, n_cand)
    cand = np.full((nq, n_cand), -1, dtype=np.int64)
    for q in range(nq):
        for j in range(min(cnt[q], n_cand)):
            cand[q, j] = buf_i[q, j]
    _rerank_rows(Q, X, cand, k, proxy, out_d, out_i, 0, nq)


def search_pq_few(Q, C, cn, t, cb, leaf_start, codes, entry_pos, pt, pt_block_min, mask, n_cand,
                  X, k, proxy):
    """The whole 4-bit PQ search of a few queries in one serial kernel call.

    Centre scoring, leaf selection, table building, the scan and the exact re-ranking of
    :func:`select_leaves`, :func:`annlib.kernels.quantization.build_luts`, :func:`scan_pq` and
    :func:`rerank`, fused so that a single query pays one call instead of about fifteen.

    Parameters
    ----------
    Q : float32 (nq, d)
        Queries (unpadded; padded to the codebooks' width inside).
    C : float32 (L, d)
        Leaf centres.
    cn : float32 (L,) or (0,)
        Squared centre norms, which make leaves rank by squared L2; empty ranks them by
        ``-<q, c>``.
    t : int
        Leaves probed per query (``1 <= t <= L``).
    cb : float32 (M, 16, w)
        PQ codebooks.
    leaf_start, codes, entry_pos, pt, mask, n_cand
        As in :func:`scan_pq`.
    pt_block_min : float32 (nb,) or (0,)
        :func:`block_min` of ``pt``.
    X : float32 (n, d)
        Re-ranking vectors.
    k : int
    proxy : int
        0 = squared L2, 1 = negative inner product (of the re-ranking).

    Returns
    -------
    (float32 (nq, k) exact proxies ascending, int64 (nq, k) positions), (+inf, -1) padded.
    """
    nq = Q.shape[0]
    out_d, out_i = new_heaps(nq, k)
    _search_pq_few(np.ascontiguousarray(Q, dtype=np.float32), C, cn, cn.shape[0] > 0, int(t), cb,
                   leaf_start, codes, entry_pos, pt, pt_block_min, mask, int(n_cand), X, int(k),
                   int(proxy), out_d, out_i)
    return out_d, out_i
