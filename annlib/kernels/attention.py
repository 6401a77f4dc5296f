"""Softmax attention over selected keys, with the running ``(max, sum, weighted sum)`` it leaves.

One decoding query attends to a subset ``S`` of the cached keys: scores ``s_i = <q, k_i> * scale``
for ``i`` in ``S``, weights ``exp(s_i - m)`` with ``m = max s_i``, output ``sum w_i v_i / sum w_i``.
The kernel also returns ``m`` and ``l = sum exp(s_i - m)`` so that results over disjoint subsets
combine exactly by the log-sum-exp rule (:func:`merge_partials`). Keys and values are read only at
the selected rows: the cost is ``2 * |S| * d`` numbers, whatever the cache length.

Sums are accumulated in float64: a selection can hold hundreds of thousands of keys (budget
>= n is full attention) and float32 sums of that length lose the digits the tests compare.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

__all__ = ["attend_selected", "merge_partials", "page_bound_vectors"]


# Reassociation lets the float64 dot products vectorise (float64 keeps them exact to far below
# float32 rounding); without it each score is a chain of d dependent additions. Only the flags
# that reorder arithmetic: padding scores are -inf, so "no infinities" must not be assumed.
_REORDER = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(cache=True, nogil=True, fastmath=_REORDER)
def _attend_rows(Q, K, V, sel, scale, out, row_max, row_sum, lo, hi):
    width = sel.shape[1]
    d = Q.shape[1]
    dv = V.shape[1]
    scores = np.empty(width, dtype=np.float64)
    acc = np.empty(dv, dtype=np.float64)
    for r in range(lo, hi):
        m = -np.inf
        for j in range(width):
            p = sel[r, j]
            if p < 0:
                scores[j] = -np.inf
                continue
            s = 0.0
            for t in range(d):
                s += np.float64(Q[r, t]) * np.float64(K[p, t])
            s *= scale
            scores[j] = s
            if s > m:
                m = s
        acc[:] = 0.0
        total = 0.0
        if m > -np.inf:
            for j in range(width):
                p = sel[r, j]
                if p < 0:
                    continue
                w = np.exp(scores[j] - m)
                total += w
                for t in range(dv):
                    acc[t] += w * np.float64(V[p, t])
            for t in range(dv):
                out[r, t] = np.float32(acc[t] / total)
        else:  # an empty selection: no mass, zero output
            for t in range(dv):
                out[r, t] = np.float32(0.0)
        row_max[r] = m
        row_sum[r] = total


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=_REORDER)
def _attend_parallel(Q, K, V, sel, scale, out, row_max, row_sum, chunks):
    n = Q.shape[0]
    step = (n + chunks - 1) // chunks
    for c in prange(chunks):
        _attend_rows(Q, K, V, sel, scale, out, row_max, row_sum, c * step, min(n, (c + 1) * step))


def attend_selected(Q: np.ndarray, K: np.ndarray, V: np.ndarray, sel: np.ndarray, scale: float, *,
                    threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax attention of every query over its own selected rows of ``(K, V)``.

    Parameters
    ----------
    Q : float32 (m, d)
    K : float32 (n, d)
        Keys (may be a view of a larger buffer).
    V : float32 (n, dv)
    sel : int64 (m, s)
        Selected rows per query, each at most once; -1 entries are padding.
    scale : float
        Score multiplier (``1 / sqrt(d)`` for standard attention).
    threads : int, default 1
        Query chunks attended in parallel (1 runs the serial kernel).

    Returns
    -------
    (float32 (m, dv), float64 (m,), float64 (m,))
        The outputs, the maximum scaled score ``m`` of each row and ``l = sum exp(s - m)``
        (``-inf`` and 0 for an empty selection, whose output is zero).
    """
    nq = Q.shape[0]
    out = np.empty((nq, V.shape[1]), dtype=np.float32)
    row_max = np.empty(nq, dtype=np.float64)
    row_sum = np.empty(nq, dtype=np.float64)
    if threads > 1 and nq > 1:
        _attend_parallel(Q, K, V, sel, float(scale), out, row_max, row_sum, min(threads, nq))
    else:
        _attend_rows(Q, K, V, sel, float(scale), out, row_max, row_sum, 0, nq)
    return out, row_max, row_sum


def merge_partials(outs, maxes, sums) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine attention results over disjoint key sets by the log-sum-exp rule, exactly.

    Parameters
    ----------
    outs : sequence of float32 (..., dv)
        Normalised outputs of each part.
    maxes, sums : sequences of float64 (...)
        Each part's maximum scaled score and ``sum exp(s - max)``; an empty part has ``-inf``
        and 0.

    Returns
    -------
    (float32 (..., dv), float64 (...), float64 (...))
        The output over the union, its maximum and its sum.
    """
    m = np.max(np.stack([np.asarray(x, dtype=np.float64) for x in maxes]), axis=0)
    safe_m = np.where(np.isfinite(m), m, 0.0)
    total = np.zeros_like(safe_m)
    acc = None
    for o, mx, sm in zip(outs, maxes, sums):
        # weight of a part = its exp-mass relative to the common maximum
        w = np.where(np.isfinite(mx), np.asarray(sm, np.float64) * np.exp(np.asarray(mx, np.float64) - safe_m), 0.0)
        total += w
        term = w[..., None] * np.asarray(o, dtype=np.float64)
        acc = term if acc is None else acc + term
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total[..., None] > 0, acc / np.where(total > 0, total, 1.0)[..., None], 0.0)
    return out.astype(np.float32), m, total


def page_bound_vectors(Q: np.ndarray) -> np.ndarray:
    """``[max(q, 0), min(q, 0)]`` per query (float32 (m, 2d)).

    Quest's page score ``sum_j max(q_j lo_j, q_j hi_j)`` of a page with element-wise key minimum
    ``lo`` and maximum ``hi`` equals ``<q+, hi> + <q-, lo>``: the inner product of this vector
    with the page's ``[hi, lo]``, so pages rank by the library's blocked inner-product search.
    """
    return np.ascontiguousarray(np.concatenate([np.maximum(Q, 0), np.minimum(Q, 0)], axis=1), dtype=np.float32)
