"""Beam-search building blocks shared by the graph walks: candidate heap, visited tags, filters.

* the candidate set is a min-heap ``(Cd, Ci)`` of fixed capacity;
* a visited set is one row of a uint16 array tagged with a per-query epoch, so it is never
  cleared between queries (only when the tag wraps);
* :func:`exact_proxy` recomputes returned distances without fast-math.
"""

from __future__ import annotations

import numba
import numpy as np

from .distances import L2SQ

__all__ = ["FASTMATH", "exact_proxy", "cand_push", "cand_pop", "next_tag", "allowed"]

# Re-association lets LLVM vectorise the distance reductions; 'ninf'/'nnan' are left out on
# purpose since heaps are initialised to +inf and compared against it.
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
_TAG_MAX = 65535


@numba.njit(cache=True, nogil=True)
def exact_proxy(a, b, proxy):
    """Proxy distance of two vectors without fast-math (the numbers users see).

    Compiled on its own (not inlined at Numba IR level), so a fast-math caller does not change
    its floating-point semantics.
    """
    acc = np.float32(0.0)
    if proxy == L2SQ:
        for t in range(a.shape[0]):
            diff = a[t] - b[t]
            acc += diff * diff
        return acc
    for t in range(a.shape[0]):
        acc += a[t] * b[t]
    return -acc


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
