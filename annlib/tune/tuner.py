"""``annlib.tune``: search parameters for a recall target or a cost budget (docs/tuning.md).

Partitioned indexes are tuned by the constrained-optimization method of Sun, Guo and Kumar (ICLR
2023): one instrumented pass gives an exact recall model for every (leaves, reorder), a cost model
calibrated on this machine prices them, and a Lagrangian relaxation picks the point
(:mod:`annlib.tune.partitioned`). Families with one monotone knob (HNSW ``ef``, the sketch's
``reorder``, TPU-KNN's ``recall_target``) are tuned by bisection on measured recall
(:mod:`annlib.tune.scalar`). Either way a held-out part of the queries checks the prediction.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import numpy as np

from .. import _validation as V
from .._progress import progress_reporter
from .measure import seconds_per_query
from .result import OperatingPoint, TuningResult
from .sample import TuningSample, make_sample
from .scalar import geometric_grid, is_frontier, tune_scalar

__all__ = ["tune", "default_margin"]


def default_margin(target_recall: float | None) -> float:
    """The margin a recall target is tuned with by default: 12 % of its miss budget.

    Queries in use are rarely exactly the sample's distribution: on data whose queries come
    from other sources than the indexed vectors (descriptors of unseen images) the misses of a
    setting tuned on vectors of the data ran 8-15 % above the sample's. Aiming 12 % of the miss
    budget higher absorbs that; clipped to [0.002, 0.02].
    """
    if target_recall is None:
        return 0.0
    return float(min(0.02, max(0.002, round(0.12 * (1.0 - float(target_recall)), 4))))


def tune(index: Any, queries: Any, k: int = 10, target_recall: float | None = None,
         max_cost: float | None = None, ground_truth: Any = None, *, held_out: float = 0.3,
         margin: float | None = None, apply: bool = False, random_state: Any = 0,
         progress: Any = False, self_ids: Any = None) -> TuningResult:
    """Choose search parameters of a built index for a recall target or a cost budget.

    Parameters
    ----------
    index : annlib.Index
        A built index of any family.
    queries : array-like (q, d)
        Sample queries resembling the real ones (e.g. a sample of the data); at least 20 for a
        held-out check. 200-1000 give stable results.
    k : int, default 10
        Neighbours per query the recall is measured at.
    target_recall : float in (0, 1], optional
        Reach this recall@k at the lowest cost.
    max_cost : float, optional
        Or: reach the highest recall at no more than this many seconds per query (one thread,
        batch search).
    ground_truth : array (q, >=k) of ids, or (ids, distances), optional
        Exact neighbours of ``queries`` (external ids, best first). Computed with
        ``index.exact_search`` when omitted. With distances, recall counts ties at the k-th
        distance as ann-benchmarks does; with ids only it is the overlap of id sets.
    held_out : float in [0, 0.9], default 0.3
        Share of the queries kept out of tuning to check the prediction.
    margin : float, optional
        Added to ``target_recall`` on the tuning part; raised once by the shortfall when the
        held-out check misses the target. Default :func:`default_margin`: 12 % of the miss
        budget ``1 - target_recall``, between 0.002 and 0.02 (0.012 at 0.90, 0.006 at 0.95, 0.002
        at 0.99), because queries in use can miss more often than the sample does.
    apply : bool, default False
        Store the result as the index's default search parameters (saved with the index) and
        its summary as ``index.tuning``.
    random_state : int, Generator or None, default 0
        Seed of the tuning/held-out split.
    progress : bool or callable, default False
        Progress of the evaluations.
    self_ids : int array (q,), optional
        Leave-one-out tuning on the data: ``queries`` are indexed vectors with these ids; each
        query's own id is left out of its truth and its results, so it acts as a fresh query
        (how ``Index.build(X)`` and ``default_recall`` tune without a query sample).

    Returns
    -------
    TuningResult
        A mapping of the chosen search parameters (``index.search(Q, k, **result)``) carrying
        predicted recall and cost, the Pareto table, held-out recall and the tuning time.

    Raises
    ------
    TypeError, ValueError
        Bad arguments; neither or both of ``target_recall`` and ``max_cost``; a target no
        setting reaches (the message names the best reachable recall); a budget below the
        cheapest setting.
    """
    from ..api import Index

    start = time.perf_counter()
    if not isinstance(index, Index):
        raise V.not_an_index(index)
    index._require_built()
    V.check_one_constraint(target_recall, max_cost)
    if target_recall is not None:
        target_recall = V.check_float("target_recall", target_recall, 0.0, 1.0, low_open=True)
    if max_cost is not None:
        max_cost = V.check_float("max_cost", max_cost, 0.0, low_open=True)
    held_out = V.check_float("held_out", held_out, 0.0, 0.9)
    if margin is None:
        margin = default_margin(target_recall)
    margin = V.check_float("margin", margin, 0.0, 0.5)
    apply = V.check_bool("apply", apply)
    V.check_progress(progress)
    Q, _ = V.as_vectors(queries, "queries")
    V.check_dim(Q.shape[1], index.dim, "queries")
    k = V.check_k(k, len(index))
    truth = None if ground_truth is None else _check_ground_truth(ground_truth, Q.shape[0], k)
    own = None
    if self_ids is not None:
        own = V.check_id_list(self_ids, "self_ids")
        V.check_self_ids(own, Q.shape[0], truth is not None, k, len(index))
    rng = np.random.default_rng(V.resolve_seed(random_state))
    sample = make_sample(index, Q, k, truth, held_out, rng, own)

    family = index.family
    tuner = _TUNERS.get(family)
    if tuner is None:
        raise V.no_tuner(family, _TUNERS)
    with progress_reporter(progress, 1, desc=f"tuning {family}", unit="eval") as report:
        goal = None if target_recall is None else min(1.0, target_recall + margin)
        params, points, method, details = tuner(index, sample, k, goal, max_cost, report)
        held = _held_out_recall(index, sample, k, params)
        if (params is not None and target_recall is not None and held is not None
                and held < target_recall - 0.005 and goal < 1.0):
            # the sample flattered the setting: widen the margin by the shortfall and re-choose
            margin = round(margin + (target_recall - held), 4)
            goal = min(1.0, target_recall + margin)
            params, points, method, details = tuner(index, sample, k, goal, max_cost, report)
            held = _held_out_recall(index, sample, k, params)
    if params is None:
        best = max(points, key=lambda p: p.recall) if points else None
        if target_recall is not None:
            reach = "nothing" if best is None else f"{best.recall:.4f} at {best.params}"
            raise V.target_unreachable(target_recall, margin, type(index).__name__, k, reach)
        cheapest = min(points, key=lambda p: p.cost)
        raise V.budget_too_small(max_cost, type(index).__name__, cheapest.cost, cheapest.params)
    chosen = next((p for p in points if p.params == params), None)
    if chosen is None:
        chosen = OperatingPoint(params, float("nan"), float("nan"))
    result = TuningResult(
        params=dict(params), family=family, target_recall=target_recall, max_cost=max_cost,
        predicted_recall=chosen.recall, predicted_cost=chosen.cost, held_out_recall=held,
        margin=margin if target_recall is not None else 0.0, pareto=tuple(is_frontier(points)),
        method=method, seconds=time.perf_counter() - start, details=details)
    if apply:
        index.set_default_search_params(**result.params)
        index.tuning = result.summary()
    return result


def _check_ground_truth(ground_truth: Any, nq: int, k: int):
    if isinstance(ground_truth, tuple) and len(ground_truth) == 2:
        ids, dist = ground_truth
    else:
        ids, dist = ground_truth, None
    ids = np.asarray(ids)
    V.check_truth_ids(ids, nq, k)
    kth = None
    if dist is not None:
        dist = np.asarray(dist, dtype=np.float64)
        V.check_truth_distances(dist, nq, k)
        kth = dist[:, k - 1]
    return ids[:, :k].astype(np.int64), kth


def _held_out_recall(index, sample: TuningSample, k: int, params) -> float | None:
    if params is None or sample.held_out is None:
        return None
    ids, dist = sample.search(index, k, params, held_out=True)
    return sample.held_out_truth.recall(ids, dist)


# ------------------------------------------------------------------------------- families
# Evaluations per index, keyed by what makes them comparable (sample, k, size of the index), so
# tuning one index again for another target reuses and agrees with the earlier measurements.
_EVALUATIONS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def evaluations_for(index, sample: TuningSample, k: int, name: str) -> dict:
    """The cache of (recall, cost) by parameter value for this index, sample and k."""
    own = None if sample.self_ids is None else hash(sample.self_ids.tobytes())
    key = (name, k, len(index), index.n_positions, sample.queries.shape, hash(sample.queries.tobytes()), own)
    per_index = _EVALUATIONS.setdefault(index, {})
    return per_index.setdefault(key, {})


def _measured(index, sample: TuningSample, k: int, name: str):
    def evaluate(value):
        params = {name: value}
        # the search that measures recall is also the first timing (best of it and one more)
        t0 = time.perf_counter()
        ids, dist = sample.search(index, k, params)
        first = (time.perf_counter() - t0) / sample.queries.shape[0]
        recall = sample.truth.recall(ids, dist)
        return recall, min(first, seconds_per_query(index, sample.queries, k, params, repeats=1))
    return evaluate


def _scalar_family(name: str, grid_fn, integer: bool = True):
    def tuner(index, sample, k, goal, budget, report):
        grid = grid_fn(index, k)
        params, points = tune_scalar(name, grid, _measured(index, sample, k, name), target=goal,
                                     budget=budget, integer=integer, progress=report,
                                     known=evaluations_for(index, sample, k, name),
                                     reported=evaluations_for(index, sample, k, name + ":reported"))
        if budget is not None and params is not None:
            # prices are final only after the monotone fit over every evaluation: choose the
            # most accurate setting at the prices reported
            within = [p for p in points if p.cost <= budget]
            params = None if not within else dict(max(within, key=lambda p: (p.recall, -p.cost)).params)
        return params, points, "bisection", {"grid": list(grid)}
    return tuner


def _hnsw_grid(index, k):
    n = len(index)
    top = min(n, 4096)
    return [v for v in geometric_grid(max(k, 10), top, ratio=1.5) if v >= k]


def _reorder_grid(index, k):
    return geometric_grid(k, len(index), ratio=1.5)


def _recall_target_grid(index, k):
    return [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0]


def _bruteforce(index, sample, k, goal, budget, report):
    cost = seconds_per_query(index, sample.queries, k, {})
    point = OperatingPoint({}, 1.0, cost)
    if budget is not None and cost > budget:
        return None, [point], "exact", {}
    return {}, [point], "exact", {}


def _partitioned(index, sample, k, goal, budget, report):
    from .partitioned import tune_partitioned

    return tune_partitioned(index, sample, k, goal, budget, report)


_TUNERS = {
    "bruteforce": _bruteforce,
    "hnsw": _scalar_family("ef", _hnsw_grid),
    "mahalanobis": _scalar_family("reorder", _reorder_grid),
    "tpuknn": _scalar_family("recall_target", _recall_target_grid, integer=False),
    "partitioned": _partitioned,
}
