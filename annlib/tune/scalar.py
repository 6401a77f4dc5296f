"""Tuning one monotone search parameter (HNSW ``ef``, the sketch's ``reorder``, TPU-KNN's
``recall_target``) by bisection on recall measured with real searches of the tuning sample.

Recall and cost both grow with such a parameter, so the cheapest setting that meets a recall
target is the smallest value that does, and the most accurate one within a budget is the largest
value that fits: a walk up a coarse grid brackets it and bisection narrows the bracket.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .result import OperatingPoint

__all__ = ["tune_scalar"]

Evaluate = Callable[[Any], tuple[float, float]]


def _midpoint(lo: Any, hi: Any, integer: bool) -> Any:
    if integer:
        return (int(lo) + int(hi)) // 2
    return 0.5 * (float(lo) + float(hi))


def _close(lo: Any, hi: Any, integer: bool, rel: float) -> bool:
    if integer:
        return int(hi) - int(lo) <= max(1, int(rel * int(hi)))
    return float(hi) - float(lo) <= rel * max(abs(float(hi)), 1e-9)


def tune_scalar(
    name: str,
    grid: Sequence[Any],
    evaluate: Evaluate,
    *,
    target: float | None = None,
    budget: float | None = None,
    integer: bool = True,
    refine_steps: int = 6,
    rel_resolution: float = 0.05,
    progress: Callable[[int], None] | None = None,
    known: dict[Any, tuple[float, float]] | None = None,
    reported: dict[Any, float] | None = None,
) -> tuple[dict[str, Any] | None, list[OperatingPoint]]:
    """Choose ``name`` from an increasing ``grid`` for a recall ``target`` or a cost ``budget``.

    Parameters
    ----------
    name : str
        The search parameter.
    grid : sequence
        Increasing values to bracket with (cheap to expensive).
    evaluate : callable
        ``evaluate(value) -> (recall, seconds per query)`` by real searches of the sample.
    target, budget : float
        Exactly one: the recall to reach, or the cost not to exceed.
    integer : bool, default True
        Integer parameter (bisection on integers) or real.
    refine_steps : int, default 6
        Bisection steps after the bracket is found.
    rel_resolution : float, default 0.05
        Stop bisecting when the bracket is this narrow relative to its upper end.
    known : dict, optional
        Evaluations made before on the same index and sample (value -> (recall, cost)); reused,
        and extended in place with the new ones, so repeated tunings of one index price a
        setting the same way (a higher target never gets a lower predicted cost).
    reported : dict, optional
        Prices reported before on the same index and sample (value -> seconds), kept in place:
        a later tuning never prices a setting below one it priced earlier at a smaller value,
        even when new timings move the fit.

    Returns
    -------
    (params or None, evaluated points)
        None when no grid value meets the constraint; the points let the caller name the best
        reachable recall.
    """
    seen: dict[Any, tuple[float, float]] = {} if known is None else known

    def run(value):
        if value not in seen:
            seen[value] = evaluate(value)
            if progress is not None:
                progress(len(seen))
        return seen[value]

    def meets(value) -> bool:
        recall, cost = run(value)
        return recall >= target if target is not None else cost <= budget

    lo = None  # for a target: largest value known to fail; for a budget: largest known to fit
    hi = None
    for value in grid:
        ok = meets(value)
        if target is not None:
            if ok:
                hi = value
                break
            lo = value
        else:
            if not ok:
                hi = value
                break
            lo = value
    if target is not None and hi is None:
        return None, _points(name, seen, reported)
    if budget is not None and lo is None:
        return None, _points(name, seen, reported)
    if lo is not None and hi is not None:
        for _ in range(refine_steps):
            if _close(lo, hi, integer, rel_resolution):
                break
            mid = _midpoint(lo, hi, integer)
            if mid == lo or mid == hi:
                break
            if meets(mid) == (target is not None):
                hi = mid
            else:
                lo = mid
    chosen = hi if target is not None else lo
    return {name: chosen}, _points(name, seen, reported)


def _points(name: str, seen: dict[Any, tuple[float, float]],
            reported: dict[Any, float] | None = None) -> list[OperatingPoint]:
    # The work a search does never shrinks as the parameter grows; a measured cost that does is
    # timing noise, so costs are made non-decreasing along the parameter before they are compared.
    ordered = sorted(seen.items(), key=lambda kv: kv[0])
    costs = monotone_fit([c for _, (_, c) in ordered]) if ordered else []
    if reported is not None:
        # New timings can move the fit; a price once reported for a smaller setting stays a floor.
        floor, earlier = 0.0, sorted(reported.items())
        j = 0
        lifted = []
        for (v, _), c in zip(ordered, costs):
            while j < len(earlier) and earlier[j][0] <= v:
                floor = max(floor, earlier[j][1])
                j += 1
            lifted.append(max(float(c), floor))
        costs = lifted
        reported.update({v: float(c) for (v, _), c in zip(ordered, costs)})
    return [OperatingPoint({name: v}, r, float(c)) for (v, (r, _)), c in zip(ordered, costs)]


def monotone_fit(values) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent
    violators): one noisy timing is averaged with its neighbours instead of lifting every
    later cost, as a running maximum would."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    out = []
    for total, count in blocks:
        out.extend([total / count] * int(count))
    return np.asarray(out)


def geometric_grid(low: float, high: float, ratio: float = 1.25, integer: bool = True) -> list:
    """Values from ``low`` to ``high`` growing by ``ratio`` (integers de-duplicated), ``high`` last."""
    out = []
    v = float(low)
    while v < high:
        out.append(int(round(v)) if integer else v)
        v *= ratio
    out.append(int(high) if integer else float(high))
    if integer:
        out = sorted(set(out))
    return out


def is_frontier(points: list[OperatingPoint]) -> list[OperatingPoint]:
    """The non-dominated points, cheapest first."""
    if not points:
        return []
    recall = np.array([p.recall for p in points])
    cost = np.array([p.cost for p in points])
    from .lagrange import pareto_front

    return [points[i] for i in pareto_front(recall, cost)]
