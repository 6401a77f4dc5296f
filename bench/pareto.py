"""Pareto frontiers of (recall, QPS) and the QPS read off them at fixed recall levels.

A sweep gives one point per configuration; the frontier keeps those no other point beats on
both recall and QPS. The headline figure is the QPS at recall >= 0.90 / 0.95 / 0.99, read off
the frontier with log-QPS interpolated linearly in recall between the two frontier points that
bracket the level: QPS falls roughly exponentially as recall approaches 1,
so interpolating the logarithm follows the curve where interpolating QPS would overstate it.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

__all__ = [
    "RECALL_LEVELS",
    "frontier",
    "qps_at_recall",
    "summarize",
    "group_runs",
    "ratio",
]

#: Recall levels the headline tables report.
RECALL_LEVELS = (0.90, 0.95, 0.99)

# Recall is a mean of fractions: 0.9 may arrive as 0.8999999999999999.
_TOLERANCE = 1e-9


def frontier(points: Iterable[Sequence[float]]) -> list[tuple[float, float]]:
    """Non-dominated ``(recall, qps)`` points, by increasing recall (so decreasing QPS).

    A point is dominated when another has recall and QPS at least as high, one of them higher.
    Points with a NaN coordinate are ignored.
    """
    pts = [(float(r), float(q)) for r, q in points if not (math.isnan(r) or math.isnan(q))]
    pts.sort(key=lambda p: (-p[0], -p[1]))
    kept: list[tuple[float, float]] = []
    best_qps = -math.inf
    for recall, q in pts:
        if q > best_qps:
            kept.append((recall, q))
            best_qps = q
    kept.reverse()
    return kept


def qps_at_recall(front: Sequence[tuple[float, float]], level: float) -> float | None:
    """QPS at recall >= ``level`` on a frontier (log-QPS linear in recall).

    Parameters
    ----------
    front : sequence of (recall, qps)
        As returned by :func:`frontier`.
    level : float

    Returns
    -------
    float or None
        None when no point reaches the level. When the lowest-recall frontier point already
        reaches it, that point's QPS (the frontier's best).
    """
    for i, (recall, q) in enumerate(front):
        if recall >= level - _TOLERANCE:
            if i == 0 or recall <= level + _TOLERANCE:
                return q
            r0, q0 = front[i - 1]
            t = (level - r0) / (recall - r0)
            return math.exp(math.log(q0) + t * (math.log(q) - math.log(q0)))
    return None


def group_runs(runs: Iterable[dict], key: str = "label") -> dict[str, list[dict]]:
    """Runs grouped by a record field, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run[key], []).append(run)
    return groups


def summarize(runs: Sequence[dict], mode: str = "batch", levels=RECALL_LEVELS) -> dict:
    """Frontier and headline figures of a set of runs in one mode.

    Parameters
    ----------
    runs : sequence of dict
        Records with ``recall``/``qps_batch`` (batch) or ``recall_single``/``qps_single``.
    mode : {"batch", "single"}
    levels : sequence of float

    Returns
    -------
    dict
        ``frontier`` (list of [recall, qps]), ``max_recall`` and ``qps_at`` ({level: qps or
        None}); empty figures when no run measured this mode.
    """
    if mode not in ("batch", "single"):
        raise ValueError(f"mode must be 'batch' or 'single'; got {mode!r}")
    rk, qk = ("recall", "qps_batch") if mode == "batch" else ("recall_single", "qps_single")
    pts = [(r[rk], r[qk]) for r in runs if r.get(rk) is not None and r.get(qk) is not None]
    front = frontier(pts)
    return {
        "frontier": [list(p) for p in front],
        "max_recall": max((p[0] for p in front), default=None),
        "qps_at": {f"{lv:.2f}": qps_at_recall(front, lv) for lv in levels},
    }


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference
