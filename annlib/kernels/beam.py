"""Beam-search building blocks shared by the graph walks: candidate heap, visited tags, filters.

* the candidate set is a min-heap ``(cand_dist, cand_ids)`` of fixed capacity and the result set
  a bounded max-heap ``(result_dist, result_ids)``; both live in one :class:`Beam` per thread;
* a visited set is one row of a uint16 array tagged with a per-query epoch, so it is never
  cleared between queries (only when the tag wraps);
* :func:`exact_proxy` recomputes returned distances without fast-math.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .distances import exact_pair, proxy_pair
from .topk import heap_push

__all__ = ["FASTMATH", "Beam", "new_beam", "exact_proxy", "cand_push", "cand_pop", "next_tag",
           "allowed", "prefetch_row", "row_lines", "score_collected"]

# Re-association lets LLVM vectorise the distance reductions; 'ninf'/'nnan' are left out on
# purpose since heaps are initialised to +inf and compared against it.
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
_TAG_MAX = 65535


class Beam(NamedTuple):
    """Scratch of one walk, allocated once per thread and reused for every query it runs.

    Attributes
    ----------
    cand_dist, cand_ids : float32 / int64 (capacity,)
        Candidate min-heap (nodes still to expand).
    result_dist, result_ids : float32 / int64 (ef,)
        Bounded result max-heap (root = current worst), +inf / -1 where empty.
    neighbours : int64 (row width,)
        Unvisited neighbours of the node being expanded.
    query_proj : float32 (r,)
        The query projected on the FINGER basis (length 0 without FINGER).
    """

    cand_dist: np.ndarray
    cand_ids: np.ndarray
    result_dist: np.ndarray
    result_ids: np.ndarray
    neighbours: np.ndarray
    query_proj: np.ndarray


@numba.njit(cache=True, nogil=True)
def new_beam(ef, cand_capacity, row_width, rank):
    """A :class:`Beam` for result width ``ef``, ``cand_capacity`` candidates, graph rows of
    ``row_width`` slots and a FINGER basis of rank ``rank`` (0: none)."""
    return Beam(np.empty(cand_capacity, dtype=np.float32), np.empty(cand_capacity, dtype=np.int64),
                np.empty(ef, dtype=np.float32), np.empty(ef, dtype=np.int64),
                np.empty(row_width, dtype=np.int64), np.empty(rank, dtype=np.float32))


@intrinsic
def prefetch_row(typingctx, arr, row, lines):
    """Hint the CPU to load ``lines`` cache lines (64 B) of row ``row`` of a C-contiguous 2-D
    array (LLVM ``prefetch``: read, keep in all cache levels). No bounds check: the caller
    passes a valid row. Graph walks are memory-bound on large sets; fetching the rows they
    will read next overlaps those misses with the arithmetic of the current row.
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 2 and isinstance(row, types.Integer)
            and isinstance(lines, types.Integer)):
        return None
    sig = types.void(arr, row, lines)

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        ary = context.make_array(aty)(context, builder, args[0])
        r = context.cast(builder, args[1], signature.args[1], types.intp)
        nl = context.cast(builder, args[2], signature.args[2], types.intp)
        strides = cgutils.unpack_tuple(builder, ary.strides, 2)
        base = builder.ptrtoint(ary.data, cgutils.intp_t)
        start = builder.add(base, builder.mul(r, strides[0]))
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        with cgutils.for_range(builder, nl) as loop:
            addr = builder.add(start, builder.mul(loop.index, cgutils.intp_t(64)))
            builder.call(fn, [builder.inttoptr(addr, i8p), ir.IntType(32)(0), ir.IntType(32)(3),
                              ir.IntType(32)(1)])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always", cache=True, nogil=True)
def row_lines(X):
    """Cache lines spanned by one row of ``X`` (rows need not start on a line boundary)."""
    nbytes = X.shape[1] * X.itemsize
    return (nbytes + 63) // 64 + (1 if nbytes % 64 else 0)


@numba.njit(cache=True, nogil=True)
def exact_proxy(a, b, proxy):
    """Proxy distance of two vectors without fast-math (the numbers users see).

    Compiled on its own (not inlined at Numba IR level), so a fast-math caller does not change
    its floating-point semantics.
    """
    return exact_pair(a, b, proxy)


@numba.njit(inline="always", cache=True, nogil=True)
def cand_push(Cd, Ci, size, d, i):
    """Push ``(d, i)`` on the min-heap ``(Cd, Ci)`` of ``size`` items; returns the new size.

    When the heap is full the worst item is replaced if ``d`` is better (a bounded beam; only
    reachable when a filter keeps the result heap from filling).
    """
    cap = Cd.shape[0]
    if size >= cap:
        worst = size // 2
        for j in range(size // 2, size):
            if Cd[j] > Cd[worst]:
                worst = j
        if not d < Cd[worst]:
            return size
        pos = worst
    else:
        pos = size
        size += 1
    while pos > 0:
        parent = (pos - 1) >> 1
        if Cd[parent] <= d:
            break
        Cd[pos] = Cd[parent]
        Ci[pos] = Ci[parent]
        pos = parent
    Cd[pos] = d
    Ci[pos] = i
    return size


@numba.njit(inline="always", cache=True, nogil=True)
def cand_pop(Cd, Ci, size):
    """Remove the root of the min-heap ``(Cd, Ci)``; returns the new size (read the root first)."""
    size -= 1
    d = Cd[size]
    i = Ci[size]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and Cd[child + 1] < Cd[child]:
            child += 1
        if Cd[child] >= d:
            break
        Cd[pos] = Cd[child]
        Ci[pos] = Ci[child]
        pos = child
    Cd[pos] = d
    Ci[pos] = i
    return size


@numba.njit(inline="always", cache=True, nogil=True)
def next_tag(visited, tags, t):
    """Advance the epoch of visited set ``t``; clears the set only when the uint16 tag wraps."""
    tag = tags[t] + 1
    if tag >= _TAG_MAX:
        visited[t, :] = 0
        tag = 1
    tags[t] = tag
    return np.uint16(tag)


@numba.njit(inline="always", cache=True, nogil=True)
def _allowed(e, mask, deleted):
    if mask.shape[0] > 0 and not mask[e]:
        return False
    if deleted.shape[0] > 0 and deleted[e]:
        return False
    return True


allowed = _allowed


@numba.njit(inline="always", fastmath=FASTMATH, cache=True, nogil=True)
def score_collected(q, X, proxy, beam, m, size, mask, deleted):
    """Exact proxies of the first ``m`` of ``beam.neighbours`` (their rows already
    prefetched), pushed into the candidate heap and, when allowed, the result heap.

    The step both layer-0 walks (plain and FINGER) end every expansion with; ``size`` is the
    candidate-heap size before, the new size is returned.
    """
    nbuf = beam.neighbours
    Cd = beam.cand_dist
    Ci = beam.cand_ids
    Wd = beam.result_dist
    Wi = beam.result_ids
    for j in range(m):
        e = nbuf[j]
        d = proxy_pair(q, X[e], proxy)
        if d < Wd[0]:
            size = cand_push(Cd, Ci, size, d, e)
            if _allowed(e, mask, deleted):
                heap_push(Wd, Wi, d, e)
    return size
