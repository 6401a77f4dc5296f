"""Graph kernels for HNSW: layer walks, neighbour selection, batched insertion, repair, search.

Graph layout (chosen so one row is one or two cache lines and the walk touches few arrays):

* ``links0`` int32 (cap, 2M + 1): layer 0; column 0 holds the neighbour count, columns
  ``1..count`` the neighbour positions.
* ``upper`` int32 (rows, M + 1): layers >= 1, same row format; node ``v`` owns the rows
  ``ustart[v] + l - 1`` for ``l = 1..levels[v]`` (only about n/(M-1) rows in total).
* ``X`` float32 (cap, d) C-contiguous vectors; distances are the proxies of
  :mod:`.distances` (0 = squared L2, 1 = negative inner product).

Walks run with re-association allowed (vectorised reductions) but without the no-inf/no-NaN
flags, because the result heaps start at +inf. Distances handed back to callers are recomputed
without fast-math (:func:`exact_proxy`).

Scratch: a visited set is a uint16 array tagged with a per-query epoch (no clearing between
queries); the candidate min-heap and the bounded result max-heap are allocated once per call
(per thread chunk) and reused for every query of that chunk.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .beam import FASTMATH, _allowed, cand_pop, cand_push, score_collected, exact_proxy, next_tag, prefetch_row, row_lines
from .distances import proxy_pair
from .finger import _finger_layer0
from .topk import heap_push, heap_sort_inplace

__all__ = [
    "greedy_descend",
    "search_layer",
    "select_heuristic",
    "insert_batch",
    "link_reverse",
    "repair_deleted",
    "search_queries",
    "search_serial",
    "bfs_order",
    "relabel_rows",
]



@numba.njit(inline="always", cache=True, nogil=True)
def greedy_descend(q, X, upper, ustart, cur, cur_d, top, bottom, proxy):
    """Beam-1 descent from layer ``top`` down to layer ``bottom + 1``; returns (node, dist, evals)."""
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
def search_layer(q, X, links0, upper, ustart, level, ep, ep_d, proxy, mask, deleted,
                 visited, tag, Cd, Ci, Wd, Wi, nbuf):
    """Best-first search of one layer (HNSW's SEARCH-LAYER) from one entry point.

    ``Wd``/``Wi`` (length ef) receive the ef best allowed nodes as a max-heap (+inf/-1 where
    fewer were found); nodes excluded by ``mask``/``deleted`` are walked through but never
    enter the result heap. ``visited`` is one row of tags; ``tag`` marks this search.
    ``nbuf`` (int64, >= row width) is scratch for the unvisited neighbours of one node.
    Returns the number of distance evaluations.

    Each expansion first collects the unvisited neighbours and asks the CPU to fetch their
    vectors, then computes the distances: the misses of a row overlap instead of queueing one
    after another (the walk is memory-bound once the vectors outgrow the caches).
    """
    Wd[:] = np.inf
    Wi[:] = -1
    visited[ep] = tag
    if _allowed(ep, mask, deleted):
        heap_push(Wd, Wi, ep_d, ep)
    size = cand_push(Cd, Ci, 0, ep_d, ep)
    evals = 0
    links = links0 if level == 0 else upper
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
        size = score_collected(q, X, nbuf, m, proxy, Cd, Ci, size, Wd, Wi, mask, deleted)
    return evals


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def select_heuristic(X, proxy, cand_i, cand_d, m, max_out, out):
    """HNSW's neighbour-selection heuristic over ``m`` candidates sorted by distance to the base.

    A candidate is kept when no already kept neighbour is closer to it than the base is
    (diversity); stops at ``max_out``. With fewer than ``max_out`` candidates all are kept (as
    hnswlib does). Writes positions into ``out``; returns how many.
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


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def insert_batch(X, nodes, levels, ustart, links0, upper, entry, max_level, M, ef_c, proxy,
                 visited, tags):
    """Insert ``nodes`` into the graph in parallel, each searching the graph as it was before.

    Writes each new node's own neighbour rows (up to ``M`` per layer, chosen by the heuristic);
    reverse edges are added afterwards by :func:`link_reverse`. Nodes of one batch do not see
    each other, which is why batches are kept small relative to the graph (see the family).
    ``visited`` has one row per thread chunk. Returns the number of distance evaluations.
    """
    n_chunks = visited.shape[0]
    nb = nodes.shape[0]
    evals_out = np.zeros(n_chunks, dtype=np.int64)
    empty_mask = np.zeros(0, dtype=np.bool_)
    for t in prange(n_chunks):
        Cd = np.empty(4 * ef_c + 64, dtype=np.float32)
        Ci = np.empty(4 * ef_c + 64, dtype=np.int64)
        Wd = np.empty(ef_c, dtype=np.float32)
        Wi = np.empty(ef_c, dtype=np.int64)
        sel = np.empty(M, dtype=np.int64)
        nbuf = np.empty(links0.shape[1], dtype=np.int64)
        ev = 0
        for b in range(t, nb, n_chunks):
            p = nodes[b]
            q = X[p]
            lq = levels[p]
            cur = entry
            cur_d = proxy_pair(q, X[cur], proxy)
            ev += 1
            if max_level > lq:
                cur, cur_d, e1 = greedy_descend(q, X, upper, ustart, cur, cur_d, max_level, lq, proxy)
                ev += e1
            for level in range(min(lq, max_level), -1, -1):
                tag = next_tag(visited, tags, t)
                ev += search_layer(q, X, links0, upper, ustart, level, cur, cur_d, proxy,
                                   empty_mask, empty_mask, visited[t], tag, Cd, Ci, Wd, Wi, nbuf)
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
        evals_out[t] = ev
    return evals_out.sum()


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def link_reverse(X, nodes, levels, ustart, links0, upper, level, M_max, proxy, touched):
    """Add the reverse edges of the batch ``nodes`` at ``level``, shrinking overfull lists.

    Edges are grouped by target so each target row is rewritten by exactly one thread; a full
    list is re-selected with the heuristic over its old neighbours plus all new sources. The
    result does not depend on the number of threads. ``touched`` (bool, per node) is set for
    every target whose row changed. Returns the number of distance evaluations.
    """
    links = links0 if level == 0 else upper
    total = 0
    for b in range(nodes.shape[0]):
        p = nodes[b]
        if levels[p] >= level:
            row = p if level == 0 else ustart[p] + level - 1
            total += links[row, 0]
    tgt = np.empty(total, dtype=np.int64)
    src = np.empty(total, dtype=np.int64)
    j = 0
    for b in range(nodes.shape[0]):
        p = nodes[b]
        if levels[p] >= level:
            row = p if level == 0 else ustart[p] + level - 1
            for s in range(1, links[row, 0] + 1):
                tgt[j] = links[row, s]
                src[j] = p
                j += 1
    if total == 0:
        return 0
    order = np.argsort(tgt, kind="mergesort")
    starts = np.empty(total + 1, dtype=np.int64)
    n_groups = 0
    for a in range(total):
        if a == 0 or tgt[order[a]] != tgt[order[a - 1]]:
            starts[n_groups] = a
            n_groups += 1
    starts[n_groups] = total
    evals = np.zeros(n_groups, dtype=np.int64)
    for g in prange(n_groups):
        a0 = starts[g]
        a1 = starts[g + 1]
        e = tgt[order[a0]]
        row = e if level == 0 else ustart[e] + level - 1
        cnt = links[row, 0]
        n_new = a1 - a0
        touched[e] = True
        if cnt + n_new <= M_max:
            for a in range(a0, a1):
                cnt += 1
                links[row, cnt] = src[order[a]]
            links[row, 0] = cnt
            continue
        m = cnt + n_new
        cand = np.empty(m, dtype=np.int64)
        cd = np.empty(m, dtype=np.float32)
        for s in range(cnt):
            cand[s] = links[row, 1 + s]
        for a in range(a0, a1):
            cand[cnt + a - a0] = src[order[a]]
        xe = X[e]
        for s in range(m):
            cd[s] = proxy_pair(xe, X[cand[s]], proxy)
        srt = np.argsort(cd, kind="mergesort")
        ci = cand[srt]
        cds = cd[srt]
        out = np.empty(M_max, dtype=np.int64)
        ns = select_heuristic(X, proxy, ci, cds, m, M_max, out)
        evals[g] = m + ns * m
        links[row, 0] = ns
        for s in range(ns):
            links[row, 1 + s] = out[s]
    return evals.sum()


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def repair_deleted(X, deleted, levels, ustart, links0, upper, level, M_max, proxy, touched):
    """Remove deleted nodes from every neighbour list of ``level`` and reconnect around them.

    A live node that pointed to a deleted one re-selects (heuristic) among its live neighbours
    and the live neighbours of its deleted neighbours; deleted nodes' own rows are emptied
    afterwards by the caller. ``touched`` is set for every rewritten row's node.
    """
    n = deleted.shape[0]
    links = links0 if level == 0 else upper
    for pp in prange(n):
        p = np.int64(pp)  # prange indices are unsigned; keep row arithmetic in int64
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
        srt = np.argsort(cd, kind="mergesort")
        ci = np.empty(m, dtype=np.int64)
        cds = np.empty(m, dtype=np.float32)
        mu = 0
        for s in range(m):
            v = cand[srt[s]]
            dup = False
            for w in range(mu):
                if ci[w] == v:
                    dup = True
                    break
            if not dup:
                ci[mu] = v
                cds[mu] = cd[srt[s]]
                mu += 1
        out = np.empty(M_max, dtype=np.int64)
        ns = select_heuristic(X, proxy, ci, cds, mu, M_max, out)
        links[row, 0] = ns
        for s in range(ns):
            links[row, 1 + s] = out[s]
        touched[p] = True


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
    # insertion sort (k is small; ties keep the walk's order)
    for j in range(1, k):
        d = out_d[j]
        i = out_i[j]
        a = j - 1
        while a >= 0 and out_d[a] > d:
            out_d[a + 1] = out_d[a]
            out_i[a + 1] = out_i[a]
            a -= 1
        out_d[a + 1] = d
        out_i[a + 1] = i


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _query(q, X, links0, upper, ustart, entry, max_level, proxy, mask, deleted, visited, tag,
           Cd, Ci, Wd, Wi, k, out_d, out_i, fB, fcode, fpay, ftable, use_finger, qB, nbuf):
    """One query: greedy descent, then layer 0 (exact or FINGER-filtered); returns (exact, est)."""
    cur = entry
    cur_d = proxy_pair(q, X[cur], proxy)
    ev = 1
    if max_level > 0:
        cur, cur_d, e1 = greedy_descend(q, X, upper, ustart, cur, cur_d, max_level, 0, proxy)
        ev += e1
    n_est = 0
    if use_finger:
        e2, n_est = _finger_layer0(q, X, links0, cur, cur_d, proxy, mask, deleted, visited, tag,
                                   Cd, Ci, Wd, Wi, fB, fcode, fpay, ftable, qB, nbuf)
        ev += e2
    else:
        ev += search_layer(q, X, links0, upper, ustart, 0, cur, cur_d, proxy, mask, deleted,
                           visited, tag, Cd, Ci, Wd, Wi, nbuf)
    _finish(q, X, Wd, Wi, k, proxy, out_d, out_i)
    return ev, n_est


@numba.njit(parallel=True, cache=True, nogil=True)
def search_queries(Q, X, links0, upper, ustart, entry, max_level, ef, k, proxy, mask, deleted,
                   visited, tags, fB, fcode, fpay, ftable, use_finger, out_d, out_i,
                   counts):
    """Search every row of ``Q`` (parallel over chunks of queries, one visited set per chunk).

    Parameters
    ----------
    Q : float32 (q, d)
    X, links0, upper, ustart : the graph (module docstring)
    entry, max_level : int
        Entry point and its level.
    ef, k : int
        Beam width (>= k) and results per query.
    proxy : int
    mask, deleted : bool arrays (n,) or (0,)
        Allowed nodes (empty = all) and tombstones (empty = none).
    visited : uint16 (chunks, >= n); tags : int64 (chunks,)
        Reusable visited sets; one chunk of queries per row.
    fB, fcode, fpay, ftable : FINGER payload (see :mod:`.finger`); ignored unless
        ``use_finger``.
    out_d, out_i : float32 / int64 (q, k)
        Exact proxies ascending and positions (-1 padded).
    counts : int64 (q, 2)
        Per query: exact distance evaluations, FINGER estimates.
    """
    n_chunks = visited.shape[0]
    nq = Q.shape[0]
    cap = 4 * ef + 2 * links0.shape[1] + 64
    for t in prange(n_chunks):
        Cd = np.empty(cap, dtype=np.float32)
        Ci = np.empty(cap, dtype=np.int64)
        Wd = np.empty(ef, dtype=np.float32)
        Wi = np.empty(ef, dtype=np.int64)
        qB = np.empty(fB.shape[0], dtype=np.float32)
        nbuf = np.empty(links0.shape[1], dtype=np.int64)
        for r in range(t, nq, n_chunks):
            tag = next_tag(visited, tags, t)
            ev, est = _query(Q[r], X, links0, upper, ustart, entry, max_level, proxy, mask,
                             deleted, visited[t], tag, Cd, Ci, Wd, Wi, k, out_d[r], out_i[r],
                             fB, fcode, fpay, ftable, use_finger, qB, nbuf)
            counts[r, 0] = ev
            counts[r, 1] = est


@numba.njit(cache=True, nogil=True)
def search_serial(Q, X, links0, upper, ustart, entry, max_level, ef, k, proxy, mask, deleted,
                  visited, tags, fB, fcode, fpay, ftable, use_finger, out_d, out_i,
                  counts):
    """:func:`search_queries` on the calling thread only (no parallel-region start-up cost)."""
    nq = Q.shape[0]
    cap = 4 * ef + 2 * links0.shape[1] + 64
    Cd = np.empty(cap, dtype=np.float32)
    Ci = np.empty(cap, dtype=np.int64)
    Wd = np.empty(ef, dtype=np.float32)
    Wi = np.empty(ef, dtype=np.int64)
    qB = np.empty(fB.shape[0], dtype=np.float32)
    nbuf = np.empty(links0.shape[1], dtype=np.int64)
    for r in range(nq):
        tag = next_tag(visited, tags, 0)
        ev, est = _query(Q[r], X, links0, upper, ustart, entry, max_level, proxy, mask, deleted,
                         visited[0], tag, Cd, Ci, Wd, Wi, k, out_d[r], out_i[r],
                         fB, fcode, fpay, ftable, use_finger, qB, nbuf)
        counts[r, 0] = ev
        counts[r, 1] = est



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


@numba.njit(parallel=True, cache=True, nogil=True)
def relabel_rows(links, inv):
    """Replace every node number ``v`` in the used slots of each row by ``inv[v]`` (in place)."""
    for r in prange(links.shape[0]):
        for j in range(1, links[r, 0] + 1):
            links[r, j] = inv[links[r, j]]
