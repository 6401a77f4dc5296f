"""How many bins the approximate top-k keeps: XLA's sizing rule and the expected-recall model.

TPU-KNN (Chern et al., NeurIPS 2022) splits the ``N`` scores of a row into ``L`` bins -- bin ``b``
holds elements ``b, b + L, b + 2L, ...`` -- keeps the best element of each bin and returns the
exact top-k of those ``L`` winners. A true neighbour is lost only when a better true neighbour
shares its bin, so if the true top-``K`` land in bins uniformly at random the expected recall is
``(L/K) * (1 - (1 - 1/L)**K)`` (:func:`expected_recall`).

XLA sizes ``L`` from a recall target with the more conservative per-element bound
``(1 - 1/L)**(K - 1) >= r``, i.e. ``L ~ (K - 1) / -ln(r)``, then rounds it to a power-of-two fold
of 128-lane tiles (:func:`reduction_output_size`, the rule of ``ApproxTopKReductionOutputSize``).
We use the same rule so a search on a CPU or GPU keeps the same number of bins, and therefore the
same recall, as ``jax.lax.approx_min_k`` on a TPU.

The rule is pure Python (importing this module does not import jax); :func:`binned_topk` is the
same reduction as a numba kernel for scores computed on the CPU.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .topk import heap_push, heap_sort_inplace, new_heaps

__all__ = ["reduction_output_size", "num_bins", "expected_recall", "binned_topk", "LANE_TILING",
           "CHUNK_TILING"]

LANE_TILING = 128  # operands of rank >= 2: bins come in multiples of the 128-lane vector width
CHUNK_TILING = 1024  # rank-1 operands


def _log2_floor(x: int) -> int:
    return x.bit_length() - 1 if x > 0 else -1


def _log2_ceil(x: int) -> int:
    return (x - 1).bit_length() if x > 0 else -1


def reduction_output_size(
    input_size: int,
    k: int,
    recall_target: float,
    *,
    rank: int = 2,
    input_size_override: int = -1,
) -> tuple[int, int]:
    """Number of bins ``L`` and the log2 of the fold factor, by XLA's approximate top-k rule.

    Parameters
    ----------
    input_size : int
        Length ``N`` of the reduced axis (of this shard, when sharded).
    k : int
        Results wanted (``K``).
    recall_target : float
        Expected recall ``r`` in (0, 1]; 1.0 means no reduction (exact).
    rank : int, default 2
        Rank of the operand; rank 1 tiles by 1024 elements, higher ranks by 128 lanes.
    input_size_override : int, default -1
        Logical length of the whole axis when the operand is one shard of it (-1: ``N``).

    Returns
    -------
    (int, int)
        ``(L, log2_reduction)``; ``log2_reduction == 0`` and ``L == N`` mean exact (no bins).

    Raises
    ------
    ValueError
        ``recall_target`` outside (0, 1] or an override smaller than ``input_size``.
    """
    tiling = CHUNK_TILING if rank == 1 else LANE_TILING
    if input_size <= tiling:
        return input_size, 0
    if 0 <= input_size_override < input_size:
        raise ValueError(
            f"input_size_override must be >= input_size ({input_size}); got {input_size_override}")
    logical = input_size_override if input_size_override >= 0 else input_size
    tiles = -(-input_size // tiling)
    if k == 1:  # one bin per lane; the fold covers the whole logical axis
        return tiling, _log2_ceil(-(-logical // tiling))
    if recall_target == 1.0:
        return input_size, 0
    if not 0.0 < recall_target < 1.0:
        raise ValueError(f"recall_target must be in (0, 1]; got {recall_target}")
    # Per-element bound (1 - 1/L)^(K-1) >= r  =>  L >= (K - 1) / -ln(r); truncated as XLA does.
    min_bins = int((1.0 - k) / math.log(recall_target))
    log2_reduction = _log2_floor(logical // max(min_bins, tiling))
    if log2_reduction <= 0:
        return input_size, 0
    log2_reduction = min(log2_reduction, _log2_ceil(input_size // tiling))
    return -(-tiles // (1 << log2_reduction)) * tiling, log2_reduction


def num_bins(n: int, k: int, recall_target: float) -> int:
    """Bins for a search of ``k`` neighbours among ``n`` vectors at ``recall_target``.

    :func:`reduction_output_size` for a rank-2 operand (a batch of queries), raised to ``k`` when
    the rule gives fewer bins than results (large ``k`` with a low target): every result comes from
    a different bin, so there must be at least ``k`` of them. ``n`` means exact search.
    """
    bins, _ = reduction_output_size(n, k, recall_target)
    return min(n, max(bins, k))


def expected_recall(bins: int, k: int) -> float:
    """Expected recall of keeping one winner per bin when the true top-``k`` fall into ``bins``
    bins uniformly at random: ``(L/K) * (1 - (1 - 1/L)**K)``."""
    if bins <= 0 or k <= 0:
        raise ValueError(f"bins and k must be positive; got bins={bins}, k={k}")
    return bins / k * (1.0 - (1.0 - 1.0 / bins) ** k)


@numba.njit(cache=True, nogil=True)
def _binned_topk_rows(S, bins, best_v, best_p, out_d, out_i):
    n = S.shape[1]
    for r in range(S.shape[0]):
        row = S[r]
        for b in range(bins):
            best_v[b] = np.inf
            best_p[b] = -1
        # bin b holds columns b, b + L, b + 2L, ...: a strided pass the compiler vectorises
        for start in range(0, n, bins):
            stop = min(n, start + bins)
            for j in range(start, stop):
                v = row[j]
                b = j - start
                if v < best_v[b]:
                    best_v[b] = v
                    best_p[b] = j
        hd = out_d[r]
        hi = out_i[r]
        for b in range(bins):
            if best_p[b] >= 0 and best_v[b] < hd[0]:
                heap_push(hd, hi, best_v[b], best_p[b])
        heap_sort_inplace(hd, hi)


def binned_topk(S: np.ndarray, k: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate ``k`` smallest entries per row: the best of each of ``bins`` strided bins, then
    the exact top-``k`` of those winners (TPU-KNN's reduction, on the CPU).

    Parameters
    ----------
    S : float32 (m, n)
        Proxy values, smaller is better (+inf entries are never selected).
    k : int
        Entries kept per row (``k <= bins``); rows with fewer finite bins are padded (+inf, -1).
    bins : int
        Number of bins ``L`` (:func:`num_bins`); ``bins >= n`` is exact.

    Returns
    -------
    (float32 (m, k) ascending, int64 (m, k) column positions)
    """
    S = np.ascontiguousarray(S, dtype=np.float32)
    bins = int(min(max(bins, k), S.shape[1]))
    out_d, out_i = new_heaps(S.shape[0], k)
    best_v = np.empty(bins, dtype=np.float32)
    best_p = np.empty(bins, dtype=np.int64)
    _binned_topk_rows(S, bins, best_v, best_p, out_d, out_i)
    return out_d, out_i
