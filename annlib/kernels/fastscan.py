"""Scanning 4-bit PQ (or int8) codes leaf by leaf, and exact re-ranking (docs/partitioned.md).

The inner look-up is :func:`annlib.kernels.lut16.lut16_block`: 32 packed points against one
query's tables with the CPU's byte shuffle (64 or 32 look-ups per instruction), or a portable
loop. Around it this module walks each query's probed leaves and keeps a buffer of its best
``keep`` candidates.

Sums are exact 16-bit integers (the scale chosen in
:func:`annlib.kernels.quantization.build_luts` keeps them in range); they become an approximate
proxy ``acc * scale + base + leaf_bias + point_term`` only to be compared, a whole block at a
time, against the worst of the query's kept candidates.

The arrays of an index that the scan reads travel together as a :class:`PackedLeaves`; a query
batch's tables as :class:`LookupTables`; the leaves each query probes as :class:`Probes`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros

from .beam import exact_proxy, prefetch_row, row_lines
from .distances import exact_pair
from .quantization import LookupTables, _build_luts_rows
from .lut16 import lut16_block, lut16_block_generic, lut16_block_mask
from .query import BAD_QUERY, finish_one, prepare_query
from .table import f32_1d, f32_2d, f32_3d, f64_at, i32_1d, i64_1d, int_at, make_table, u8_3d
from .threads import run_split
from .topk import bisect_bar, finite_range, heap_push, heap_sort_inplace, new_heaps, smallest_sorted, sorted_insert

__all__ = [
    "POINT_BLOCK",
    "PackedLeaves",
    "LookupTables",
    "Probes",
    "PQIndexArrays",
    "lut_accumulate",
    "scan_pq",
    "scan_int8",
    "rerank",
    "select_leaves",
    "block_min",
    "search_pq_few",
    "select_all_pq",
    "search_pq_one",
    "pq_one_query_table",
    "ONE_QUERY_MAX_CANDIDATES",
]

POINT_BLOCK = 32  # points per packed block (the layout of quantization.pack_codes)
# Candidates ahead of the one being scored whose rows the exact re-ranking prefetches: far
# enough that a row has arrived when its turn comes, near enough that it is still in L1. On
# glove-50-200k and kdewall-sift-128-100k any distance from 8 to 24 re-ranked at the same speed
# (6 was slower at reorder 100-250); docs/benchmarks-partitioned.md, "Prefetched float32
# re-ranking".
RERANK_AHEAD = 12


class PackedLeaves(NamedTuple):
    """Every stored copy of a partitioned index, grouped by leaf in blocks of 32 entries.

    Attributes
    ----------
    block_offsets : int64 (L + 1,)
        First block of each leaf; ``block_offsets[0] == 0`` and ``block_offsets[L]`` is the
        number of blocks ``nb``. Leaf ``l`` owns entries ``32 * block_offsets[l]`` to
        ``32 * block_offsets[l + 1] - 1``.
    codes : uint8 (nb, M/2, 32) or int8 (nb * 32, d)
        Packed 4-bit PQ codes (:func:`annlib.kernels.quantization.pack_codes`), or int8 codes
        in entry order.
    entry_positions : int32 (nb * 32,)
        Vector position of each entry, -1 for padding.
    point_terms : float32 (nb * 32,) or (0,)
        Per-entry term added to the score (``||x||^2 / 2`` for squared L2), or empty.
    point_term_block_min : float32 (nb,) or (0,)
        Smallest ``point_terms`` entry of each block (:func:`block_min`), or empty.
    """

    block_offsets: np.ndarray
    codes: np.ndarray
    entry_positions: np.ndarray
    point_terms: np.ndarray
    point_term_block_min: np.ndarray


class Probes(NamedTuple):
    """The leaves each query probes.

    Attributes
    ----------
    leaf_ids : int64 (nq, t)
        Probed leaves, -1 = none.
    leaf_bias : float32 (nq, t)
        Proxy contribution of each probed leaf (``-<q, centre>``).
    """

    leaf_ids: np.ndarray
    leaf_bias: np.ndarray


class PQIndexArrays(NamedTuple):
    """What the fused few-query search (:func:`search_pq_few`) reads of a 4-bit PQ index.

    The fields of :class:`PackedLeaves` are repeated here rather than nested: numba types a
    nested tuple argument on every call, and this one is passed once per single-query search.

    Attributes
    ----------
    centres : float32 (L, d)
    centre_sqnorms : float32 (L,) or (0,)
        Squared centre norms: leaves rank by squared L2 when given, by ``-<q, c>`` when empty.
    codebooks : float32 (M, 16, w)
    block_offsets, codes, entry_positions, point_terms, point_term_block_min
        As in :class:`PackedLeaves`.
    vectors : float32 (n, d)
        Full-precision re-ranking vectors.
    """

    centres: np.ndarray
    centre_sqnorms: np.ndarray
    codebooks: np.ndarray
    block_offsets: np.ndarray
    codes: np.ndarray
    entry_positions: np.ndarray
    point_terms: np.ndarray
    point_term_block_min: np.ndarray
    vectors: np.ndarray

    @classmethod
    def of(cls, centres, centre_sqnorms, codebooks, leaves: PackedLeaves, vectors) -> "PQIndexArrays":
        return cls(centres, centre_sqnorms, codebooks, *leaves, vectors)


class _Buffers(NamedTuple):
    # Per-query candidate buffers: 2 * keep slots plus one block of slack, the fill count and the
    # admission threshold (the worst kept value once the buffer has been compacted).
    distances: np.ndarray
    positions: np.ndarray
    counts: np.ndarray
    thresholds: np.ndarray


def _new_buffers(nq: int, keep: int) -> _Buffers:
    # slots are read only below the fill count, and _finish_query blanks the first ``keep`` past
    # it: filling all of them first cost 0.4 us per query at keep 160
    width = 2 * keep + POINT_BLOCK
    return _Buffers(np.empty((nq, width), dtype=np.float32), np.empty((nq, width), dtype=np.int64),
                    np.zeros(nq, dtype=np.int64), np.full(nq, np.inf, dtype=np.float32))


# The positions held in one query's buffer are tracked in a map position -> buffer slot + 1
# (0: not held), as narrow as the buffer allows: allocated once per scan (per call of the fused
# few-query kernel), reset entry by entry as positions leave the buffer. (A small hash table
# instead measured 20 % slower in the scan.)
_SLOTS_U16 = np.zeros(0, dtype=np.uint16)
_SLOTS_I32 = np.zeros(0, dtype=np.int32)


def _slot_kind(keep: int) -> np.ndarray:
    """Zero-length array whose dtype holds every slot number of a buffer for ``keep``."""
    return _SLOTS_U16 if 2 * keep + POINT_BLOCK < 65535 else _SLOTS_I32


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
def _compact(bd, bi, n, keep, slots):
    """Quickselect: move the ``keep`` smallest of ``bd[:n]`` (with their ids) to the front.

    Returns the largest kept value, the new admission threshold of the buffer, and updates the
    slot map: evicted positions cleared, kept ones pointing at their new slots.
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
    for t in range(keep, n):
        slots[bi[t]] = 0
    for t in range(keep):
        slots[bi[t]] = t + 1
    return worst


@numba.njit(cache=True, nogil=True)
def _shrink(bd, bi, n, keep, slots):
    """Make room in a full candidate buffer: keep every entry at or below a bar that at least
    ``keep`` and at most ``keep + keep // 4`` of the ``n`` entries reach, in their order.

    Returns ``(bar, kept)``: the new admission threshold and fill count. The bar is found by
    bisection on the value, each step one vectorised counting pass (:func:`.topk.bisect_bar`);
    a quickselect mispredicts a branch per element and pass, and ran once per ``keep`` admissions
    (about half the scan's cost per admitted candidate). Nothing among the best ``keep`` is
    dropped (at least ``keep`` entries reach the bar), so the final exact selection
    (:func:`_compact`) sees the same best candidates. Falls back to :func:`_compact` when ties
    stop the bisection short.
    """
    entries = bd[:n]
    lo, high = finite_range(entries, n)  # every entry is finite (admitted below a threshold)
    most = keep + keep // 4
    bar, reached = bisect_bar(entries, lo, high, n, keep, most)
    if reached > most:
        return _compact(bd, bi, n, keep, slots), keep
    # branch-free: about half the entries stay, so a branch on it mispredicts every other entry
    # (the whole shrink of 216 entries measured 1.45 -> 1.03 us with the range above)
    w = 0
    for j in range(n):
        v = bd[j]
        p = bi[j]
        stays = v <= bar
        bd[w] = v
        bi[w] = p
        slots[p] = w + 1 if stays else 0
        w += stays
    return bar, w


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


@numba.njit(cache=True, nogil=True)
def _scan_query(table, a, base, leaf_ids, leaf_bias, block_offsets, flat, n_pairs, entry_pos, pt, pt_min, mask,
                bd, bi, keep, acc, slots, block_rows):
    """Walk one query's probed leaves into its candidate buffer ``bd, bi`` (empty on entry).

    ``block_rows`` is the packed codes viewed as one row per block (for prefetching). Returns
    ``(count, threshold)``: the buffer's fill and its admission threshold.
    """
    # Candidates are rejected on the integer sums, against a bar derived once from the float
    # threshold (per block when a per-point term exists, using the block's smallest term): the
    # shuffle kernel returns the bit mask of the sums under the bar, and only those are
    # converted to floats and appended to a buffer of 2 * keep (+ one block of slack) slots,
    # compacted to the best ``keep`` when full (which is also the only time the bar moves).
    # A position already held keeps its one slot with the better score of its copies, so spilled
    # copies never take two places and a copy scored badly (a large residual in its spilled
    # leaf) never hides a good one.
    # (This is the hot loop. The whole walk of a query is one compiled function, called once per
    # query, with the fill count and the threshold in locals: the same walk with the leaf loop
    # inlined from a helper and the count and threshold kept in the batch's arrays measured 10-13 %
    # slower on glove-50-200k at 24-56 leaves, on the same blocks and admissions. The admission
    # is written out here, which measured faster than an inlined helper.)
    has_pt = pt.shape[0] > 0
    use_mask = mask.shape[0] > 0
    cap = bd.shape[0] - POINT_BLOCK
    lines = (n_pairs * 32 + 63) // 64
    c = 0
    thr = np.float32(np.inf)
    for t in range(leaf_ids.shape[0]):
        leaf = leaf_ids[t]
        if leaf < 0:
            continue
        cst = base + leaf_bias[t]
        bar = _int_bar(thr - cst, a)
        # the next leaf's first blocks are elsewhere in memory (the hardware prefetcher follows
        # a leaf's blocks once it has seen a few, not the jump to the next leaf)
        if t + 1 < leaf_ids.shape[0] and leaf_ids[t + 1] >= 0:
            nxt = block_offsets[leaf_ids[t + 1]]
            prefetch_row(block_rows, nxt, min(2, block_offsets[leaf_ids[t + 1] + 1] - nxt) * lines)
        for blk in range(block_offsets[leaf], block_offsets[leaf + 1]):
            if has_pt:
                bar = _int_bar(thr - cst - pt_min[blk], a)
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
            while bits != 0:
                p = trailing_zeros(bits)
                bits &= bits - np.uint32(1)
                v = np.float32(acc[p]) * a + cst
                if has_pt:
                    v += pt[e0 + p]
                pos = entry_pos[e0 + p]
                if v < thr and pos >= 0:
                    if use_mask and not mask[pos]:
                        continue
                    held = slots[pos]
                    if held != 0:
                        if v < bd[held - 1]:
                            bd[held - 1] = v
                        continue
                    slots[pos] = c + 1
                    bd[c] = v
                    bi[c] = pos
                    c += 1
            if c >= cap:
                thr, c = _shrink(bd, bi, c, keep, slots)
                bar = _int_bar(thr - cst, a)
    return c, thr


@numba.njit(cache=True, nogil=True)
def _select_best(bd, bi, n, keep, slots):
    """Keep the ``keep`` smallest of ``bd[:n]`` (with their ids) at the front, in their order.

    Returns the largest kept value and updates the slot map as :func:`_compact` does. A bisection
    on the value (:func:`.topk.bisect_bar`) looks for a bar exactly ``keep`` entries reach; then
    the kept set is the one any exact selection keeps, taken in one branch-free pass (a
    quickselect mispredicts a branch per element and pass: 1.9-2.9 us per glove query at reorder
    100, about a tenth of the scan). When ties at the boundary leave no such bar, the
    quickselect decides (:func:`_compact`).
    """
    entries = bd[:n]
    lo, high = finite_range(entries, n)
    bar, reached = bisect_bar(entries, lo, high, n, keep, keep)
    if reached != keep:
        return _compact(bd, bi, n, keep, slots)
    w = 0
    worst = np.float32(-np.inf)
    for j in range(n):
        v = bd[j]
        p = bi[j]
        stays = v <= bar
        bd[w] = v
        bi[w] = p
        slots[p] = w + 1 if stays else 0
        w += stays
        worst = max(worst, v if stays else worst)
    return worst


@numba.njit(inline="always", cache=True, nogil=True)
def _finish_query(q, buf, keep, slots):
    # the query's buffer down to ``keep`` entries, (+inf, -1) in the slots up to ``keep`` past
    # them, and the slot map emptied for the next query
    if buf.counts[q] > keep:
        buf.thresholds[q] = _select_best(buf.distances[q], buf.positions[q], buf.counts[q], keep, slots)
        buf.counts[q] = keep
    for j in range(buf.counts[q]):
        slots[buf.positions[q, j]] = 0
    for j in range(buf.counts[q], keep):
        buf.distances[q, j] = np.inf
        buf.positions[q, j] = -1


@numba.njit(cache=True, nogil=True)
def _scan_pq_rows(tables, probes, leaves, mask, buf, keep, q_lo, q_hi, n_points, slot_kind):
    codes = leaves.codes
    n_pairs = codes.shape[1]
    flat = codes.reshape(-1)
    block_rows = codes.reshape(codes.shape[0], n_pairs * 32)
    T = tables.tables
    acc = np.empty(POINT_BLOCK, dtype=np.uint16)
    slots = np.zeros(n_points, dtype=slot_kind.dtype)
    for q in range(q_lo, q_hi):
        buf.counts[q], buf.thresholds[q] = _scan_query(
            T[q].reshape(-1), tables.scale[q], tables.base[q], probes.leaf_ids[q], probes.leaf_bias[q],
            leaves.block_offsets, flat, n_pairs, leaves.entry_positions, leaves.point_terms,
            leaves.point_term_block_min, mask, buf.distances[q], buf.positions[q], keep, acc, slots, block_rows)
        _finish_query(q, buf, keep, slots)


def _positions_needed(leaves: PackedLeaves) -> int:
    return int(np.asarray(leaves.entry_positions).max(initial=-1)) + 1


def _candidates(buf: _Buffers, keep: int) -> tuple[np.ndarray, np.ndarray]:
    # the first ``keep`` slots of each finished buffer (see _finish_query); a masked selection
    # over them (np.where) cost 0.6-1.0 us per query at keep 100-160
    return np.ascontiguousarray(buf.distances[:, :keep]), np.ascontiguousarray(buf.positions[:, :keep])


def scan_pq(tables: LookupTables, probes: Probes, leaves: PackedLeaves, mask: np.ndarray, n_cand: int,
            n_points: int | None = None, *, threads: int = 1):
    """Approximate top-``n_cand`` distinct candidates of every query from packed 4-bit PQ codes.

    Parameters
    ----------
    tables : LookupTables
        From :func:`annlib.kernels.quantization.build_luts`.
    probes : Probes
        Leaves each query probes.
    leaves : PackedLeaves
        The index's packed codes.
    mask : bool (n,) or (0,)
        Allowed positions; empty means all.
    n_cand : int
        Candidates kept per query.
    n_points : int, optional
        Number of vector positions (``> max(entry_positions)``); found from ``leaves`` when
        not given (a pass over the entries).
    threads : int, default 1
        Worker threads, each scanning a contiguous range of the queries (1: the calling thread).

    Returns
    -------
    (float32 (nq, n_cand), int64 (nq, n_cand))
        The best approximate proxies and their positions, unsorted, each position once (with
        the best score of its copies); (+inf, -1) where empty. When the probed leaves hold at
        most ``n_cand`` allowed positions, every one of them is a candidate.
    """
    nq = tables.tables.shape[0]
    buf = _new_buffers(nq, n_cand)
    if n_points is None:
        n_points = _positions_needed(leaves)
    slot_kind = _slot_kind(n_cand)
    run_split(lambda lo, hi: _scan_pq_rows(tables, probes, leaves, mask, buf, n_cand, lo, hi, int(n_points), slot_kind),
              nq, threads)
    return _candidates(buf, n_cand)


def block_min(pt, entry_positions=None):
    """Smallest per-entry term of each packed block (float32 (nb,)), empty for an empty ``pt``.

    The scan turns it into a per-block integer bar on the 16-bit sums. With ``entry_positions``
    (int (nb * 32,)), padding entries (-1) are left out: they are never admitted, and their term
    (0) would otherwise loosen the bar of every leaf's last block (a block of padding only gets
    +inf: nothing to admit).
    """
    pt = np.asarray(pt, dtype=np.float32)
    if pt.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    if entry_positions is not None:
        pt = np.where(np.asarray(entry_positions) >= 0, pt, np.float32(np.inf))
    return np.ascontiguousarray(pt.reshape(-1, POINT_BLOCK).min(axis=1), dtype=np.float32)


@numba.njit(cache=True, nogil=True)
def _scan_int8_rows(Qs, probes, leaves, mask, buf, keep, q_lo, q_hi, n_points, slot_kind):
    has_pt = leaves.point_terms.shape[0] > 0
    use_mask = mask.shape[0] > 0
    codes8 = leaves.codes
    entry_pos = leaves.entry_positions
    pt = leaves.point_terms
    d = codes8.shape[1]
    cap = buf.distances.shape[1] - POINT_BLOCK
    slots = np.zeros(n_points, dtype=slot_kind.dtype)
    for q in range(q_lo, q_hi):
        qv = Qs[q]
        bd = buf.distances[q]
        bi = buf.positions[q]
        c = buf.counts[q]
        for t in range(probes.leaf_ids.shape[1]):
            leaf = probes.leaf_ids[q, t]
            if leaf < 0:
                continue
            cst = probes.leaf_bias[q, t]
            for e in range(leaves.block_offsets[leaf] * POINT_BLOCK, leaves.block_offsets[leaf + 1] * POINT_BLOCK):
                pos = entry_pos[e]
                if pos < 0 or (use_mask and not mask[pos]):
                    continue
                acc = np.float32(0.0)
                row = codes8[e]
                for j in range(d):
                    acc += qv[j] * np.float32(row[j])
                v = cst - acc
                if has_pt:
                    v += pt[e]
                if not v < buf.thresholds[q]:
                    continue
                held = slots[pos]
                if held != 0:  # another copy held: keep the better score
                    if v < bd[held - 1]:
                        bd[held - 1] = v
                    continue
                slots[pos] = c + 1
                bd[c] = v
                bi[c] = pos
                c += 1
                if c >= cap:
                    buf.thresholds[q], c = _shrink(bd, bi, c, keep, slots)
        buf.counts[q] = c
        _finish_query(q, buf, keep, slots)


def scan_int8(Qs, probes: Probes, leaves: PackedLeaves, mask, n_cand: int, n_points: int | None = None, *,
              threads: int = 1):
    """Like :func:`scan_pq` for int8 scalar-quantized residuals.

    ``Qs`` (float32 (nq, d)) holds the queries already divided by the per-dimension multipliers,
    so ``<q, r> ~= <Qs, codes>``; ``leaves.codes`` is int8 (nb * 32, d) in entry order.
    """
    nq = Qs.shape[0]
    buf = _new_buffers(nq, n_cand)
    if n_points is None:
        n_points = _positions_needed(leaves)
    slot_kind = _slot_kind(n_cand)
    run_split(lambda lo, hi: _scan_int8_rows(Qs, probes, leaves, mask, buf, n_cand, lo, hi, int(n_points), slot_kind),
              nq, threads)
    return _candidates(buf, n_cand)


@numba.njit(cache=True, nogil=True)
def _rerank_rows(Q, X, cand_i, k, proxy, out_d, out_i, q_lo, q_hi):
    # candidates are distinct per row (the scans' slot map keeps one entry per position), so
    # nothing is sorted or de-duplicated here: a sort cost ~40 % of the re-ranking
    R = cand_i.shape[1]
    lines = row_lines(X)
    for q in range(q_lo, q_hi):
        ids = cand_i[q]
        hd = out_d[q]
        hi = out_i[q]
        # rows are requested RERANK_AHEAD candidates before they are scored, so their cache
        # misses overlap with the scoring instead of each being waited for in turn. (It replaced
        # a loop that loaded every candidate row before scoring, which this measured 1.1-1.8x
        # faster than; prefetching all rows before scoring gained less at reorder 100-250.)
        for j in range(min(RERANK_AHEAD, R)):
            if ids[j] >= 0:
                prefetch_row(X, ids[j], lines)
        qv = Q[q]
        for j in range(R):
            a = j + RERANK_AHEAD
            if a < R and ids[a] >= 0:
                prefetch_row(X, ids[a], lines)
            p = ids[j]
            if p < 0:
                continue
            # the fixed-order sum the other families return (eight independent chains: as fast
            # as a fast-math sum here, where the row's cache miss dominates)
            v = exact_pair(qv, X[p], proxy)
            if v < hd[0]:
                heap_push(hd, hi, v, p)
        heap_sort_inplace(hd, hi)


def rerank(Q, X, cand_i, k, proxy, *, threads=1):
    """Exact re-ranking of candidate positions: re-score, keep the best ``k``.

    Parameters
    ----------
    Q : float32 (nq, d)
    X : float32 (n, d)
        Full-precision vectors (may be a memory map).
    cand_i : int64 (nq, c)
        Candidate positions, -1 = none; distinct within a row (as the scans return them).
    k : int
    proxy : int
        0 = squared L2, 1 = negative inner product.
    threads : int, default 1

    Returns
    -------
    (float32 (nq, k) exact proxies ascending, int64 (nq, k) positions), (+inf, -1) padded.
    Distances are summed in the fixed order of :func:`.distances.exact_pair`.
    """
    nq = Q.shape[0]
    out_d, out_i = new_heaps(nq, k)
    run_split(lambda lo, hi: _rerank_rows(Q, X, cand_i, k, proxy, out_d, out_i, lo, hi), nq, threads)
    return out_d, out_i


@numba.njit(cache=True, nogil=True)
def _select_rows(D, t, out_d, out_i, lo, hi):
    for r in range(lo, hi):
        smallest_sorted(D[r], t, out_d[r], out_i[r])


def select_leaves(D, t, *, threads=1):
    """The ``t`` smallest entries of each row of ``D`` (leaf scores), best first.

    ``threads`` worker threads each take a contiguous range of the rows (1: the calling thread).

    Returns
    -------
    (float32 (m, t), int64 (m, t))
    """
    m = D.shape[0]
    out_d = np.full((m, t), np.inf, dtype=np.float32)
    out_i = np.full((m, t), -1, dtype=np.int64)
    D = np.ascontiguousarray(D, dtype=np.float32)
    run_split(lambda lo, hi: _select_rows(D, t, out_d, out_i, lo, hi), m, threads)
    return out_d, out_i


@numba.njit(cache=True, nogil=True)
def few_candidates(Q, index, t, mask, n_cand, slot_kind):
    """The scan stage of :func:`search_pq_few`: int64 (nq, n_cand) candidate positions of each
    query, distinct, -1 padded (shared with the int8 re-ranking's fused kernels,
    :mod:`.rerank_int8`)."""
    nq, d = Q.shape
    C = index.centres
    cn = index.centre_sqnorms
    l2 = cn.shape[0] > 0
    cb = index.codebooks
    L = C.shape[0]
    M, K, w = cb.shape
    Qp = np.zeros((nq, M * w), dtype=np.float32)
    for q in range(nq):  # (a sliced assignment compiles numba's broadcasting and its messages)
        for j in range(d):
            Qp[q, j] = Q[q, j]
    tables = LookupTables(np.empty((nq, M, K), dtype=np.uint8), np.empty(nq, dtype=np.float32),
                          np.empty(nq, dtype=np.float32))
    # row ranges start at a plain int64 zero: a literal 0 would compile second copies of the
    # kernels the batch path already compiled
    first = np.int64(0)
    _build_luts_rows(Qp, cb, tables.tables, tables.scale, tables.base, first, nq)
    probes = Probes(np.full((nq, t), -1, dtype=np.int64), np.zeros((nq, t), dtype=np.float32))
    sd = np.empty(t, dtype=np.float32)
    scores = np.empty(L, dtype=np.float32)
    for q in range(nq):
        S = np.dot(C, Q[q])
        for j in range(L):
            scores[j] = cn[j] - np.float32(2.0) * S[j] if l2 else -S[j]
        ids = probes.leaf_ids[q]
        smallest_sorted(scores, t, sd, ids)
        for j in range(t):
            if ids[j] >= 0:
                probes.leaf_bias[q, j] = -S[ids[j]]
    width = 2 * n_cand + POINT_BLOCK
    buf = _Buffers(np.full((nq, width), np.inf, dtype=np.float32), np.full((nq, width), -1, dtype=np.int64),
                   np.zeros(nq, dtype=np.int64), np.full(nq, np.inf, dtype=np.float32))
    leaves = PackedLeaves(index.block_offsets, index.codes, index.entry_positions, index.point_terms,
                          index.point_term_block_min)
    _scan_pq_rows(tables, probes, leaves, mask, buf, n_cand, first, nq, index.vectors.shape[0], slot_kind)
    cand = np.full((nq, n_cand), -1, dtype=np.int64)
    for q in range(nq):
        for j in range(min(buf.counts[q], n_cand)):
            cand[q, j] = buf.positions[q, j]
    return cand


@numba.njit(cache=True, nogil=True)
def _search_pq_few(Q, index, t, mask, n_cand, k, proxy, out_d, out_i, slot_kind):
    cand = few_candidates(Q, index, t, mask, n_cand, slot_kind)
    _rerank_rows(Q, index.vectors, cand, k, proxy, out_d, out_i, np.int64(0), Q.shape[0])


def search_pq_few(Q, index: PQIndexArrays, t: int, mask, n_cand: int, k: int, proxy: int):
    """The whole 4-bit PQ search of a few queries in one serial kernel call.

    Centre scoring, leaf selection, table building, the scan and the exact re-ranking of
    :func:`select_leaves`, :func:`annlib.kernels.quantization.build_luts`, :func:`scan_pq` and
    :func:`rerank`, fused so that a single query pays one call instead of about fifteen.

    Parameters
    ----------
    Q : float32 (nq, d), C-contiguous
        Queries (unpadded; padded to the codebooks' width inside).
    index : PQIndexArrays
    t : int
        Leaves probed per query (``1 <= t <= L``).
    mask : bool (n,) or (0,)
        Allowed positions; empty means all.
    n_cand : int
        Candidates re-ranked per query.
    k : int
    proxy : int
        0 = squared L2, 1 = negative inner product (of the re-ranking).

    Returns
    -------
    (float32 (nq, k) exact proxies ascending, int64 (nq, k) positions), (+inf, -1) padded.
    """
    out_d, out_i = new_heaps(Q.shape[0], k)
    _search_pq_few(Q, index, t, mask, n_cand, k, proxy, out_d, out_i, _slot_kind(n_cand))
    return out_d, out_i


@numba.njit(cache=True, nogil=True)
def _select_all_rows(T, codes, entry_positions, n_cand, out):
    nb, n_pairs = codes.shape[0], codes.shape[1]
    nq = T.shape[0]
    flat = codes.reshape(-1)
    n_entries = nb * POINT_BLOCK
    sums = np.empty((nq, n_entries), dtype=np.uint16)
    hist = np.zeros((nq, 65536), dtype=np.int32)
    tables = T.reshape(nq, -1)
    # blocks outside, queries inside: a block of codes is read from memory once for all queries
    for b in range(nb):
        a = b * POINT_BLOCK
        for q in range(nq):
            row = sums[q]
            lut16_block(flat, b * n_pairs * 32, tables[q], 0, n_pairs, row, a)
            h = hist[q]
            for p in range(a, a + POINT_BLOCK):  # counted while the block's sums are in L1
                h[row[p]] += 1
    for q in range(nq):
        row = sums[q]
        h = hist[q]
        for p in range(n_entries):  # padding entries do not count
            if entry_positions[p] < 0:
                h[row[p]] -= 1
        # the smallest sum value at which the count reaches n_cand: everything below it is
        # taken, and entries equal to it in entry order until n_cand are filled
        edge = 0
        below = 0
        while edge < 65535 and below + h[edge] < n_cand:
            below += h[edge]
            edge += 1
        ties = n_cand - below
        c = 0
        for p in range(n_entries):
            pos = entry_positions[p]
            if pos < 0:
                continue
            v = row[p]
            if v < edge:
                out[q, c] = pos
                c += 1
            elif v == edge and ties > 0:
                out[q, c] = pos
                c += 1
                ties -= 1
        for j in range(c, n_cand):
            out[q, j] = -1


def select_all_pq(tables: LookupTables, leaves: PackedLeaves, n_cand: int) -> np.ndarray:
    """Positions of the ``n_cand`` best approximate scores among every entry of the codes.

    For a large candidate share (attention keeps a few percent of a cache): every 16-bit sum is
    written once and a histogram of the 65,536 possible sums gives the selection threshold, so
    no candidate buffer is maintained during the scan (:func:`scan_pq`'s buffer re-selects
    each time it fills, which dominates when ``n_cand`` is thousands).

    Parameters
    ----------
    tables : LookupTables
        Per-query tables (:func:`annlib.kernels.quantization.build_luts`).
    leaves : PackedLeaves
        Packed codes; every entry is considered (leaves are ignored), padding (-1) skipped.
    n_cand : int
        Positions kept per query.

    Returns
    -------
    int64 (nq, n_cand)
        Positions, unordered, each once; -1 where fewer entries exist.
    """
    nq = tables.tables.shape[0]
    out = np.empty((nq, n_cand), dtype=np.int64)
    _select_all_rows(tables.tables, leaves.codes, leaves.entry_positions, n_cand, out)
    return out


# ------------------------------------------------------------------------------------ one query
# search_pq_one is compiled for 16-bit buffer slots only (one specialization, shared with
# search_pq_few's usual one); more candidates take search_pq_few.
ONE_QUERY_MAX_CANDIDATES = (65535 - POINT_BLOCK) // 2


def pq_one_query_table(index: PQIndexArrays, exact_positions: np.ndarray, ids: np.ndarray, proxy: int,
                       terms: tuple):
    """The :class:`~.table.ArrayTable` :func:`search_pq_one` reads.

    Parameters
    ----------
    index : PQIndexArrays
    exact_positions : int32 (e,)
        Positions compared exactly with every query (vectors without entries).
    ids : int64 (n,) or (0,)
        External id per position; empty: ids are positions.
    proxy : int
        0 = squared L2, 1 = negative inner product (of the re-ranking).
    terms : (bound, normalize, out_metric)
        As :func:`.query.prepare_query` and :func:`.query.finish_one` take them.
    """
    return make_table(*index, exact_positions, ids, proxy, *terms)


@numba.njit(inline="always", cache=True, nogil=True)
def pq_one_query_prologue(q, table):
    """What every one-query kernel over a :func:`pq_one_query_table` layout starts with: the
    index's arrays, the exact positions, the ids and the proxy read back from ``table``, and
    the raw query checked and prepared. Returns ``(index, exact, ids, proxy, Qp (1, d), ok)``;
    ``ok`` is False for a query of the wrong length (the caller checked; a rebuild may have come
    in between) or one :func:`.query.prepare_query` refuses."""
    index = PQIndexArrays(f32_2d(table, 0), f32_1d(table, 4), f32_3d(table, 8), i64_1d(table, 12),
                          u8_3d(table, 16), i32_1d(table, 20), f32_1d(table, 24), f32_1d(table, 28),
                          f32_2d(table, 32))
    d = q.shape[0]
    Qp = np.empty((1, d), dtype=np.float32)
    ok = d == index.vectors.shape[1]
    if ok:
        ok = not prepare_query(q, f64_at(table, 45), int_at(table, 46) != 0, Qp[0])
    return index, i32_1d(table, 36), i64_1d(table, 40), int_at(table, 44), Qp, ok


@numba.njit(cache=True, nogil=True)
def search_pq_one(q, table, t, n_cand, k, mask, out_d, out_i):
    """The whole 4-bit PQ search of one query, from the raw query to the returned ids and
    distances: :func:`search_pq_few` (the same code) with the query checked and prepared first
    (:func:`.query.prepare_query`), the probed leaves doubled while they hold fewer than ``k``
    allowed entries, the vectors without entries compared exactly, and the result converted
    last (:func:`.query.finish_one`).

    Parameters
    ----------
    q : float32 (d,)
        The query as the caller gave it.
    table : int64
        :func:`pq_one_query_table` of the index.
    t, n_cand, k
        As :func:`search_pq_few` takes them (``1 <= t <= L``; ``n_cand`` below
        :data:`ONE_QUERY_MAX_CANDIDATES`, so the candidate buffer's slots fit 16 bits).
    mask : bool (n,) or (0,)
        Allowed positions; empty means all.
    out_d, out_i : float32 / int64 (k,)
        Receive the distances and ids, best first (+inf / -1 padded).

    Returns
    -------
    int
        0, or :data:`.query.BAD_QUERY` (nothing searched).
    """
    index, exact, ids, proxy, Qp, ok = pq_one_query_prologue(q, table)
    if not ok:
        return BAD_QUERY
    L = index.centres.shape[0]
    best_d = np.empty((1, k), dtype=np.float32)
    best_i = np.empty((1, k), dtype=np.int64)
    # a writable array as the batch path passes (a global would be typed read-only: another copy)
    slots_u16 = np.zeros(0, dtype=np.uint16)
    while True:
        best_d[:] = np.inf
        best_i[:] = -1
        _search_pq_few(Qp, index, t, mask, n_cand, k, proxy, best_d, best_i, slots_u16)
        # short of k allowed entries in the probed leaves: probe twice as many (as the batch path)
        if t >= L or best_i[0, k - 1] >= 0:
            break
        t = min(L, 2 * t)
    merge_exact_one(Qp[0], index.vectors, exact, mask, proxy, best_d[0], best_i[0], k)
    finish_one(best_d[0], best_i[0], k, int_at(table, 47), ids, out_d, out_i)
    return 0


@numba.njit(cache=True, nogil=True)
def merge_exact_one(qv, X, exact, mask, proxy, hd, hi, k):
    """Offer the vectors without entries (``exact`` positions allowed by ``mask``), scored
    exactly, to one query's ascending results ``(hd, hi)`` of length ``k``."""
    use_mask = mask.shape[0] > 0
    for j in range(exact.shape[0]):
        p = np.int64(exact[j])
        if use_mask and not mask[p]:
            continue
        v = exact_proxy(qv, X[p], proxy)  # as the batch path's exact scan of these rows
        if v < hd[k - 1]:
            sorted_insert(hd, hi, k - 1, v, p)
