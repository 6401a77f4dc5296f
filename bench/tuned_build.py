"""Build an annlib index and tune it for several recall targets, as ``Index.build`` self-tunes.

The benchmark measures the tuner the way the library uses it, with queries made from the
training vectors only: for families whose ``tuning_queries`` is ``"held_out"`` (HNSW) a sample is
held out of the build, the index is tuned with it as queries and the sample is then added (ids
keep the training rows); for the others the whole set is built and the sample searched
leave-one-out. One build serves every target.
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["build_and_tune"]


def build_and_tune(family: str, train: np.ndarray, metric: str, targets, *, k: int = 10,
                   sample: int = 1000, seed: int = 0, threads: int = 1, **build_params):
    """Returns ``(index, build_seconds, {target: (params, info)})``.

    ``info`` has ``predicted_recall``, ``held_out_recall``, ``margin`` and ``tune_s``; a target
    the index cannot reach gets ``(None, {"error": message, "tune_s": ...})``. Self-tuning at
    build is off (``default_recall=None``); the build time excludes tuning.
    """
    import annlib
    from annlib.api import get_family
    from annlib.tune.auto import held_out_split, tuning_queries

    n = train.shape[0]
    cls = get_family(family)
    held_out = getattr(cls, "tuning_queries", "") == "held_out"
    m = min(sample, n // 4)
    common = dict(method=family, metric=metric, threads=threads, **build_params)
    if "default_recall" in cls.build_defaults:
        common["default_recall"] = None  # tuned below, for every target
    t0 = time.perf_counter()
    if held_out:
        keep, rows = held_out_split(n, m, seed)
        index = annlib.Index.build(np.ascontiguousarray(train[keep]), ids=keep, **common)
        queries, own = np.ascontiguousarray(train[rows]), None
    else:
        index = annlib.Index.build(train, **common)
    build_s = time.perf_counter() - t0
    if not held_out:
        queries, own = tuning_queries(index, sample, np.random.default_rng(seed))
    out = {}
    for target in targets:
        t0 = time.perf_counter()
        try:
            with annlib.threads(threads):
                result = annlib.tune(index, queries, k=min(k, len(index) - 1), target_recall=target,
                                     self_ids=own, random_state=seed)
        except ValueError as exc:
            out[target] = (None, {"error": str(exc), "tune_s": time.perf_counter() - t0})
            continue
        out[target] = (dict(result), {"predicted_recall": result.predicted_recall,
                                      "held_out_recall": result.held_out_recall,
                                      "margin": result.margin, "tune_s": time.perf_counter() - t0})
    if held_out:
        t0 = time.perf_counter()
        index.add(queries, ids=rows, threads=threads)
        build_s += time.perf_counter() - t0
    return index, build_s, out
