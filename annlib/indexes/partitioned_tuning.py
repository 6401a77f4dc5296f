"""The instrumented pass of the Partitioned tuner (docs/tuning.md): where each true neighbour
stands after each stage of a Partitioned search, for every number of probed leaves of a grid.

Given the ranks, recall for any ``(leaves, reorder)`` is exact on the sample without running the
search: a true neighbour is returned when its leaf is among the probed ones and its approximate
score ranks within ``reorder`` among the distinct candidates of those leaves, because exact
re-ranking then keeps it (every vector that beats it exactly is a true neighbour too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..config import get_num_threads
from ..kernels import fastscan
from ..kernels.quantization import build_luts, pad_columns
from ..kernels.threads import run_split

if TYPE_CHECKING:
    from .partitioned import PartitionedState

__all__ = ["StageRanks", "stage_ranks"]

NOT_FOUND = np.iinfo(np.int64).max // 4
SPLIT_QUERIES = 32  # fewest queries a worker thread gets


class StageRanks(NamedTuple):
    """Ranks of the true neighbours of a query sample for each probed-leaf count of a grid.

    Attributes
    ----------
    leaves : int64 (G,)
        The probed-leaf counts (increasing).
    ranks : int64 (G, q, k)
        0-based rank of each true neighbour by approximate score among the distinct candidates
        of the probed leaves (ties counted in its favour); ``NOT_FOUND`` when it is not among
        the best ``max_reorder`` candidates or its leaves are not probed. Vectors compared
        exactly by every query (no code entries) rank 0.
    entries_read : float64 (G, q)
        Code entries (padding included) each query scans with that many leaves probed.
    """

    leaves: np.ndarray
    ranks: np.ndarray
    entries_read: np.ndarray


def stage_ranks(st: "PartitionedState", Q: np.ndarray, true_positions: np.ndarray, leaves: np.ndarray,
                max_reorder: int, proxy_l2: bool) -> StageRanks:
    """Run the scan stage for every leaf count of ``leaves`` and rank the true neighbours.

    Parameters
    ----------
    st : PartitionedState
    Q : float32 (q, d)
        Metric-prepared queries.
    true_positions : int64 (q, k)
        Positions of the exact k nearest neighbours.
    leaves : int64 (G,)
        Increasing probed-leaf counts, each in [1, num_leaves].
    max_reorder : int
        Candidates kept by the scan (the largest ``reorder`` of the grid).
    proxy_l2 : bool
        Whether the metric ranks leaves by squared L2.

    With more than one thread the queries are split into one contiguous range per worker
    thread, each running the serial kernels (the ranks do not depend on it).
    """
    parts = run_split(lambda lo, hi: _stage_ranks_range(st, Q[lo:hi], true_positions[lo:hi], leaves, max_reorder,
                                                        proxy_l2),
                      Q.shape[0], get_num_threads(), SPLIT_QUERIES)
    if len(parts) == 1:
        return parts[0]
    return StageRanks(parts[0].leaves, np.concatenate([p.ranks for p in parts], axis=1),
                      np.concatenate([p.entries_read for p in parts], axis=1))


def _stage_ranks_range(st, Q, true_positions, leaves, max_reorder, proxy_l2) -> StageRanks:
    nq, k = true_positions.shape
    T = int(leaves[-1])
    S = Q @ st.centres.T
    D = st.centre_sqnorms[None, :] - 2.0 * S if proxy_l2 else -S
    _, leaf_ids = fastscan.select_leaves(D, T)
    bias = np.ascontiguousarray(-np.take_along_axis(S, leaf_ids, axis=1), dtype=np.float32)
    per_leaf = np.diff(st.leaf_block_offsets).astype(np.float64) * fastscan.POINT_BLOCK
    read = np.cumsum(per_leaf[leaf_ids], axis=1)  # (q, T)
    if st.codebooks is not None:
        tables = build_luts(pad_columns(Q, st.padded_dim), st.codebooks)
    else:
        Qs = np.ascontiguousarray(Q / st.int8_multipliers[None, :], dtype=np.float32)
    exact = np.isin(true_positions, st.exact_positions)
    no_mask = np.zeros(0, dtype=np.bool_)
    ranks = np.full((len(leaves), nq, k), NOT_FOUND, dtype=np.int64)
    for gi, t in enumerate(leaves):
        probes = fastscan.Probes(np.ascontiguousarray(leaf_ids[:, :t]), np.ascontiguousarray(bias[:, :t]))
        if st.codebooks is not None:
            score, cand = fastscan.scan_pq(tables, probes, st.packed, no_mask, max_reorder, st.num_vectors)
        else:
            score, cand = fastscan.scan_int8(Qs, probes, st.packed, no_mask, max_reorder, st.num_vectors)
        ranks[gi] = _ranks_of(score, cand, true_positions)
        ranks[gi][exact] = 0
    return StageRanks(np.asarray(leaves, dtype=np.int64), ranks, read[:, np.asarray(leaves) - 1].T.copy())


def _ranks_of(score: np.ndarray, cand: np.ndarray, true_positions: np.ndarray) -> np.ndarray:
    """0-based rank of each true position among its row's candidates (ties in its favour).

    One sort of (row, position) keys finds every true position's slot at once; the rank is the
    first slot holding the same score in the score-sorted row.
    """
    nq, R = cand.shape
    order = np.argsort(score, axis=1, kind="stable")
    score = np.take_along_axis(score, order, axis=1)
    cand = np.take_along_axis(cand, order, axis=1)
    slots = np.arange(R, dtype=np.int64)
    new_value = np.ones((nq, R), dtype=np.bool_)
    new_value[:, 1:] = score[:, 1:] != score[:, :-1]
    tie_first = np.maximum.accumulate(np.where(new_value, slots[None, :], 0), axis=1)
    width = np.int64(max(int(cand.max(initial=-1)), int(true_positions.max(initial=-1))) + 2)
    rows = np.arange(nq, dtype=np.int64)[:, None] * width
    keys = (rows + cand + 1).ravel()
    by_key = np.argsort(keys, kind="stable")
    sorted_keys = keys[by_key]
    wanted = (rows + true_positions + 1).ravel()
    at = np.minimum(np.searchsorted(sorted_keys, wanted), sorted_keys.size - 1)
    found = sorted_keys[at] == wanted
    column = by_key[at] % R
    row = np.repeat(np.arange(nq), true_positions.shape[1])
    rank = tie_first[row, column]
    return np.where(found, rank, NOT_FOUND).reshape(true_positions.shape)
