"""``Index.build(X)`` with no method: choose a family by a measured rule, build it, tune it.

The rule (:func:`choose_family`) comes from the tuned-point measurements on the shared data sets
in docs/benchmarks.md ("auto"); the tuning queries are made from the data (vectors held out of
the build and added after tuning, or indexed vectors searched leave-one-out), so no query sample
is needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _validation as V
from .tuner import tune

__all__ = ["choose_family", "AUTO_PARTITIONED_FROM", "tuning_queries", "held_out_split", "build_auto", "build_self_tuned",
           "AUTO_DEFAULTS", "SELF_TUNE_QUERIES"]

SELF_TUNE_QUERIES = 300

AUTO_DEFAULTS = {"target_recall": 0.95, "sample_size": 1000, "k": 10, "random_state": 0}


# Below this many vectors Index.build(X) builds HNSW, from it on Partitioned (see choose_family).
AUTO_PARTITIONED_FROM = 50_000


def choose_family(n: int, dim: int, metric: str, target_recall: float) -> tuple[str, dict[str, Any], str]:
    """The family and build parameters ``auto`` uses for ``n`` vectors of dimension ``dim``.

    The rule is the measured one (docs/tuning.md, "the auto rule"): the best grid QPS of each
    family at recall@10 0.90 / 0.95 / 0.99 on the four shared sets, single-threaded batch
    search. HNSW (M=32, measured with FINGER before the walk on 8-bit codes became its default;
    that walk was faster still on every set) was 1.3-1.7x Partitioned on 9,000 vectors (mnist-784); the two
    were within 10 % of each other at 50,000 (wordnet-minilm-384); Partitioned was 1.0-1.5x
    HNSW at 100,000 (kdewall-sift-128) and 1.5-1.7x at 200,000 (glove-50), and builds 3-8x
    faster there. Neither d (50 to 784) nor the target changed the order, so the rule uses n.

    Returns
    -------
    (family, build_params, reason)
    """
    if n < AUTO_PARTITIONED_FROM:
        return "hnsw", {"M": 32}, (
            f"n={n:,} < {AUTO_PARTITIONED_FROM:,}: HNSW (M=32) had 1.3-1.7x Partitioned's QPS "
            "at recall 0.90-0.99 on the 9,000-vector shared set; its build takes seconds at this size")
    return "partitioned", {}, (
        f"n={n:,} >= {AUTO_PARTITIONED_FROM:,}: Partitioned (SOAR, 4-bit PQ, re-ranking) had 0.9-1.7x "
        "HNSW's QPS at recall 0.90-0.99 on the 50,000-200,000-vector shared sets (1.5-1.7x at 200,000) "
        "and builds 3-8x faster")


# Perturbed queries sit this many nearest-neighbour distances away from the vector they start
# from. Calibrated with HNSW on i.i.d. Gaussian and clustered synthetic sets (d = 32, 64): at 1.0
# the tuned ef missed the target on fresh queries by up to 0.02, at 1.5 it met it on all three,
# at 2.0 it overshot by 0.03-0.07 (see docs/tuning.md).
PERTURBATION = 1.5


def tuning_queries(index: Any, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """``m`` queries of the data's own distribution, and the ids to leave out (or None).

    Two ways, chosen by the family's ``tuning_queries`` attribute:

    * ``"leave_one_out"`` (Partitioned, and the default): random indexed vectors, each searched
      with its own id left out of truth and results (``tune(..., self_ids=...)``). A vector is
      then a fresh sample searched against the others, which is exact for structures that do
      not adapt to single vectors (partitions, codes).
    * otherwise (``"held_out"``, HNSW, whose self-tune holds vectors out of the build instead;
      here the index already holds every vector): a graph links every vector to its own near
      neighbours, so a leave-one-out query would start next to its answer. Each random indexed
      vector is moved by Gaussian noise of length :data:`PERTURBATION` times its distance to
      its nearest other vector — an approximation (docs/tuning.md); give real queries instead.

    Vectors are taken as the index stores them (normalised under cosine).
    """
    n = index.n_positions
    live = index._live_mask()
    pool = np.arange(n) if live is None else np.flatnonzero(live)
    m = min(m, pool.size)
    pos = np.sort(rng.choice(pool, m, replace=False)).astype(np.int64)
    S = np.ascontiguousarray(index._vectors_at(pos), dtype=np.float32)
    own = index._external_ids(pos)
    if getattr(index, "tuning_queries", "leave_one_out") == "leave_one_out":
        return S, own
    # "held_out" and "perturbed" families on an index already built with every vector
    near = index.exact_search(S, min(2, len(index)))
    nearest = np.where(near.ids[:, 0] == own, near.ids[:, -1], near.ids[:, 0])  # duplicates: either
    radius = np.zeros(m, np.float64)
    ok = nearest >= 0
    if ok.any():
        nb = np.asarray(index._vectors_at(index._positions_of(nearest[ok])), dtype=np.float64)
        radius[ok] = np.linalg.norm(S[ok].astype(np.float64) - nb, axis=1)
    noise = rng.standard_normal(S.shape) * (PERTURBATION * radius / np.sqrt(S.shape[1]))[:, None]
    return np.ascontiguousarray(S + noise, dtype=np.float32), None


def build_auto(X: Any, metric: str = "l2", *, ids: Any = None, progress: Any = False, threads: Any = None,
               target_recall: float = 0.95, sample_size: int = 1000, k: int = 10,
               random_state: Any = 0) -> Any:
    """Choose, build and tune an approximate index for ``target_recall`` (see :func:`choose_family`).

    Parameters
    ----------
    X, metric, ids, progress, threads
        As for ``Index.build``.
    target_recall : float in (0, 1], default 0.95
        recall@k the tuned default search parameters aim at.
    sample_size : int, default 1000
        Tuning queries made from the data (:func:`build_self_tuned`: vectors held out of the
        build, or leave-one-out); 30 % of them are kept out of tuning to check it.
    k : int, default 10
        Neighbours the recall is tuned at (clipped to the number of vectors).
    random_state : int, Generator or None, default 0
        Seed of the build and of the tuning sample.

    Returns
    -------
    Index
        The built index with tuned defaults; ``index.tuning`` says what was chosen and why.

    Raises
    ------
    TypeError, ValueError
        As ``Index.build``; a target the chosen family cannot reach.
    """
    from ..api import get_family

    target_recall = V.check_float("target_recall", target_recall, 0.0, 1.0, low_open=True)
    sample_size = V.check_int("sample_size", sample_size, 20)
    k = V.check_int("k", k, 1)
    seed = V.resolve_seed(random_state)
    X32, _ = V.as_vectors(X, "X")
    n, dim = X32.shape
    family, build_params, reason = choose_family(n, dim, metric if isinstance(metric, str) else "l2", target_recall)
    index = get_family(family)(metric=metric, random_state=seed, default_recall=target_recall, **build_params)
    # the build's own self-tune does the tuning, with auto's sample size and k
    index._self_tune_plan = (sample_size, k)
    index.build(X32 if X32 is not X else X, ids=ids, progress=progress, threads=threads)
    tuning = index.tuning or {"target_recall": target_recall, "params": {},
                              "note": f"{n} vector(s): too few to tune; the family's defaults are kept"}
    if "note" in tuning and n >= 2:
        raise ValueError(f"Index.build(X) chose {family} but could not tune it: {tuning['note']}")
    index.tuning = {**tuning, "chosen_by": "auto", "rule": reason, "build_params": dict(build_params)}
    return index


def _describe_sample(Q: np.ndarray, own: np.ndarray | None, held_out: bool = False) -> str:
    if held_out:
        return f"{Q.shape[0]} vectors held out of the build as queries, added after tuning"
    if own is None:
        return f"{Q.shape[0]} indexed vectors moved by {PERTURBATION} nearest-neighbour distances"
    return f"{Q.shape[0]} indexed vectors as leave-one-out queries"


def held_out_split(n: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept positions, sample positions), both sorted: ``m`` of ``n`` drawn with ``seed``."""
    rng = np.random.default_rng([seed, 1])
    sample = np.sort(rng.choice(n, m, replace=False)).astype(np.int64)
    keep = np.setdiff1d(np.arange(n, dtype=np.int64), sample, assume_unique=True)
    return keep, sample


def build_self_tuned(index: Any, X: np.ndarray, ids: np.ndarray | None, progress: Any) -> None:
    """Build ``index`` on ``X`` (prepared, owned) and tune its defaults for ``default_recall``.

    Called by ``Index.build`` (under the index's write lock) for families built with
    ``default_recall``. The sample size and k come from ``index._self_tune_plan`` when
    ``Index.build(X)`` (auto) set one, else :data:`SELF_TUNE_QUERIES` and 10. Families whose
    ``tuning_queries`` is ``"held_out"`` (HNSW) are built on all but a random sample of the
    vectors, tuned with that sample as queries (fresh queries of the data's distribution, exactly),
    and then given the sample by ``add`` at its own rows; the others are built whole and tuned
    on leave-one-out queries (:func:`tuning_queries`). The result becomes the default search
    parameters and ``index.tuning``; when the target cannot be reached the family's own defaults
    stay and ``index.tuning["note"]`` says why.
    """
    from .. import _compile_ahead

    target = index.params["default_recall"]
    sample_size, k = getattr(index, "_self_tune_plan", (SELF_TUNE_QUERIES, 10))
    seed = int(index.params.get("random_state") or 0)
    n, dim = X.shape
    m = min(sample_size, n // 4)
    held_out = getattr(index, "tuning_queries", "leave_one_out") == "held_out" and m >= _MIN_HELD_OUT
    if not held_out:
        index._build(X, progress)
        index._reset_state(dim, n, ids)
        if n >= 2:
            rng = np.random.default_rng([seed, 1])
            Q, own = tuning_queries(index, sample_size, rng)
            _compile_ahead.wait(index.family, _compile_ahead.STAGE_MANY)  # compiled aside on a first build
            _tune_defaults(index, Q, own, target, min(k, n - 1), seed)
        return
    keep, sample = held_out_split(n, m, seed)
    index._build(np.ascontiguousarray(X[keep]), progress)
    index._reset_state(dim, keep.size, None)
    Q = np.ascontiguousarray(X[sample])
    _compile_ahead.wait(index.family, _compile_ahead.STAGE_MANY)  # compiled aside on a first build
    params = _tune_defaults(index, Q, None, target, min(k, keep.size), seed, held_out=True)
    tuning = index.tuning
    index._add(Q, progress)
    index._relabel_positions(np.concatenate([keep, sample]))
    index._reset_state(dim, n, ids)
    if hasattr(index, "reset_search_stats"):
        index.reset_search_stats()  # the tuning searches are not the user's
    if params:
        index.set_default_search_params(**params)
    index.tuning = tuning


# Below this many held-out vectors (a quarter of the data) HNSW tunes on perturbed vectors.
_MIN_HELD_OUT = 40


def _tune_defaults(index: Any, Q: np.ndarray, own: np.ndarray | None, target: float, k: int,
                   seed: int, held_out: bool = False) -> dict[str, Any]:
    """Tune for ``target`` on ``Q``; set defaults and ``index.tuning``; returns the params."""
    try:
        result = tune(index, Q, k=k, target_recall=target, random_state=seed, self_ids=own)
    except ValueError as exc:
        index.tuning = {"chosen_by": "build self-tune", "target_recall": target,
                        "params": {}, "note": f"family defaults kept: {exc}"}
        return {}
    index.set_default_search_params(**result.params)
    index.tuning = {**result.summary(), "chosen_by": "build self-tune",
                    "sample": _describe_sample(Q, own, held_out)}
    return dict(result.params)
