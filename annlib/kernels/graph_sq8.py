"""HNSW walks on 8-bit scalar-quantized vectors, with exact float32 re-scoring at the end.

The walk (upper-layer descent and layer 0) scores neighbours on uint8 codes of the vectors, one
byte per dimension instead of four: on sets larger than the caches an evaluation then reads a
quarter of the cache lines. The result beam is kept by these approximate distances; its best
``rescore`` candidates are then scored exactly from the float32 vectors, and the ``k`` best of
them by exact distance are returned (the returned distances are exact).

Codes: per dimension ``j`` an offset ``o_j`` and a step ``s_j > 0``, ``x_j ~ o_j + s_j c_j`` with
``c_j = round((x_j - o_j) / s_j)`` clipped to 0..255 (:func:`sq8_fit`, :func:`sq8_encode`).
Approximate proxies of a query ``q`` (prepared once per query, :func:`sq8_prepare`), both a
constant plus one product of the codes with a float32 vector, so an evaluation costs one
fused multiply-add per dimension:

* squared L2: ``|q - x|^2 ~ sum_j (q_j - o_j)^2 + n_x - 2 sum_j s_j (q_j - o_j) c_j`` with the
  node's stored ``n_x = sum_j s_j^2 c_j^2`` (:func:`sq8_norms`);
* negative inner product: ``-<q, x> ~ -<q, o> - sum_j q_j s_j c_j``.

The loops convert uint8 to float32 and run with fast-math, so LLVM vectorises them (8 codes per
AVX2 instruction).

Graph layout, visited sets, beams and threads as in :mod:`.graph`; the walk reuses its building
blocks (:mod:`.beam`). Kernels of this module are compiled only for indexes built with codes.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from .beam import (FASTMATH, Beam, _allowed, cand_pop, cand_push, exact_proxy, new_beam, next_tag,
                   prefetch_row, row_lines)
from .distances import L2SQ
from .graph import ONE_QUERY_HEADER, GraphArrays, SearchOutput, _on_workers
from .query import BAD_QUERY, finish_one, prepare_query
from .table import (_address, bool_1d, bool_view, f32_1d, f32_2d, f32_view, f64_at, i32_1d, i32_2d, i64_1d,
                    i64_view, int_at, make_table, u16_view_2d, unowned)
from .topk import heap_push, heap_sort_inplace

__all__ = [
    "SQ8Arrays",
    "SQ8Params",
    "sq8_fit",
    "sq8_encode",
    "sq8_relative_noise",
    "sq8_norms",
    "sq8_prepare",
    "sq8_pair",
    "sq8_search_queries",
    "sq8_search_serial",
    "sq8_one_query_table",
    "sq8_search_one",
]

CODE_MAX = 255


class SQ8Arrays(NamedTuple):
    """The codes as the kernels read them.

    Attributes
    ----------
    codes : uint8 (cap, d)
        One code per dimension of every node (node order, as ``GraphArrays.vectors``).
    offset, step : float32 (d,)
        ``x_j ~ offset[j] + step[j] * code_j``; ``step > 0``.
    norms : float32 (cap,)
        ``sum_j (step[j] * code_j)^2`` per node (read by the L2 proxy only).
    """

    codes: np.ndarray
    offset: np.ndarray
    step: np.ndarray
    norms: np.ndarray


class SQ8Params(NamedTuple):
    """Per-call settings of :func:`sq8_search_queries`.

    Attributes
    ----------
    ef, k : int
        Beam width (>= k) and results per query.
    rescore : int
        Candidates of the beam (best by approximate distance) scored exactly; ``k <= rescore``
        (more than ``ef`` means all of them).
    mask, deleted : bool (n,) or (0,)
        Allowed nodes and tombstones (length 0: all / none).
    """

    ef: int
    k: int
    rescore: int
    mask: np.ndarray
    deleted: np.ndarray


# ------------------------------------------------------------------------------------ codes
def sq8_fit(X: np.ndarray, previous: tuple[np.ndarray, np.ndarray] | None = None,
            margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension offset and step of the codes of ``X`` (float32 (n, d), n >= 1).

    The range of each dimension is split into 255 steps. A dimension holding only integers
    within a range of at most 255 gets step 1 and its offset an integer, so its codes are exact
    (SIFT, MNIST: 0..255 pixel or histogram counts). A constant dimension gets step 1.

    Parameters
    ----------
    X : float32 (n, d)
    previous : (offset, step) or None
        The range being replaced (an add left it). Each dimension whose values now reach below
        or above it is widened on that side by ``margin`` times its new span, so a stream of adds
        that drift slowly out of the range re-fits it a logarithmic number of times, not once
        per add.
    margin : float, default 0.0

    Returns
    -------
    offset, step : float32 (d,)
    """
    X = np.asarray(X, np.float32)
    data_lo = X.min(axis=0).astype(np.float64)
    data_hi = X.max(axis=0).astype(np.float64)
    lo, hi = data_lo, data_hi
    if previous is not None and margin > 0.0:
        old_lo = previous[0].astype(np.float64)
        old_hi = old_lo + CODE_MAX * previous[1].astype(np.float64)
        extra = margin * (data_hi - data_lo)
        lo = np.where(data_lo < old_lo, data_lo - extra, data_lo)
        hi = np.where(data_hi > old_hi, data_hi + extra, data_hi)
    integral = data_hi - data_lo <= CODE_MAX  # decided on the data, not on the widened range
    for lo_row in range(0, X.shape[0], 1 << 14):  # blocks: the temporaries stay small
        block = X[lo_row:lo_row + (1 << 14)]
        integral &= np.all(block == np.round(block), axis=0)
    # integer data keep exact codes (step 1) with an integer offset at or below the smallest
    # value; room below it only as far as the 255 codes still reach the largest value (room
    # above is whatever the 255 codes leave)
    lo = np.where(integral, np.floor(np.maximum(lo, data_hi - CODE_MAX)), lo)
    # the offset as stored (float32), rounded down, so the smallest value never falls below it
    lo32 = lo.astype(np.float32)
    lo32 = np.where(lo32.astype(np.float64) > lo, np.nextafter(lo32, np.float32(-np.inf)), lo32)
    span = hi - lo32.astype(np.float64)
    step = np.where(integral | (span <= 0), 1.0, span / CODE_MAX)
    # a step that rounds to zero in float32 (a tiny but non-constant range) is raised to the
    # smallest one that keeps (x - o) / s finite
    step = np.maximum(step, np.finfo(np.float32).tiny * 1e6)
    return lo32.astype(np.float32), step.astype(np.float32)


def sq8_relative_noise(X: np.ndarray, offset: np.ndarray, step: np.ndarray, sample: int = 1 << 14) -> float:
    """Squared error of the codes of ``X`` relative to its spread: the mean of
    ``||x - decode(code(x))||^2`` over the sum of the per-dimension squared robust spreads
    (interquartile range / 1.349, the standard deviation of normal data), on up to ``sample``
    evenly spaced rows (float32 (n, d), n >= 1). 0 for exact codes (constant or integer data).

    The walk on codes keeps its beam by distances carrying this error; a few extreme values
    stretching one dimension's range make it large (see ``HNSW``'s ``walk="auto"``). The spread
    is robust because those same values would inflate a variance as much as the error.
    """
    X = np.asarray(X, np.float32)
    rows = X[::max(1, -(-X.shape[0] // sample))]
    decoded = offset + step * sq8_encode(rows, offset, step).astype(np.float32)
    error = float(np.mean(np.sum(np.square(rows - decoded, dtype=np.float64), axis=1)))
    q1, q3 = np.percentile(rows, [25.0, 75.0], axis=0)
    spread = float(np.sum(np.square((q3.astype(np.float64) - q1) / 1.349)))
    return 0.0 if error == 0.0 else error / max(spread, np.finfo(np.float64).tiny)


@numba.njit(cache=True, nogil=True)
def _encode_rows(X, offset, step, out):
    for i in range(X.shape[0]):
        for j in range(X.shape[1]):
            c = np.rint((X[i, j] - offset[j]) / step[j])
            out[i, j] = np.uint8(min(max(c, 0.0), float(CODE_MAX)))


def sq8_encode(X: np.ndarray, offset: np.ndarray, step: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Codes of the rows of ``X`` (values outside the fitted range are clipped to 0 or 255).

    Parameters
    ----------
    X : float32 (n, d)
    offset, step : float32 (d,)
    out : uint8 (n, d), optional
        Written in place when given.
    """
    if out is None:
        out = np.empty(X.shape, np.uint8)
    if X.shape[0]:
        _encode_rows(np.ascontiguousarray(X, np.float32), offset, step, out)
    return out


@numba.njit(cache=True, nogil=True)
def _norm_rows(codes, step, out):
    for i in range(codes.shape[0]):
        acc = 0.0
        for j in range(codes.shape[1]):
            v = step[j] * np.float64(codes[i, j])
            acc += v * v
        out[i] = np.float32(acc)


def sq8_norms(codes: np.ndarray, step: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``sum_j (step[j] * codes[i, j])^2`` of every row (float32 (n,); summed in float64)."""
    if out is None:
        out = np.empty(codes.shape[0], np.float32)
    if codes.shape[0]:
        _norm_rows(codes, step, out)
    return out


# ------------------------------------------------------------------------------------ distances
@numba.njit(inline="always", cache=True, nogil=True)
def sq8_prepare(q, sq8, proxy, qa):
    """Write the query's per-dimension weights into ``qa`` (float32 (d,)); returns the
    constant term (module docstring)."""
    o = sq8.offset
    s = sq8.step
    const = np.float32(0.0)
    if proxy == L2SQ:
        for j in range(q.shape[0]):
            u = q[j] - o[j]
            qa[j] = np.float32(-2.0) * s[j] * u
            const += u * u
    else:
        for j in range(q.shape[0]):
            qa[j] = -q[j] * s[j]
            const -= q[j] * o[j]
    return const


@numba.njit(inline="always", fastmath=True, cache=True, nogil=True)
def _sq8_dot(qa, c):
    acc = np.float32(0.0)
    for t in range(qa.shape[0]):
        acc += qa[t] * np.float32(c[t])
    return acc


@numba.njit(inline="always", cache=True, nogil=True)
def sq8_pair(qa, const, sq8, e, proxy):
    """Approximate proxy of the prepared query (``qa``, ``const``) and node ``e``."""
    if proxy == L2SQ:
        return const + sq8.norms[e] + _sq8_dot(qa, sq8.codes[e])
    return const + _sq8_dot(qa, sq8.codes[e])


# ------------------------------------------------------------------------------------ walk
@numba.njit(inline="always", cache=True, nogil=True)
def _sq8_descend(qa, const, graph, sq8, cur, cur_d, top, bottom):
    """Beam-1 descent on codes from layer ``top`` down to ``bottom + 1``; (node, dist, evals)."""
    upper = graph.links_upper
    ustart = graph.upper_start
    proxy = graph.proxy
    evals = 0
    for level in range(top, bottom, -1):
        changed = True
        while changed:
            changed = False
            row = ustart[cur] + level - 1
            cnt = upper[row, 0]
            for s in range(1, cnt + 1):
                e = upper[row, s]
                d = sq8_pair(qa, const, sq8, e, proxy)
                evals += 1
                if d < cur_d:
                    cur_d = d
                    cur = e
                    changed = True
    return cur, cur_d, evals


@numba.njit(inline="always", fastmath=FASTMATH, cache=True, nogil=True)
def _sq8_walk_layer0(qa, const, graph, sq8, ep, ep_d, mask, deleted, visited, tag, beam):
    """Best-first search of layer 0 on codes (as :func:`.graph.walk_layer`); returns the
    number of approximate evaluations. The result heap holds the ef best allowed nodes by
    approximate distance. Inlined into its caller (fast-math callers only: the batch and
    one-query kernels; see :func:`.graph.walk_layer`)."""
    proxy = graph.proxy
    links = graph.links_layer0
    C = sq8.codes
    Cd = beam.cand_dist
    Ci = beam.cand_ids
    Wd = beam.result_dist
    Wi = beam.result_ids
    nbuf = beam.neighbours
    Wd[:] = np.inf
    Wi[:] = -1
    visited[ep] = tag
    if _allowed(ep, mask, deleted):
        heap_push(Wd, Wi, ep_d, ep)
    size = cand_push(Cd, Ci, 0, ep_d, ep)
    evals = 0
    lines = row_lines(C)
    while size > 0:
        cd = Cd[0]
        c = Ci[0]
        if cd > Wd[0]:
            break
        size = cand_pop(Cd, Ci, size)
        if size > 0:
            prefetch_row(links, Ci[0], 1)
        cnt = links[c, 0]
        m = 0
        for s in range(1, cnt + 1):
            e = links[c, s]
            if visited[e] == tag:
                continue
            visited[e] = tag
            prefetch_row(C, e, lines)
            nbuf[m] = e
            m += 1
        evals += m
        for j in range(m):
            e = nbuf[j]
            d = sq8_pair(qa, const, sq8, e, proxy)
            if d < Wd[0]:
                size = cand_push(Cd, Ci, size, d, e)
                if _allowed(e, mask, deleted):
                    heap_push(Wd, Wi, d, e)
    return evals


@numba.njit(cache=True, nogil=True)
def _sq8_rescore(q, X, Wd, Wi, k, rescore, proxy, out_d, out_i):
    """Sort the beam by approximate distance, score its best ``rescore`` exactly, and write the
    ``k`` best of those by exact distance, ascending (+inf / -1 padded). Returns how many were
    scored exactly.

    Compiled on its own without fast-math: these are the distances users see.
    """
    heap_sort_inplace(Wd, Wi)
    m = 0
    while m < Wi.shape[0] and m < rescore and Wi[m] >= 0:
        m += 1
    out_d[:] = np.inf
    out_i[:] = -1
    # the candidates' float32 rows are mostly not in cache (the walk read their codes): ask for
    # all of them first so their misses overlap
    lines = row_lines(X)
    for j in range(m):
        prefetch_row(X, Wi[j], lines)
    for j in range(m):
        p = Wi[j]
        d = exact_proxy(q, X[p], proxy)
        if d < out_d[0]:
            heap_push(out_d, out_i, d, p)
    heap_sort_inplace(out_d, out_i)
    return m


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _sq8_descend_query(q, graph, sq8, qa):
    """Prepare ``q`` (codes' terms in ``qa``) and descend to layer 0 on codes; returns
    (query constant, node, its approximate distance, approximate evaluations)."""
    proxy = graph.proxy
    const = sq8_prepare(q, sq8, proxy, qa)
    cur = graph.entry
    cur_d = sq8_pair(qa, const, sq8, cur, proxy)
    ev = 1
    if graph.max_level > 0:
        cur, cur_d, e1 = _sq8_descend(qa, const, graph, sq8, cur, cur_d, graph.max_level, 0)
        ev += e1
    return const, cur, cur_d, ev


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def sq8_search_serial(Q, graph, sq8, params, visited, tags, out, t, n_chunks):
    """The share of :func:`sq8_search_queries` of chunk ``t`` of ``n_chunks`` (queries ``t``,
    ``t + n_chunks``, ...; visited set ``visited[t]``) on the calling thread. Returns 0.

    Arrays are read through views without a reference count, as in :func:`.graph.search_serial`.
    """
    graph = GraphArrays(*graph)
    sq8 = SQ8Arrays(*sq8)
    params = SQ8Params(*params)
    out_d, out_i, counts = SearchOutput(*out)
    nq = Q.shape[0]
    d = Q.shape[1]
    ef = params.ef
    width = graph.links_layer0.shape[1]
    owned = new_beam(ef, 4 * ef + 2 * width + 64, width, d)
    beam = Beam(unowned(owned.cand_dist), unowned(owned.cand_ids), unowned(owned.result_dist),
                unowned(owned.result_ids), unowned(owned.neighbours), unowned(owned.query_proj))
    qa = beam.query_proj
    graph = GraphArrays(unowned(graph.vectors), unowned(graph.links_layer0), unowned(graph.links_upper),
                        unowned(graph.upper_start), unowned(graph.levels), graph.entry, graph.max_level,
                        graph.proxy)
    sq8 = SQ8Arrays(unowned(sq8.codes), unowned(sq8.offset), unowned(sq8.step), unowned(sq8.norms))
    params = SQ8Params(params.ef, params.k, params.rescore, unowned(params.mask), unowned(params.deleted))
    Q = unowned(Q)
    out_d = unowned(out_d)
    out_i = unowned(out_i)
    visited_t = unowned(visited)[t]
    for r in range(t, nq, n_chunks):
        tag = next_tag(visited, tags, t)
        # the layer-0 walk inlined (see .graph.search_serial)
        q = Q[r]
        const, cur, cur_d, ev = _sq8_descend_query(q, graph, sq8, qa)
        ev += _sq8_walk_layer0(qa, const, graph, sq8, cur, cur_d, params.mask, params.deleted, visited_t, tag,
                               beam)
        ex = _sq8_rescore(q, graph.vectors, beam.result_dist, beam.result_ids, params.k, params.rescore,
                          graph.proxy, out_d[r], out_i[r])
        counts[r, 0] = ex
        counts[r, 1] = ev
    return owned.neighbours.shape[0] * 0  # 0; the read keeps the beam alive to here


def sq8_search_queries(Q, graph, sq8, params, visited, tags, out) -> None:
    """Search every row of ``Q`` on codes (chunks of queries on the worker pool).

    Parameters
    ----------
    Q : float32 (q, d)
        Queries prepared by the metric.
    graph : GraphArrays
        ``entry`` must be a node (>= 0).
    sq8 : SQ8Arrays
    params : SQ8Params
    visited : uint16 (chunks, >= n); tags : int64 (chunks,)
    out : SearchOutput
        ``counts[:, 0]`` receives the exact evaluations (the re-scored candidates),
        ``counts[:, 1]`` the approximate ones.
    """
    chunks = min(visited.shape[0], Q.shape[0])
    _on_workers(sq8_search_serial, chunks, lambda t: (Q, graph, sq8, params, visited, tags, out, t, chunks))


# ------------------------------------------------------------------------------------ one query
@numba.njit(inline="always", cache=True, nogil=True)
def _u8_2d(tab, s):
    return numba.carray(_address(tab[s]), (tab[s + 1], tab[s + 2]), np.uint8)


def sq8_one_query_table(graph: GraphArrays, sq8: SQ8Arrays, deleted: np.ndarray, node_positions: np.ndarray,
                        ids: np.ndarray, terms: tuple):
    """The :class:`~.table.ArrayTable` :func:`sq8_search_one` reads (arguments as
    :func:`.graph.one_query_table`, with the codes instead of FINGER's arrays)."""
    return make_table(graph.vectors, graph.links_layer0, graph.links_upper, graph.upper_start, graph.levels,
                      sq8.codes, sq8.offset, sq8.step, sq8.norms, deleted, node_positions, ids,
                      int(graph.entry), int(graph.max_level), int(graph.proxy), *terms)


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def sq8_search_one(q, table, k, ef, n_exact, mask, scratch, out_d, out_i):
    """One query from the raw query to the returned ids and distances, on codes: the walk of
    :func:`sq8_search_serial` with the query checked and prepared first and the result
    converted last, as :func:`.graph.search_one` does for the float walk.

    Parameters
    ----------
    q : float32 (d,)
        The query as the caller gave it.
    table : int64
        :func:`sq8_one_query_table` of the graph.
    k, ef : int
        Results (``1 <= k``) and beam width (``max(ef, k)`` is used).
    n_exact : int
        Candidates re-scored exactly (``k <= n_exact``).
    mask : bool (n,) or (0,)
        Allowed nodes (node order); empty means all.
    scratch : uint16 (ONE_QUERY_HEADER + n,)
        :func:`.graph.new_one_query_scratch`, used by one search at a time; its counters receive
        the searches, exact evaluations and evaluations on codes.
    out_d, out_i : float32 / int64 (k,)

    Returns
    -------
    int
        0, or :data:`.query.BAD_QUERY` (nothing searched).
    """
    graph = GraphArrays(f32_2d(table, 0), i32_2d(table, 4), i32_2d(table, 8), i64_1d(table, 12),
                        i32_1d(table, 16), int_at(table, 48), int_at(table, 49), int_at(table, 50))
    sq8 = SQ8Arrays(_u8_2d(table, 20), f32_1d(table, 24), f32_1d(table, 28), f32_1d(table, 32))
    deleted = bool_1d(table, 36)
    positions = i64_1d(table, 40)
    ids = i64_1d(table, 44)
    if q.shape[0] != graph.vectors.shape[1]:  # (the caller checked; a rebuild may have come in between)
        return BAD_QUERY
    d = q.shape[0]
    width = graph.links_layer0.shape[1]
    ef = max(ef, k)
    cap = 4 * ef + 2 * width + 64
    n_i64 = cap + ef + width + k
    n_f32 = cap + ef + 2 * d + k
    buf = np.empty(n_i64 + (n_f32 + 1) // 2, dtype=np.int64)
    at = buf.ctypes.data
    f32_at = at + 8 * n_i64
    qp = f32_view(f32_at + 4 * (cap + ef + d), d)
    if prepare_query(q, f64_at(table, 51), int_at(table, 52) != 0, qp):
        return BAD_QUERY
    best_d = f32_view(f32_at + 4 * (cap + ef + 2 * d), k)
    best_i = i64_view(at + 8 * (cap + ef + width), k)
    if graph.entry < 0:
        best_i[:] = -1
    else:
        mask = bool_view(mask.ctypes.data, mask.shape[0])  # the caller keeps it alive
        params = SQ8Params(ef, k, n_exact, mask, deleted)
        beam = Beam(f32_view(f32_at, cap), i64_view(at, cap), f32_view(f32_at + 4 * cap, ef),
                    i64_view(at + 8 * cap, ef), i64_view(at + 8 * (cap + ef), width),
                    f32_view(f32_at + 4 * (cap + ef), d))
        head = i64_view(scratch.ctypes.data, ONE_QUERY_HEADER // 4)
        n = scratch.shape[0] - ONE_QUERY_HEADER
        visited = u16_view_2d(scratch.ctypes.data + 2 * ONE_QUERY_HEADER, 1, n)
        tag = next_tag(visited, head, 0)
        # the layer-0 walk inlined, this kernel compiled with its fast-math flags (as
        # sq8_search_serial; round 6 of docs/benchmarks-hnsw.md)
        qa = beam.query_proj
        const, cur, cur_d, ev = _sq8_descend_query(qp, graph, sq8, qa)
        ev += _sq8_walk_layer0(qa, const, graph, sq8, cur, cur_d, params.mask, params.deleted, visited[0], tag,
                                beam)
        ex = _sq8_rescore(qp, graph.vectors, beam.result_dist, beam.result_ids, params.k, params.rescore, graph.proxy,
                          best_d, best_i)
        head[1] += 1
        head[2] += ex
        head[3] += ev
        if positions.shape[0] > 0:
            for j in range(k):
                best_i[j] = positions[best_i[j]]  # -1 maps to the trailing -1
    finish_one(best_d, best_i, k, int_at(table, 53), ids, out_d, out_i)
    return buf[0] * 0  # 0; the read keeps buf alive to here
