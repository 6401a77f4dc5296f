"""Graph kernels for HNSW: layer walks, neighbour selection, batched insertion, repair, search.

Graph layout (chosen so one row is one or two cache lines and the walk touches few arrays),
handed to the kernels as one :class:`GraphArrays`:

* ``links_layer0`` int32 (cap, 2M + 1): layer 0; column 0 holds the neighbour count, columns
  ``1..count`` the neighbour node numbers.
* ``links_upper`` int32 (rows, M + 1): layers >= 1, same row format; node ``v`` owns the rows
  ``upper_start[v] + l - 1`` for ``l = 1..levels[v]`` (only about n/(M-1) rows in total).
* ``vectors`` float32 (cap, d) C-contiguous; distances are the proxies of
  :mod:`.distances` (0 = squared L2, 1 = negative inner product).

Walks run with re-association allowed (vectorised reductions) but without the no-inf/no-NaN
flags, because the result heaps start at +inf. Distances handed back to callers are recomputed
without fast-math, in a fixed order of operations (:func:`exact_proxy`).

numba's cache of a kernel holds the code of the kernels it calls and is renewed only when the
kernel's own file changes: a change to :mod:`.distances` or :mod:`.beam` that changes numbers
must come with a change of the files whose kernels call it (this module, ``blockwise``,
``fastscan``), or their cached copies keep the old code.

Scratch: a visited set is a uint16 array tagged with a per-query epoch (no clearing between
queries); the candidate min-heap and the bounded result max-heap (a :class:`~.beam.Beam`) are
allocated once per call (per thread chunk) and reused for every query of that chunk.

Threads: every kernel is serial; the multi-threaded entry points (:func:`insert_batch`,
:func:`link_reverse`, :func:`repair_deleted`, :func:`search_queries`) run chunks of one serial
kernel on the worker pool (:mod:`.threads`) instead of a ``prange`` loop, so one compiled kernel
serves one thread and many, and no parallel region is compiled on first use.

Calling convention: the entry points called from Python (:func:`search_queries`,
:func:`search_serial`, :func:`insert_batch`, :func:`link_reverse`, :func:`repair_deleted`)
take their bundles as :class:`GraphArrays` / :class:`SearchParams` / ``FingerArrays`` or as
plain tuples of the same fields in the same order, and rebuild the named tuple inside. Callers
on a latency-critical path pass plain tuples: numba's dispatcher fingerprints a plain tuple in
C, but types a named tuple through Python on every call (about 2 us per argument).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

from .beam import (FASTMATH, Beam, _allowed, cand_pop, cand_push, exact_proxy, new_beam, next_tag,
                   prefetch_row, row_lines, score_collected)
from .distances import proxy_pair
from .finger import FingerArrays, finger_walk, project_query, projected_descend
from .query import BAD_QUERY, finish_one, prepare_query
from .table import (bool_1d, bool_view, f32_1d, f32_2d, f32_view, f64_at, i32_1d, i32_2d, i64_1d, i64_view, int_at, make_table,
                    u16_view_2d, u64_2d, unowned)
from .threads import run_split
from .topk import heap_push, heap_sort_inplace, sort_pairs_stable

__all__ = [
    "GraphArrays",
    "SearchParams",
    "SearchOutput",
    "greedy_descend",
    "search_layer",
    "walk_layer",
    "select_heuristic",
    "insert_batch",
    "insert_chunk",
    "link_reverse",
    "reverse_edges",
    "link_groups",
    "repair_deleted",
    "repair_rows",
    "search_queries",
    "search_serial",
    "search_one",
    "one_query_table",
    "new_one_query_scratch",
    "scratch_counts",
    "ONE_QUERY_HEADER",
    "bfs_order",
    "relabel_rows",
]


class GraphArrays(NamedTuple):
    """Everything a walk reads of the graph (the family's state, as the kernels see it).

    Attributes
    ----------
    vectors : float32 (cap, d)
    links_layer0 : int32 (cap, 2M + 1)
    links_upper : int32 (rows, M + 1)
    upper_start : int64 (cap,)
        First row of ``links_upper`` owned by each node.
    levels : int32 (cap,)
        Top layer of each node.
    entry : int
        Entry node (-1: empty graph).
    max_level : int
        Level of the entry node.
    proxy : int
        Distance proxy code (:mod:`.distances`).
    """

    vectors: np.ndarray
    links_layer0: np.ndarray
    links_upper: np.ndarray
    upper_start: np.ndarray
    levels: np.ndarray
    entry: int
    max_level: int
    proxy: int


class SearchParams(NamedTuple):
    """Per-call settings of :func:`search_queries`.

    Attributes
    ----------
    ef, k : int
        Beam width (>= k) and results per query.
    mask : bool (n,) or (0,)
        Allowed nodes (length 0: all).
    deleted : bool (n,) or (0,)
        Tombstones (length 0: none).
    use_finger : bool
        Filter layer-0 expansions by FINGER estimates (needs a non-empty basis).
    projected_descent : bool
        With ``use_finger``: descend the upper layers on FINGER's basis projections
        (:func:`.finger.projected_descend`) instead of exact distances.
    """

    ef: int
    k: int
    mask: np.ndarray
    deleted: np.ndarray
    use_finger: bool
    projected_descent: bool


class SearchOutput(NamedTuple):
    """Where :func:`search_queries` writes its results (allocated by the caller: cheaper than
    handing new arrays back through the dispatcher).

    Attributes
    ----------
    distances : float32 (q, k)
        Exact proxies, ascending (+inf padding).
    nodes : int64 (q, k)
        Node numbers (-1 padding).
    counts : int64 (q, 2)
        Per query: exact distance evaluations, FINGER estimates.
    """

    distances: np.ndarray
    nodes: np.ndarray
    counts: np.ndarray


@numba.njit(inline="always", cache=True, nogil=True)
def greedy_descend(q, graph, cur, cur_d, top, bottom):
    """Beam-1 descent from layer ``top`` down to layer ``bottom + 1``; returns (node, dist, evals)."""
    X = graph.vectors
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
                d = proxy_pair(q, X[e], proxy)
                evals += 1
                if d < cur_d:
                    cur_d = d
                    cur = e
                    changed = True
    return cur, cur_d, evals


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def search_layer(q, graph, level, ep, ep_d, mask, deleted, visited, tag, beam):
    """Best-first search of one layer (HNSW's SEARCH-LAYER) from one entry point.

    ``beam.result_dist``/``beam.result_ids`` (length ef) receive the ef best allowed nodes as a
    max-heap (+inf/-1 where fewer were found); nodes excluded by ``mask``/``deleted`` are walked
    through but never enter the result heap. ``visited`` is one row of tags; ``tag`` marks this
    search. Returns the number of distance evaluations.

    Each expansion first collects the unvisited neighbours and asks the CPU to fetch their
    vectors, then computes the distances: the misses of a row overlap instead of queueing one
    after another (the walk is memory-bound once the vectors outgrow the caches).
    """
    return walk_layer(q, graph, level, ep, ep_d, mask, deleted, visited, tag, beam)


@numba.njit(inline="always", fastmath=FASTMATH, cache=True, nogil=True)
def walk_layer(q, graph, level, ep, ep_d, mask, deleted, visited, tag, beam):
    """:func:`search_layer` inlined into its caller (at numba IR level, so with the caller's
    fast-math flags: call it from fast-math kernels only).

    The batch and one-query kernels inline it: called as a function the same walk ran up to
    1.15x slower (SIFT-10k; 1.0-1.1x on the larger shared sets; round 6 of
    docs/benchmarks-hnsw.md).
    """
    X = graph.vectors
    ustart = graph.upper_start
    proxy = graph.proxy
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
    links = graph.links_layer0 if level == 0 else graph.links_upper
    lines = row_lines(X)
    while size > 0:
        cd = Cd[0]
        c = Ci[0]
        if cd > Wd[0]:
            break
        size = cand_pop(Cd, Ci, size)
        row = c if level == 0 else ustart[c] + level - 1
        if size > 0:
            nxt = Ci[0]
            prefetch_row(links, nxt if level == 0 else ustart[nxt] + level - 1, 1)
        cnt = links[row, 0]
        m = 0
        for s in range(1, cnt + 1):
            e = links[row, s]
            if visited[e] == tag:
                continue
            visited[e] = tag
            prefetch_row(X, e, lines)
            nbuf[m] = e
            m += 1
        evals += m
        size = score_collected(q, X, proxy, beam, m, size, mask, deleted)
    return evals


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def select_heuristic(X, proxy, cand_i, cand_d, m, max_out, out):
    """HNSW's neighbour-selection heuristic over ``m`` candidates sorted by distance to the base.

    A candidate is kept when no already kept neighbour is closer to it than the base is
    (diversity); stops at ``max_out``. With fewer than ``max_out`` candidates all are kept (as
    hnswlib does). Writes node numbers into ``out``; returns how many.
    """
    if m <= max_out:
        for a in range(m):
            out[a] = cand_i[a]
        return m
    n_out = 0
    for a in range(m):
        e = cand_i[a]
        de = cand_d[a]
        good = True
        for b in range(n_out):
            if proxy_pair(X[e], X[out[b]], proxy) < de:
                good = False
                break
        if good:
            out[n_out] = e
            n_out += 1
            if n_out >= max_out:
                break
    return n_out


def _on_workers(kernel, parts, args_of):
    """Sum of ``kernel(*args_of(t))`` over ``t = 0 .. parts - 1``: on the calling thread for one
    part, else one part per thread of the worker pool (the kernels release the GIL).

    Serial kernels run by a pool rather than ``prange``: a parallel region costs seconds of
    compilation on first use, and a small build or a single-threaded process never needs it.
    Called from a thread of that pool (a nested split), every part runs on the calling thread
    (:func:`.threads.run_split`), so the pool never waits on itself.
    """
    if parts <= 1:
        return int(kernel(*args_of(0)))
    done = run_split(lambda lo, hi: sum(int(kernel(*args_of(t))) for t in range(lo, hi)), parts, parts)
    return int(sum(done))


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def insert_chunk(graph, nodes, M, ef_c, visited, tags, t, n_chunks):
    """The share of :func:`insert_batch` of chunk ``t`` of ``n_chunks``: the nodes ``nodes[t]``,
    ``nodes[t + n_chunks]``, ..., inserted on the calling thread with visited set ``visited[t]``.
    Returns the number of distance evaluations.

    The graph's arrays, which every thread reads, are taken through views without a reference
    count (:func:`_graph_unowned`); the beam is this thread's own and is read last, so it
    outlives its views."""
    graph = _graph_unowned(GraphArrays(*graph))
    X = graph.vectors
    levels = graph.levels
    ustart = graph.upper_start
    links0 = graph.links_layer0
    upper = graph.links_upper
    entry = graph.entry
    max_level = graph.max_level
    proxy = graph.proxy
    nb = nodes.shape[0]
    empty_mask = np.zeros(0, dtype=np.bool_)
    owned = new_beam(ef_c, 4 * ef_c + 64, links0.shape[1], np.int64(0))
    beam = Beam(unowned(owned.cand_dist), unowned(owned.cand_ids), unowned(owned.result_dist),
                unowned(owned.result_ids), unowned(owned.neighbours), unowned(owned.query_proj))
    Wd = beam.result_dist
    Wi = beam.result_ids
    sel = np.empty(M, dtype=np.int64)
    nodes = unowned(nodes)
    visited = unowned(visited)
    ev = 0
    for b in range(t, nb, n_chunks):
        p = nodes[b]
        q = X[p]
        lq = levels[p]
        cur = entry
        cur_d = proxy_pair(q, X[cur], proxy)
        ev += 1
        if max_level > lq:
            cur, cur_d, e1 = greedy_descend(q, graph, cur, cur_d, max_level, lq)
            ev += e1
        for level in range(min(lq, max_level), -1, -1):
            tag = next_tag(visited, tags, t)
            ev += search_layer(q, graph, level, cur, cur_d, empty_mask, empty_mask,
                               visited[t], tag, beam)
            heap_sort_inplace(Wd, Wi)
            m = 0
            while m < ef_c and Wi[m] >= 0:
                m += 1
            ns = select_heuristic(X, proxy, Wi, Wd, m, M, sel)
            if level == 0:
                links0[p, 0] = ns
                for s in range(ns):
                    links0[p, 1 + s] = sel[s]
            else:
                row = ustart[p] + level - 1
                upper[row, 0] = ns
                for s in range(ns):
                    upper[row, 1 + s] = sel[s]
            if m > 0:
                cur = Wi[0]
                cur_d = Wd[0]
    return ev + owned.neighbours.shape[0] * 0  # the read keeps the beam alive to here


@numba.njit(inline="always", cache=True, nogil=True)
def _graph_unowned(graph):
    """``graph`` (a :class:`GraphArrays`) with its arrays as views without a reference count.

    Threads of a batch all read the same arrays: each view taken from them (``X[e]``) or
    hand-over to a helper that is not inlined would otherwise update one shared reference count
    atomically, a cache line both cores keep taking from each other. The caller keeps the
    arrays alive for the whole call.
    """
    return GraphArrays(unowned(graph.vectors), unowned(graph.links_layer0), unowned(graph.links_upper),
                       unowned(graph.upper_start), unowned(graph.levels), graph.entry, graph.max_level,
                       graph.proxy)


def insert_batch(graph, nodes, M, ef_c, visited, tags) -> int:
    """Insert ``nodes`` into the graph in parallel, each searching the graph as it was before.

    ``graph`` is a :class:`GraphArrays` (or the plain tuple of its fields) whose ``entry`` and
    ``max_level`` describe the graph before this batch. Writes each new node's own neighbour
    rows (up to ``M`` per layer, chosen by the heuristic); reverse edges are added afterwards by
    :func:`link_reverse`. Nodes of one batch do not see each other, which is why batches are
    kept small relative to the graph (see the family). ``visited`` (uint16) and ``tags`` (int64)
    have one row per thread chunk; the chunks (:func:`insert_chunk`) run on the worker pool, so
    the graph does not depend on their number. Returns the number of distance evaluations.
    """
    chunks = visited.shape[0]
    return _on_workers(insert_chunk, chunks, lambda t: (graph, nodes, M, ef_c, visited, tags, t, chunks))


@numba.njit(cache=True, nogil=True)
def reverse_edges(graph, nodes, level, group_of):
    """The edges the batch ``nodes`` has at ``level``, grouped by target for :func:`link_groups`.

    Returns ``(targets, starts, sources)``: int64 arrays; group ``g`` is target ``targets[g]``
    with sources ``sources[starts[g]:starts[g + 1]]`` in the order of the batch. ``group_of``
    (int64, one entry per node, all zero) is a workspace, left zero.
    """
    graph = GraphArrays(*graph)
    levels = graph.levels
    ustart = graph.upper_start
    links = graph.links_layer0 if level == 0 else graph.links_upper
    total = 0
    for b in range(nodes.shape[0]):
        p = nodes[b]
        if levels[p] >= level:
            row = p if level == 0 else ustart[p] + level - 1
            total += links[row, 0]
    targets = np.empty(total, dtype=np.int64)
    sizes = np.zeros(total, dtype=np.int64)
    n_groups = 0
    for b in range(nodes.shape[0]):
        p = nodes[b]
        if levels[p] >= level:
            row = p if level == 0 else ustart[p] + level - 1
            for s in range(1, links[row, 0] + 1):
                e = links[row, s]
                g = group_of[e] - 1
                if g < 0:
                    g = n_groups
                    group_of[e] = g + 1
                    targets[g] = e
                    n_groups += 1
                sizes[g] += 1
    starts = np.empty(n_groups + 1, dtype=np.int64)
    starts[0] = 0
    for g in range(n_groups):
        starts[g + 1] = starts[g] + sizes[g]
        sizes[g] = starts[g]  # from here on: the next free slot of the group
    sources = np.empty(total, dtype=np.int64)
    for b in range(nodes.shape[0]):
        p = nodes[b]
        if levels[p] >= level:
            row = p if level == 0 else ustart[p] + level - 1
            for s in range(1, links[row, 0] + 1):
                g = group_of[links[row, s]] - 1
                sources[sizes[g]] = p
                sizes[g] += 1
    for g in range(n_groups):
        group_of[targets[g]] = 0
    return targets[:n_groups], starts, sources


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def link_groups(graph, level, M_max, touched, targets, starts, sources, t, n_chunks):
    """Add the reverse edges of the groups ``t, t + n_chunks, ...`` of :func:`reverse_edges`
    at ``level``, shrinking overfull lists (the share of :func:`link_reverse` of one chunk).
    Returns the number of distance evaluations. Shared arrays through views without a
    reference count, as in :func:`insert_chunk`."""
    graph = _graph_unowned(GraphArrays(*graph))
    X = graph.vectors
    ustart = graph.upper_start
    proxy = graph.proxy
    links = graph.links_layer0 if level == 0 else graph.links_upper
    touched = unowned(touched)
    targets = unowned(targets)
    starts = unowned(starts)
    sources = unowned(sources)
    evals = 0
    for g in range(t, targets.shape[0], n_chunks):
        a0 = starts[g]
        a1 = starts[g + 1]
        e = targets[g]
        row = e if level == 0 else ustart[e] + level - 1
        cnt = links[row, 0]
        n_new = a1 - a0
        touched[e] = True
        if cnt + n_new <= M_max:
            for a in range(a0, a1):
                cnt += 1
                links[row, cnt] = sources[a]
            links[row, 0] = cnt
            continue
        m = cnt + n_new
        cand = np.empty(m, dtype=np.int64)
        cd = np.empty(m, dtype=np.float32)
        for s in range(cnt):
            cand[s] = links[row, 1 + s]
        for a in range(a0, a1):
            cand[cnt + a - a0] = sources[a]
        xe = X[e]
        for s in range(m):
            cd[s] = proxy_pair(xe, X[cand[s]], proxy)
        sort_pairs_stable(cd, cand, m)
        out = np.empty(M_max, dtype=np.int64)
        ns = select_heuristic(X, proxy, cand, cd, m, M_max, out)
        evals += m + ns * m
        links[row, 0] = ns
        for s in range(ns):
            links[row, 1 + s] = out[s]
    return evals


# Fewest groups (target rows) worth a worker thread of their own in link_reverse: a group costs
# a few microseconds (most re-select a full list), a hand-over to a worker tens. At 256, the
# batches below 512 targets (2,665 of 3,248 on a 100,000-vector GloVe build, 0.12 s of its
# 0.43 s of reverse links) ran on one thread; at 64, those below 128 (0.05 s) do.
_MIN_GROUPS_PER_CHUNK = 64


def link_reverse(graph, nodes, level, M_max, touched, group_of) -> int:
    """Add the reverse edges of the batch ``nodes`` at ``level``, shrinking overfull lists.

    Edges are grouped by target (:func:`reverse_edges`) so each target row is rewritten by
    exactly one thread; a full list is re-selected with the heuristic over its old neighbours
    plus all new sources. The result does not depend on the number of threads. ``touched``
    (bool, per node) is set for every target whose row changed; ``group_of`` is int64 with one
    zero per node (a workspace, left zero). Returns the number of distance evaluations.
    """
    targets, starts, sources = reverse_edges(graph, nodes, level, group_of)
    chunks = min(numba.get_num_threads(), targets.shape[0] // _MIN_GROUPS_PER_CHUNK)
    return _on_workers(link_groups, chunks,
                       lambda t: (graph, level, M_max, touched, targets, starts, sources, t, max(chunks, 1)))


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def repair_rows(graph, deleted, level, M_max, touched, t, n_chunks):
    """The share of :func:`repair_deleted` of chunk ``t`` of ``n_chunks`` (nodes ``t``,
    ``t + n_chunks``, ...). Returns 0."""
    graph = GraphArrays(*graph)
    X = graph.vectors
    levels = graph.levels
    ustart = graph.upper_start
    proxy = graph.proxy
    n = deleted.shape[0]
    links = graph.links_layer0 if level == 0 else graph.links_upper
    for p in range(t, n, n_chunks):
        if deleted[p] or levels[p] < level:
            continue
        row = p if level == 0 else ustart[p] + level - 1
        cnt = links[row, 0]
        has_dead = False
        for s in range(1, cnt + 1):
            if deleted[links[row, s]]:
                has_dead = True
                break
        if not has_dead:
            continue
        width = links.shape[1] - 1
        cand = np.empty(cnt * (width + 1), dtype=np.int64)
        m = 0
        for s in range(1, cnt + 1):
            e = links[row, s]
            if not deleted[e]:
                cand[m] = e
                m += 1
            else:
                drow = e if level == 0 else ustart[e] + level - 1
                for u in range(1, links[drow, 0] + 1):
                    f = links[drow, u]
                    if f == p or deleted[f]:
                        continue
                    dup = False
                    for w in range(m):
                        if cand[w] == f:
                            dup = True
                            break
                    if not dup:
                        cand[m] = f
                        m += 1
        # de-duplicate live neighbours that also came through a deleted one
        cd = np.empty(m, dtype=np.float32)
        for s in range(m):
            cd[s] = proxy_pair(X[p], X[cand[s]], proxy)
        sort_pairs_stable(cd, cand, m)
        ci = np.empty(m, dtype=np.int64)
        cds = np.empty(m, dtype=np.float32)
        mu = 0
        for s in range(m):
            v = cand[s]
            dup = False
            for w in range(mu):
                if ci[w] == v:
                    dup = True
                    break
            if not dup:
                ci[mu] = v
                cds[mu] = cd[s]
                mu += 1
        out = np.empty(M_max, dtype=np.int64)
        ns = select_heuristic(X, proxy, ci, cds, mu, M_max, out)
        links[row, 0] = ns
        for s in range(ns):
            links[row, 1 + s] = out[s]
        touched[p] = True
    return 0


# Fewest nodes worth a worker thread of their own in repair_deleted.
_MIN_NODES_PER_CHUNK = 4096


def repair_deleted(graph, deleted, level, M_max, touched) -> None:
    """Remove deleted nodes from every neighbour list of ``level`` and reconnect around them.

    ``deleted`` is bool (n,) over nodes. A live node that pointed to a deleted one re-selects
    (heuristic) among its live neighbours and the live neighbours of its deleted neighbours;
    deleted nodes' own rows are emptied afterwards by the caller. ``touched`` is set for every
    rewritten row's node. Chunks of nodes (:func:`repair_rows`) run on the worker pool.
    """
    chunks = max(1, min(numba.get_num_threads(), deleted.shape[0] // _MIN_NODES_PER_CHUNK))
    _on_workers(repair_rows, chunks, lambda t: (graph, deleted, level, M_max, touched, t, chunks))


# ------------------------------------------------------------------------------------ search
@numba.njit(inline="always", cache=True, nogil=True)
def _finish(q, X, Wd, Wi, k, proxy, out_d, out_i):
    """Sort the result heap, keep the best k, recompute their distances exactly, re-sort."""
    heap_sort_inplace(Wd, Wi)
    for j in range(k):
        p = Wi[j] if j < Wi.shape[0] else -1
        if p >= 0:
            out_d[j] = exact_proxy(q, X[p], proxy)
            out_i[j] = p
        else:
            out_d[j] = np.inf
            out_i[j] = -1
    sort_pairs_stable(out_d, out_i, k)  # k is small; ties keep the walk's order


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _descend(q, graph, finger, params, beam):
    """A query's way down to layer 0: greedy on exact distances, or on FINGER's projections.
    Returns (node, its exact distance, exact evaluations, estimates); with FINGER on,
    ``beam.query_proj`` receives the projected query."""
    X = graph.vectors
    proxy = graph.proxy
    cur = graph.entry
    n_est = 0
    descended = False
    # finger is None for a graph without FINGER: numba drops these branches when it compiles
    # that variant, so the FINGER walk is compiled only for graphs that have it
    if finger is not None and params.use_finger:
        project_query(q, finger, beam.query_proj)
        if params.projected_descent and graph.max_level > 0:
            cur, n_est = projected_descend(beam.query_proj, graph, finger, cur, graph.max_level, 0)
            descended = True
    cur_d = proxy_pair(q, X[cur], proxy)
    ev = 1
    if not descended and graph.max_level > 0:
        cur, cur_d, e1 = greedy_descend(q, graph, cur, cur_d, graph.max_level, 0)
        ev += e1
    return cur, cur_d, ev, n_est


def search_queries(Q, graph, finger, params, visited, tags, out) -> None:
    """Search every row of ``Q`` (chunks of queries on the worker pool, one visited set per chunk).

    Parameters
    ----------
    Q : float32 (q, d)
    graph : GraphArrays
        The graph (module docstring); ``entry`` must be a node (>= 0).
    finger : FingerArrays or None
        FINGER basis and payload (see :mod:`.finger`); read only if ``params.use_finger``.
        None for a graph without FINGER: the kernels are then compiled without the FINGER walk.
    params : SearchParams
    visited : uint16 (chunks, >= n); tags : int64 (chunks,)
        Reusable visited sets; one chunk of queries per row.
    out : SearchOutput
        Receives the results.
    """
    chunks = min(visited.shape[0], Q.shape[0])
    _on_workers(search_serial, chunks, lambda t: (Q, graph, finger, params, visited, tags, out, t, chunks))


# Graphs without FINGER pass None for their FINGER arrays (or for ``use_finger`` in
# :func:`search_one`): these helpers are resolved by type when a kernel compiles, so that variant
# never types, lowers or links the FINGER walk.
def _finger_view(finger):
    """FingerArrays ``finger`` as views without a reference count; None stays None."""


def _finger_rank(finger):
    """Rows of the FINGER basis (0 for None)."""


def _table_finger(table, use_finger):
    """The FINGER arrays of a one-query table, or None when ``use_finger`` is None."""


def _finger_on(use_finger, rank):
    """Whether the walk filters by FINGER: ``use_finger and rank > 0`` (False for None)."""


@overload(_finger_view, jit_options={"cache": True, "nogil": True})
def _ov_finger_view(finger):
    if isinstance(finger, types.NoneType):
        return lambda finger: None

    def impl(finger):
        f = FingerArrays(*finger)
        return FingerArrays(unowned(f.basis), unowned(f.codes), unowned(f.payload), unowned(f.table))
    return impl


@overload(_finger_rank, jit_options={"cache": True, "nogil": True})
def _ov_finger_rank(finger):
    if isinstance(finger, types.NoneType):
        return lambda finger: np.int64(0)
    return lambda finger: np.int64(finger.basis.shape[0])


@overload(_table_finger, jit_options={"cache": True, "nogil": True})
def _ov_table_finger(table, use_finger):
    if isinstance(use_finger, types.NoneType):
        return lambda table, use_finger: None
    return lambda table, use_finger: FingerArrays(f32_2d(table, 20), u64_2d(table, 24), f32_2d(table, 28),
                                                  f32_1d(table, 32))


@overload(_finger_on, jit_options={"cache": True, "nogil": True})
def _ov_finger_on(use_finger, rank):
    if isinstance(use_finger, types.NoneType):
        return lambda use_finger, rank: False
    return lambda use_finger, rank: use_finger and rank > 0


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def search_serial(Q, graph, finger, params, visited, tags, out, t, n_chunks):
    """The share of :func:`search_queries` of chunk ``t`` of ``n_chunks`` (queries ``t``,
    ``t + n_chunks``, ...; visited set ``visited[t]``), on the calling thread. ``t = 0,
    n_chunks = 1`` searches every query. Returns 0.

    The walk reads every array through a view without a reference count (:func:`.table.unowned`):
    each row it takes (``X[e]``, a payload row) and each hand-over to a helper would otherwise
    cost an atomic increment and decrement. The caller holds the arrays for the whole call, and
    ``owned`` (the beam allocated here) is read last so it outlives its views.
    """
    graph = GraphArrays(*graph)
    params = SearchParams(*params)
    out_d, out_i, counts = SearchOutput(*out)
    nq = Q.shape[0]
    ef = params.ef
    width = graph.links_layer0.shape[1]
    fview = _finger_view(finger)  # None (a graph without FINGER) stays None
    rank = _finger_rank(fview)
    owned = new_beam(ef, 4 * ef + 2 * width + 64, width, rank)
    beam = Beam(unowned(owned.cand_dist), unowned(owned.cand_ids), unowned(owned.result_dist),
                unowned(owned.result_ids), unowned(owned.neighbours), unowned(owned.query_proj))
    graph = GraphArrays(unowned(graph.vectors), unowned(graph.links_layer0), unowned(graph.links_upper),
                        unowned(graph.upper_start), unowned(graph.levels), graph.entry, graph.max_level,
                        graph.proxy)
    params = SearchParams(params.ef, params.k, unowned(params.mask), unowned(params.deleted),
                          params.use_finger, params.projected_descent)
    Q = unowned(Q)
    out_d = unowned(out_d)
    out_i = unowned(out_i)
    visited_t = unowned(visited)[t]
    for r in range(t, nq, n_chunks):
        tag = next_tag(visited, tags, t)
        # the layer-0 walks inlined: called as functions they ran up to 1.15x slower in batch
        # (docs/benchmarks-hnsw.md, round 6). finger is None (an argument never reassigned)
        # prunes the FINGER branch at compile time.
        q = Q[r]
        cur, cur_d, ev, est = _descend(q, graph, fview, params, beam)
        if finger is not None and params.use_finger:
            e2, e3 = finger_walk(q, graph, fview, cur, cur_d, params.mask, params.deleted, visited_t, tag, beam)
            ev += e2
            est += e3
        else:
            ev += walk_layer(q, graph, np.int64(0), cur, cur_d, params.mask, params.deleted, visited_t, tag, beam)
        _finish(q, graph.vectors, beam.result_dist, beam.result_ids, params.k, graph.proxy, out_d[r], out_i[r])
        counts[r, 0] = ev
        counts[r, 1] = est
    return owned.neighbours.shape[0] * 0  # 0; the read keeps the beam alive to here


# ------------------------------------------------------------------------------------ one query
# A one-query search's scratch is one uint16 array: ONE_QUERY_HEADER entries that hold four int64
# (the visited set's tag, then the searches, exact distance evaluations and FINGER estimates
# counted with this scratch), then the visited set (one entry per node).
ONE_QUERY_HEADER = 16


def new_one_query_scratch(n: int) -> np.ndarray:
    """A zeroed scratch of :func:`search_one` for a graph of ``n`` nodes."""
    return np.zeros(ONE_QUERY_HEADER + n, dtype=np.uint16)


def scratch_counts(scratch: np.ndarray) -> np.ndarray:
    """The (searches, exact evaluations, estimates) counters of a scratch, as a writable view."""
    return scratch[:ONE_QUERY_HEADER].view(np.int64)[1:]


def one_query_table(graph: GraphArrays, finger: FingerArrays, deleted: np.ndarray,
                    node_positions: np.ndarray, ids: np.ndarray, terms: tuple,
                    projected_descent: bool = False):
    """The :class:`~.table.ArrayTable` :func:`search_one` reads.

    Parameters
    ----------
    graph : GraphArrays
    finger : FingerArrays
        Rank 0 (empty basis) without FINGER.
    deleted : bool (n,) or (0,)
        Node tombstones (empty: none).
    node_positions : int64 (n + 1,) or (0,)
        Position of each node followed by -1 (empty: nodes are positions).
    ids : int64 (n_positions,) or (0,)
        External id of each position (empty: ids are positions).
    terms : (bound, normalize, out_metric)
        As :func:`.query.prepare_query` and :func:`.query.finish_one` take them.
    projected_descent : bool, default False
        :attr:`SearchParams.projected_descent` of a FINGER search.
    """
    return make_table(graph.vectors, graph.links_layer0, graph.links_upper, graph.upper_start,
                      graph.levels, finger.basis, finger.codes, finger.payload, finger.table, deleted,
                      node_positions, ids, int(graph.entry), int(graph.max_level), int(graph.proxy), *terms,
                      bool(projected_descent))


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def search_one(q, table, k, ef, use_finger, mask, scratch, out_d, out_i):
    """One query, from the raw query to the returned ids and distances: the walk of
    :func:`search_serial` (the same code) with the query checked and prepared first
    (:func:`.query.prepare_query`) and the result converted last (:func:`.query.finish_one`).

    Parameters
    ----------
    q : float32 (d,)
        The query as the caller gave it.
    table : int64
        :func:`one_query_table` of the graph.
    k, ef : int
        Results (``1 <= k``) and beam width (``max(ef, k)`` is used).
    use_finger : bool or None
        Filter layer 0 by FINGER when the graph has a basis. None for a graph without FINGER:
        the kernel is then compiled without the FINGER walk.
    mask : bool (n,) or (0,)
        Allowed nodes (node order); empty means all.
    scratch : uint16 (ONE_QUERY_HEADER + n,)
        :func:`new_one_query_scratch`, used by one search at a time.
    out_d, out_i : float32 / int64 (k,)
        Receive the distances and ids, best first (+inf / -1 padded).

    Returns
    -------
    int
        0, or :data:`.query.BAD_QUERY` (nothing searched).
    """
    graph = GraphArrays(f32_2d(table, 0), i32_2d(table, 4), i32_2d(table, 8), i64_1d(table, 12),
                        i32_1d(table, 16), int_at(table, 48), int_at(table, 49), int_at(table, 50))
    finger = _table_finger(table, use_finger)  # None when use_finger is None (no FINGER)
    rank = _finger_rank(finger)
    use = _finger_on(use_finger, rank)
    deleted = bool_1d(table, 36)
    positions = i64_1d(table, 40)
    ids = i64_1d(table, 44)
    if q.shape[0] != graph.vectors.shape[1]:  # (the caller checked; a rebuild may have come in between)
        return BAD_QUERY
    # every array of the search carved from one allocation (one allocation costs about as much
    # as the walk's first dozen distances on a small graph)
    d = q.shape[0]
    width = graph.links_layer0.shape[1]
    ef = max(ef, k)
    cap = 4 * ef + 2 * width + 64
    n_i64 = cap + ef + width + k
    n_f32 = cap + ef + rank + d + k
    buf = np.empty(n_i64 + (n_f32 + 1) // 2, dtype=np.int64)
    # Views without a reference count: the walk hands its arrays to many small functions, and
    # each hand-over of a counted array is an atomic increment and decrement. ``buf`` and
    # ``scratch`` outlive them (``buf`` is read again at the end).
    at = buf.ctypes.data
    f32_at = at + 8 * n_i64
    qp = f32_view(f32_at + 4 * (cap + ef + rank), d)
    if prepare_query(q, f64_at(table, 51), int_at(table, 52) != 0, qp):
        return BAD_QUERY
    best_d = f32_view(f32_at + 4 * (cap + ef + rank + d), k)
    best_i = i64_view(at + 8 * (cap + ef + width), k)
    if graph.entry < 0:
        best_i[:] = -1
    else:
        mask = bool_view(mask.ctypes.data, mask.shape[0])  # the caller keeps it alive
        params = SearchParams(ef, k, mask, deleted, use, use and int_at(table, 54) != 0)
        beam = Beam(f32_view(f32_at, cap), i64_view(at, cap), f32_view(f32_at + 4 * cap, ef),
                    i64_view(at + 8 * cap, ef), i64_view(at + 8 * (cap + ef), width),
                    f32_view(f32_at + 4 * (cap + ef), rank))
        head = i64_view(scratch.ctypes.data, ONE_QUERY_HEADER // 4)
        n = scratch.shape[0] - ONE_QUERY_HEADER
        visited = u16_view_2d(scratch.ctypes.data + 2 * ONE_QUERY_HEADER, 1, n)
        tag = next_tag(visited, head, 0)
        # the layer-0 walks inlined and this kernel compiled with their fast-math flags, as in
        # search_serial: 1.06-1.15x per call (round 6 of docs/benchmarks-hnsw.md)
        cur, cur_d, ev, est = _descend(qp, graph, finger, params, beam)
        if use_finger is not None and use:  # (an argument's None prunes the FINGER walk)
            e2, e3 = finger_walk(qp, graph, finger, cur, cur_d, mask, deleted, visited[0], tag, beam)
            ev += e2
            est += e3
        else:
            ev += walk_layer(qp, graph, np.int64(0), cur, cur_d, mask, deleted, visited[0], tag, beam)
        _finish(qp, graph.vectors, beam.result_dist, beam.result_ids, k, graph.proxy, best_d, best_i)
        head[1] += 1
        head[2] += ev
        head[3] += est
        if positions.shape[0] > 0:
            for j in range(k):
                best_i[j] = positions[best_i[j]]  # -1 maps to the trailing -1
    finish_one(best_d, best_i, k, int_at(table, 53), ids, out_d, out_i)
    return buf[0] * 0  # 0; the read keeps buf alive to here


# ------------------------------------------------------------------------------------ layout
@numba.njit(cache=True, nogil=True)
def bfs_order(links0, n, entry):
    """Breadth-first order of the layer-0 graph from ``entry`` (unreached nodes follow, each
    starting its own traversal). Returns int64 (n,) old node numbers in their new order.

    Renumbering nodes in this order puts a node's neighbours near it in memory, so the vectors
    and rows a walk reads next share cache lines, pages and DRAM rows with the current ones.
    """
    order = np.empty(n, dtype=np.int64)
    seen = np.zeros(n, dtype=np.bool_)
    head = 0
    tail = 0
    for s0 in range(-1, n):
        s = entry if s0 < 0 else s0
        if s < 0 or seen[s]:
            continue
        seen[s] = True
        order[tail] = s
        tail += 1
        while head < tail:
            v = order[head]
            head += 1
            for j in range(1, links0[v, 0] + 1):
                e = links0[v, j]
                if not seen[e]:
                    seen[e] = True
                    order[tail] = e
                    tail += 1
    return order


@numba.njit(cache=True, nogil=True)
def relabel_rows(links, inv):
    """Replace every node number ``v`` in the used slots of each row by ``inv[v]`` (in place;
    serial: one pass over the links, short next to the build that precedes it)."""
    for r in range(links.shape[0]):
        for j in range(1, links[r, 0] + 1):
            links[r, j] = inv[links[r, j]]
