"""The constrained choice: minimise cost subject to recall (or the reverse) by Lagrangian relaxation.

For a multiplier ``lam`` the relaxed problem ``min (1 - R(t)) + lam * J(t)`` over the candidate
settings ``t`` picks a point of the lower convex hull of (cost, loss). Larger ``lam`` weighs cost
more and picks cheaper, lower-recall points, so recall is monotone non-increasing in ``lam`` and
bisection on ``log lam`` finds the cheapest hull point that meets a recall target (or the most
accurate one within a cost budget), as in Sun, Guo and Kumar (ICLR 2023).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["pareto_front", "relaxed_argmin", "solve_for_recall", "solve_for_cost"]

_STEPS = 60


def pareto_front(recall: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points (no other point is cheaper and at least as accurate),
    cheapest first."""
    order = np.lexsort((-recall, cost))
    keep = []
    best = -np.inf
    for i in order:
        if recall[i] > best:
            keep.append(i)
            best = recall[i]
    return np.asarray(keep, dtype=np.int64)


def relaxed_argmin(recall: np.ndarray, cost: np.ndarray, lam: float) -> int:
    """The candidate minimising ``(1 - recall) + lam * cost`` (ties: the more accurate one)."""
    objective = (1.0 - recall) + lam * cost
    best = objective.min()
    tied = np.flatnonzero(objective <= best + 1e-15)
    return int(tied[np.argmax(recall[tied])])


def _lam_range(cost: np.ndarray) -> tuple[float, float]:
    spread = max(float(cost.max() - cost.min()), 1e-12)
    # lam below 1e-6 / spread: any recall gain outweighs cost; above 1e6 / spread: cheapest wins
    return math.log(1e-6 / spread), math.log(1e6 / spread)


def solve_for_recall(recall: np.ndarray, cost: np.ndarray, target: float) -> int | None:
    """Cheapest hull point with ``recall >= target``, or None when no candidate reaches it."""
    if recall.max() < target:
        return None
    lo, hi = _lam_range(cost)
    choice = relaxed_argmin(recall, cost, math.exp(lo))
    for _ in range(_STEPS):
        mid = 0.5 * (lo + hi)
        i = relaxed_argmin(recall, cost, math.exp(mid))
        if recall[i] >= target:
            choice, lo = i, mid  # feasible: try weighing cost more
        else:
            hi = mid
    # The hull can skip a cheaper feasible point that lies above it; take it if one exists.
    feasible = np.flatnonzero(recall >= target)
    cheapest = int(feasible[np.argmin(cost[feasible])])
    return cheapest if cost[cheapest] < cost[choice] else choice


def solve_for_cost(recall: np.ndarray, cost: np.ndarray, budget: float) -> int | None:
    """Most accurate hull point with ``cost <= budget``, or None when every candidate costs more."""
    if cost.min() > budget:
        return None
    lo, hi = _lam_range(cost)
    choice = relaxed_argmin(recall, cost, math.exp(hi))
    for _ in range(_STEPS):
        mid = 0.5 * (lo + hi)
        i = relaxed_argmin(recall, cost, math.exp(mid))
        if cost[i] <= budget:
            choice, hi = i, mid  # within budget: try weighing recall more
        else:
            lo = mid
    within = np.flatnonzero(cost <= budget)
    best = int(within[np.argmax(recall[within])])
    return best if recall[best] > recall[choice] else choice
