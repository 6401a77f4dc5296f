"""FINGER kernels: low-rank angle codes of graph edges and the estimate-filtered layer-0 walk.

While node ``c`` is expanded, a neighbour ``e`` splits into a part along ``c`` and a residual
orthogonal to it (FINGER, Chen et al., WWW 2023; docs/hnsw.md)::

    t_e = <e, c> / |c|^2          e_res = e - t_e c          (stored per edge: t_e, |e_res|)
    <q, e> = t_e <q, c> + <q_res, e_res>        (exact; q_res = q - t_q c, t_q = <q, c>/|c|^2)

``<q, c>`` follows from the already known distance of ``c``; only the angle between ``q_res``
and ``e_res`` is estimated, from the Hamming distance of their sign codes on one global basis
``B`` (r <= 64 rows, one uint64 per edge; bits r..63 are zero), mapped through a 65-entry cosine table that carries
the distribution-matching correction. ``B q_res = B q - t_q (B c)`` with ``B c`` stored per
node, so the per-node cost is O(r) and the per-edge cost O(1).

Payload (n = nodes, M0 = layer-0 width), handed to the kernels as one :class:`FingerArrays`:
``basis`` float32 (r, d); ``table`` float32 (r + 1,), the estimated cosine per Hamming distance;
and one row per node holding everything an expansion reads, contiguous so it streams from
memory as one block. The row is allocated as uint64 (``codes``) and read through a float32 view
of the same buffer (``payload``)::

    float32 columns   [0, 2 M0)        sign codes of B e_res (uint64 column s = slot s)
                      2 M0 + 2 s       t_e of slot s
                      2 M0 + 2 s + 1   |e_res| of slot s
                      [4 M0, 4 M0 + r) B c
                      4 M0 + r         |c|^2
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import prange
from numba.core import types
from numba.extending import intrinsic

from .beam import FASTMATH, _allowed, cand_pop, cand_push, score_collected, prefetch_row, row_lines
from .distances import L2SQ, dot, proxy_pair
from .threads import worker_pool
from .topk import heap_push

__all__ = [
    "FingerArrays",
    "finger_walk",
    "payload_width",
    "new_payload",
    "popcount64",
    "sample_residuals",
    "edge_payload",
    "edge_payload_rows",
    "project_query",
    "projected_descend",
    "pair_statistics",
    "cos_table",
    "estimates_at",
]


class FingerArrays(NamedTuple):
    """FINGER's arrays as the kernels read them (rank 0 = no FINGER).

    Attributes
    ----------
    basis : float32 (r, d)
        The global basis B (r <= 64).
    codes : uint64 (n, payload_width(M0, r))
        Payload rows (module docstring), as uint64: sign codes in columns 0..M0-1.
    payload : float32 (n, 2 * payload_width(M0, r))
        The same buffer as float32 (the edge and node terms).
    table : float32 (r + 1,)
        Estimated cosine per Hamming distance.
    """

    basis: np.ndarray
    codes: np.ndarray
    payload: np.ndarray
    table: np.ndarray


@intrinsic
def popcount64(typingctx, x):
    """Number of set bits of a uint64 (one ``popcnt`` instruction)."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        val = context.cast(builder, args[0], signature.args[0], types.uint64)
        return builder.ctpop(val)

    return sig, codegen


def payload_width(M0: int, r: int) -> int:
    """uint64 columns of a payload row for layer-0 width ``M0`` and rank ``r``."""
    return (4 * M0 + r + 1 + 1) // 2


def new_payload(n: int, M0: int, r: int):
    """A zeroed payload for ``n`` nodes: (uint64 codes view, float32 view) of one buffer."""
    codes = np.zeros((n, payload_width(M0, r)), dtype=np.uint64)
    return codes, codes.view(np.float32)


@numba.njit(inline="always", cache=True, nogil=True)
def _split(qq, cc, qc):
    """(t_q, |q_res|^2) from |q|^2, |c|^2 and <q, c>; clamped against cancellation."""
    tq = qc / cc if cc > 1e-30 else np.float32(0.0)
    r2 = qq - tq * qc
    if r2 < 0.0:
        r2 = np.float32(0.0)
    return tq, r2


@numba.njit(inline="always", cache=True, nogil=True)
def _code(qB, tq, Pc, r):
    # branch-free so the loop vectorises (an OR-reduction of 64 lanes)
    code = np.uint64(0)
    for j in range(r):
        bit = np.uint64(1) if qB[j] - tq * Pc[j] > 0.0 else np.uint64(0)
        code |= bit << np.uint64(j)
    return code


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def sample_residuals(X, links0, nodes, slots):
    """Unit residuals ``e - t_e c`` of one chosen edge (``slots[i]``) of each node ``nodes[i]``.

    Rows whose residual vanishes are left at zero. Returns float32 (len(nodes), d). Serial: the
    family samples a bounded number of nodes.
    """
    m = nodes.shape[0]
    out = np.zeros((m, X.shape[1]), dtype=np.float32)
    for i in range(m):
        c = nodes[i]
        e = links0[c, 1 + slots[i]]
        xc = X[c]
        xe = X[e]
        cc = dot(xc, xc)
        te = dot(xe, xc) / cc if cc > 1e-30 else np.float32(0.0)
        nrm = np.float32(0.0)
        for t in range(X.shape[1]):
            v = xe[t] - te * xc[t]
            out[i, t] = v
            nrm += v * v
        if nrm > 1e-30:
            inv = np.float32(1.0) / np.sqrt(nrm)
            for t in range(X.shape[1]):
                out[i, t] *= inv
    return out


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def edge_payload_rows(X, links0, P, rows, fcode, lo, hi):
    """Rows ``lo .. hi - 1`` of :func:`edge_payload`'s result, written into ``fcode`` (uint64,
    zeroed). Returns 0."""
    r = P.shape[1]
    M0 = links0.shape[1] - 1
    fpay = fcode.view(np.float32)
    for a in range(lo, hi):
        c = rows[a]
        xc = X[c]
        cc = dot(xc, xc)
        fpay[a, 4 * M0 + r] = cc
        for j in range(r):
            fpay[a, 4 * M0 + j] = P[c, j]
        cnt = links0[c, 0]
        for s in range(cnt):
            e = links0[c, 1 + s]
            xe = X[e]
            ee = dot(xe, xe)
            ec = dot(xe, xc)
            te = ec / cc if cc > 1e-30 else np.float32(0.0)
            res2 = ee - te * ec
            if res2 < 0.0:
                res2 = np.float32(0.0)
            fpay[a, 2 * M0 + 2 * s] = te
            fpay[a, 2 * M0 + 2 * s + 1] = np.sqrt(res2)
            fcode[a, s] = _code(P[e], te, P[c], r)
    return 0


# Fewest payload rows worth a worker thread of their own.
_MIN_ROWS_PER_WORKER = 8192


def edge_payload(X, links0, P, rows):
    """The payload rows of the nodes ``rows`` computed from the current graph.

    ``P`` = ``X @ B.T`` (n, r), the projections of every node. Unused edge slots are zero.
    Returns uint64 (len(rows), payload_width(M0, r)), row ``a`` for node ``rows[a]``: the
    caller stores them, so nothing it holds changes until every row is computed. Ranges of
    rows (:func:`edge_payload_rows`) run on the worker pool when there are many.
    """
    m = rows.shape[0]
    fcode = np.zeros((m, payload_width(links0.shape[1] - 1, P.shape[1])), dtype=np.uint64)
    parts = max(1, min(numba.get_num_threads(), m // _MIN_ROWS_PER_WORKER))
    if parts == 1:
        edge_payload_rows(X, links0, P, rows, fcode, 0, m)
    else:
        bounds = [m * j // parts for j in range(parts + 1)]
        list(worker_pool(parts).map(lambda j: edge_payload_rows(X, links0, P, rows, fcode, bounds[j],
                                                               bounds[j + 1]), range(parts)))
    return fcode


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def pair_statistics(X, links0, fcode, nodes, slot_a, slot_b):
    """Exact cosine between the residuals of two edges of one node, and their code Hamming distance.

    For distribution matching: pairs ``(slot_a[i], slot_b[i])`` of node ``nodes[i]``.
    Returns (float64 exact cosines, int64 Hamming distances); a pair with a vanishing residual
    gets cosine NaN (the caller drops it). Serial: the family samples a bounded number of pairs.
    """
    m = nodes.shape[0]
    cos = np.empty(m, dtype=np.float64)
    ham = np.empty(m, dtype=np.int64)
    d = X.shape[1]
    for i in range(m):
        c = nodes[i]
        xc = X[c]
        e1 = X[links0[c, 1 + slot_a[i]]]
        e2 = X[links0[c, 1 + slot_b[i]]]
        cc = np.float64(dot(xc, xc))
        t1 = np.float64(dot(e1, xc)) / cc if cc > 1e-30 else 0.0
        t2 = np.float64(dot(e2, xc)) / cc if cc > 1e-30 else 0.0
        n1 = 0.0
        n2 = 0.0
        ip = 0.0
        for t in range(d):
            r1 = e1[t] - t1 * xc[t]
            r2 = e2[t] - t2 * xc[t]
            n1 += r1 * r1
            n2 += r2 * r2
            ip += r1 * r2
        if n1 > 1e-20 and n2 > 1e-20:
            cos[i] = ip / np.sqrt(n1 * n2)
        else:
            cos[i] = np.nan
        ham[i] = popcount64(fcode[c, slot_a[i]] ^ fcode[c, slot_b[i]])
    return cos, ham


def cos_table(r: int, dm: tuple[float, float, float, float] | None, slack: float = 0.0) -> np.ndarray:
    """Estimated cosine for each Hamming distance 0..r, with distribution matching.

    Parameters
    ----------
    r : int
        Code length.
    dm : (mu, sigma, mu_hat, sigma_hat) or None
        Mean and standard deviation of exact and of sign-estimated cosines on sampled residual
        pairs; the estimate is mapped affinely onto the exact distribution. None: no correction.
    slack : float, default 0
        Added to every cosine (clipped to 1): an optimistic margin, so a neighbour is pruned
        only when even a somewhat smaller angle could not bring it into the result set.
    """
    raw = np.cos(np.pi * np.arange(r + 1) / r)
    if dm is not None:
        mu, sigma, mu_hat, sigma_hat = dm
        if sigma_hat > 1e-12:
            raw = (raw - mu_hat) / sigma_hat * sigma + mu
    return np.clip(raw + slack, -1.0, 1.0).astype(np.float32)


@numba.njit(inline="always", fastmath=FASTMATH, cache=True, nogil=True)
def project_query(q, finger, qB):
    """``qB = B q``: the query on FINGER's basis (r dot products of length d)."""
    fB = finger.basis
    for j in range(fB.shape[0]):
        qB[j] = dot(fB[j], q)


@numba.njit(inline="always", fastmath=FASTMATH, cache=True, nogil=True)
def _projected_proxy(qB, pay, v, off, l2):
    # proxy of node v seen on the basis: |B q - B v|^2 (l2) or -<B q, B v> (inner product)
    s = np.float32(0.0)
    if l2:
        for j in range(qB.shape[0]):
            t = qB[j] - pay[v, off + j]
            s += t * t
    else:
        for j in range(qB.shape[0]):
            s -= qB[j] * pay[v, off + j]
    return s


@numba.njit(inline="always", fastmath=FASTMATH, cache=True, nogil=True)
def projected_descend(qB, graph, finger, cur, top, bottom):
    """Beam-1 descent from layer ``top`` to layer ``bottom + 1`` on the basis projections
    ``B v`` stored in the payload rows, instead of the vectors; returns (node, estimates).

    An estimate reads r floats where an exact distance reads d: with r much smaller than d the
    descent costs a fraction of the exact one and lands as close (measured on MNIST, d=784,
    r=64: 50 fewer exact evaluations per query at equal recall). The landing node's exact
    distance is the caller's to compute.
    """
    upper = graph.links_upper
    ustart = graph.upper_start
    pay = finger.payload
    off = 4 * (graph.links_layer0.shape[1] - 1)
    l2 = graph.proxy == L2SQ
    cur_d = _projected_proxy(qB, pay, cur, off, l2)
    n_est = 1
    for level in range(top, bottom, -1):
        changed = True
        while changed:
            changed = False
            row = ustart[cur] + level - 1
            cnt = upper[row, 0]
            for s in range(1, cnt + 1):
                e = upper[row, s]
                d = _projected_proxy(qB, pay, e, off, l2)
                n_est += 1
                if d < cur_d:
                    cur_d = d
                    cur = e
                    changed = True
    return cur, n_est


@numba.njit(inline="always", fastmath=FASTMATH, cache=True, nogil=True)
def finger_walk(q, graph, finger, ep, ep_d, mask, deleted, visited, tag, beam):
    """Layer-0 best-first search where, once the result heap is full, a neighbour is evaluated
    exactly only if its FINGER estimate can enter the result heap.

    ``graph`` is the graph kernels' ``GraphArrays`` (vectors, layer-0 links, proxy are read),
    ``finger`` a :class:`FingerArrays`, ``beam`` a :class:`~.beam.Beam` whose ``query_proj``
    already holds ``B q`` (:func:`project_query`; the caller may have used it for the descent). Pruned neighbours are not marked visited (another node may still lead to
    them). Every item of the result heap has an exact distance. Returns (exact evaluations,
    estimates).

    Memory: the links and payload rows of the next candidate are prefetched while the current
    one is expanded, and the vectors of the neighbours that pass the filter are prefetched
    together before their exact distances are computed.

    Inlined into its caller (``inline="always"``, at numba IR level, so with the caller's
    fast-math flags: call it from fast-math kernels only); the batch and one-query kernels of
    :mod:`.graph` inline it (round 6 of docs/benchmarks-hnsw.md).
    """
    X = graph.vectors
    links0 = graph.links_layer0
    proxy = graph.proxy
    fB = finger.basis
    fcode = finger.codes
    fpay = finger.payload
    ftable = finger.table
    Cd = beam.cand_dist
    Ci = beam.cand_ids
    Wd = beam.result_dist
    Wi = beam.result_ids
    nbuf = beam.neighbours
    qB = beam.query_proj
    r = fB.shape[0]
    M0 = links0.shape[1] - 1
    off_t = 2 * M0
    off_p = 4 * M0
    lines = row_lines(X)
    plines = (fcode.shape[1] * 8 + 63) // 64
    qq = dot(q, q)
    Wd[:] = np.inf
    Wi[:] = -1
    visited[ep] = tag
    if _allowed(ep, mask, deleted):
        heap_push(Wd, Wi, ep_d, ep)
    size = cand_push(Cd, Ci, 0, ep_d, ep)
    evals = 0
    n_est = 0
    l2 = proxy == L2SQ
    while size > 0:
        cd = Cd[0]
        c = Ci[0]
        if cd > Wd[0]:
            break
        size = cand_pop(Cd, Ci, size)
        if size > 0:
            nxt = Ci[0]
            prefetch_row(links0, nxt, 1)
            prefetch_row(fcode, nxt, plines)
        cnt = links0[c, 0]
        m = 0
        if Wd[0] == np.inf:
            # start-up phase: the bound is +inf, estimates cannot prune anything
            for s in range(1, cnt + 1):
                e = links0[c, s]
                if visited[e] == tag:
                    continue
                visited[e] = tag
                prefetch_row(X, e, lines)
                nbuf[m] = e
                m += 1
        else:
            row = fpay[c]
            cc = row[off_p + r]
            qc = np.float32(0.5) * (qq + cc - cd) if l2 else -cd
            tq, r2 = _split(qq, cc, qc)
            nq = np.sqrt(r2)
            code = _code(qB, tq, row[off_p:], r)
            crow = fcode[c]
            bound = Wd[0]
            for s in range(cnt):
                e = links0[c, 1 + s]
                if visited[e] == tag:
                    continue
                n_est += 1
                cos = ftable[popcount64(code ^ crow[s])]
                te = row[off_t + 2 * s]
                ne = row[off_t + 2 * s + 1]
                if l2:
                    dt = tq - te
                    est = dt * dt * cc + r2 + ne * ne - np.float32(2.0) * nq * ne * cos
                else:
                    est = -(te * qc + nq * ne * cos)
                if not est < bound:
                    continue
                visited[e] = tag
                prefetch_row(X, e, lines)
                nbuf[m] = e
                m += 1
        evals += m
        size = score_collected(q, X, proxy, beam, m, size, mask, deleted)
    return evals, n_est


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def estimates_at(Q, X, links0, centres, proxy, finger):
    """FINGER estimates and exact proxies for every edge of ``centres[i]`` seen from ``Q[i]``.

    For tests and diagnostics; ``finger`` is a :class:`FingerArrays` (or the plain tuple of its
    fields). Returns float32 arrays (m, M0) of estimates and exact proxies (NaN in unused slots).
    """
    finger = FingerArrays(*finger)
    fB = finger.basis
    fcode = finger.codes
    fpay = finger.payload
    ftable = finger.table
    m = centres.shape[0]
    M0 = links0.shape[1] - 1
    est = np.full((m, M0), np.nan, dtype=np.float32)
    true = np.full((m, M0), np.nan, dtype=np.float32)
    r = fB.shape[0]
    for i in prange(m):
        q = Q[i]
        c = centres[i]
        qB = np.empty(r, dtype=np.float32)
        for j in range(r):
            qB[j] = dot(fB[j], q)
        qq = dot(q, q)
        cd = proxy_pair(q, X[c], proxy)
        cc = fpay[c, 4 * M0 + r]
        qc = np.float32(0.5) * (qq + cc - cd) if proxy == L2SQ else -cd
        tq, r2 = _split(qq, cc, qc)
        nq = np.sqrt(r2)
        code = _code(qB, tq, fpay[c, 4 * M0:], r)
        for s in range(links0[c, 0]):
            e = links0[c, 1 + s]
            cos = ftable[popcount64(code ^ fcode[c, s])]
            te = fpay[c, 2 * M0 + 2 * s]
            ne = fpay[c, 2 * M0 + 2 * s + 1]
            if proxy == L2SQ:
                dt = tq - te
                est[i, s] = dt * dt * cc + r2 + ne * ne - 2.0 * nq * ne * cos
            else:
                est[i, s] = -(te * qc + nq * ne * cos)
            true[i, s] = proxy_pair(q, X[e], proxy)
    return est, true
