"""The constrained-optimization tuner of a Partitioned index (Sun, Guo and Kumar, ICLR 2023).

1. One instrumented pass (``index.stage_ranks``) gives, for a grid of probed-leaf counts, the rank
   of every true neighbour of the sample after the quantized scan; recall for any
   ``(leaves, reorder)`` is then exact on the sample: ``mean 1[rank < reorder]``.
2. Cost per query is modelled as ``c0 + c_read * entries read + c_leaf * leaves + c_reorder *
   reorder``, the coefficients fitted (non-negative least squares on relative errors) to twelve
   timed searches of the sample on this machine.
3. Over the grid of ``(leaves, reorder)`` pairs, the Lagrangian relaxation
   ``min (1 - R) + lam * J`` with bisection on ``lam`` picks the point (:mod:`.lagrange`).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .lagrange import solve_for_cost, solve_for_recall
from .measure import seconds_per_query
from .result import OperatingPoint
from .scalar import geometric_grid

__all__ = ["tune_partitioned", "RECALL_CEILING"]

RECALL_CEILING = 0.9995  # stop adding leaf counts once the largest reorder reaches this recall
MAX_REORDER = 2048
GRID_RATIO = 1.25
TIMING_QUERIES = 300  # sample queries timed per calibration point


def _recall_table(ranks: np.ndarray, reorders: np.ndarray) -> np.ndarray:
    """(G, R) recall on the sample for every (leaf count, reorder)."""
    G, nq, k = ranks.shape
    flat = ranks.reshape(G, -1)
    flat = np.sort(flat, axis=1)
    # the count of ranks < r, per leaf count, by binary search on the sorted ranks
    counts = np.stack([np.searchsorted(flat[g], reorders, side="left") for g in range(G)])
    return counts / float(nq * k)


def _fit_cost(index, sample, k, leaves_grid, reorder_grid, entries_read) -> np.ndarray:
    """Non-negative coefficients of (1, entries read, leaves, reorder) from timed searches."""
    from scipy.optimize import nnls

    G, R = len(leaves_grid), len(reorder_grid)
    # the corners pin the slopes; most points sit where tuned settings land (few leaves and a
    # short reorder list relative to the grid's ends)
    picks = {(0, 0), (G - 1, 0), (0, R - 1), (G - 1, R - 1), (G // 2, R // 2), (G // 4, R // 4),
             (3 * G // 4, R // 4), (G // 4, 3 * R // 4), (G // 2, R // 4), (G // 4, R // 2),
             (G // 8, R // 8), (G // 2, R // 8)}
    rows, times = [], []
    for gi, ri in sorted(picks):
        params = {"leaves": int(leaves_grid[gi]), "reorder": int(reorder_grid[ri])}
        times.append(seconds_per_query(index, sample.queries[:TIMING_QUERIES], k, params, repeats=2))
        rows.append([1.0, entries_read[gi], float(leaves_grid[gi]), float(reorder_grid[ri])])
    A = np.asarray(rows)
    t = np.asarray(times)
    # Relative error: the choice compares settings that cost a few tens of microseconds, so a
    # fit dominated by the slowest corner (all leaves, the longest reorder) would misprice them.
    A, t = A / t[:, None], np.ones_like(t)
    scale = np.maximum(A.max(axis=0), 1e-12)
    coef, _ = nnls(A / scale, t)
    return coef / scale


def tune_partitioned(index: Any, sample: Any, k: int, goal: float | None, budget: float | None,
                     report: Callable[[int], None]):
    """Choose ``(leaves, reorder)`` for a recall ``goal`` or a cost ``budget`` (see module doc).

    Returns
    -------
    (params or None, points, method, details)
    """
    n = len(index)
    num_leaves = int(index.stats()["num_leaves"])
    reorders = np.asarray(geometric_grid(k, max(k, min(MAX_REORDER, n)), ratio=GRID_RATIO), dtype=np.int64)
    leaves_all = np.asarray(geometric_grid(1, num_leaves, ratio=GRID_RATIO), dtype=np.int64)
    # Stage ranks per leaf count are kept per index and sample (see tuner.evaluations_for), so a
    # second tuning of the same index reuses them and prices settings identically.
    from .tuner import evaluations_for

    cache = evaluations_for(index, sample, k, "partitioned-model")
    stages = cache.setdefault("stages", {})
    # Grow the leaf grid in chunks until recall at the largest reorder saturates: leaf counts
    # beyond that only cost more.
    start = 0
    chunk = 6
    while start < len(leaves_all):
        part = leaves_all[start:start + chunk]
        todo = np.asarray([t for t in part if int(t) not in stages], dtype=np.int64)
        if todo.size:
            sr = index.stage_ranks(sample.queries, sample.truth.ids, todo, int(reorders[-1]))
            for g, t in enumerate(todo):
                stages[int(t)] = (sr.ranks[g], float(sr.entries_read[g].mean()))
        report(start + len(part))
        start += chunk
        top = _recall_table(stages[int(part[-1])][0][None], reorders[-1:])[0, 0]
        if top >= RECALL_CEILING or (goal is not None and top >= min(1.0, goal + 0.01)
                                     and start >= len(leaves_all) // 4):
            break
    leaves_grid = leaves_all[:min(start, len(leaves_all))]
    ranks = np.stack([stages[int(t)][0] for t in leaves_grid])
    entries_read = np.asarray([stages[int(t)][1] for t in leaves_grid])
    recall = _recall_table(ranks, reorders)  # (G, R)
    if "coef" not in cache:
        cache["coef"] = _fit_cost(index, sample, k, leaves_grid, reorders, entries_read)
    coef = cache["coef"]
    cost = (coef[0] + coef[1] * entries_read[:, None] + coef[2] * leaves_grid[:, None]
            + coef[3] * reorders[None, :])
    flat_r, flat_c = recall.ravel(), cost.ravel()
    if goal is not None:
        pick = solve_for_recall(flat_r, flat_c, goal)
    else:
        pick = solve_for_cost(flat_r, flat_c, budget)
    G, R = recall.shape
    points = [OperatingPoint({"leaves": int(leaves_grid[g]), "reorder": int(reorders[r])},
                             float(recall[g, r]), float(cost[g, r])) for g in range(G) for r in range(R)]
    details = {"leaves_grid": leaves_grid.tolist(), "reorder_grid": reorders.tolist(),
               "cost_coefficients": {"per_query_s": float(coef[0]), "per_entry_read_s": float(coef[1]),
                                     "per_leaf_s": float(coef[2]), "per_reorder_s": float(coef[3])},
               "num_leaves": num_leaves}
    if pick is None:
        return None, points, "lagrangian", details
    return dict(points[pick].params), points, "lagrangian", details
