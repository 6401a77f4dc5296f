"""``Index.build(X)`` with no method: choose a family by a measured rule, build it, tune it.

The rule (:func:`choose_family`) comes from the tuned-point measurements on the shared data sets
in docs/benchmarks.md ("auto"); the tuning queries are made from the data itself
(:func:`tuning_queries`), so no query sample is needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _validation as V
from .tuner import tune

__all__ = ["choose_family", "tuning_queries", "build_auto", "AUTO_DEFAULTS"]

AUTO_DEFAULTS = {"target_recall": 0.95, "sample_size": 1000, "k": 10, "random_state": 0}


def choose_family(n: int, dim: int, metric: str, target_recall: float) -> tuple[str, dict[str, Any], str]:
    """The family and build parameters ``auto`` uses for ``n`` vectors of dimension ``dim``.

    Returns
    -------
    (family, build_params, reason)
    """
    if n < 50_000:
        return "hnsw", {"M": 16}, (
            f"n={n} < 50,000: HNSW (M=16) reached every target at the highest measured QPS on the "
            "10k-50k shared sets; its build takes seconds at this size")
    return "hnsw", {"M": 32}, (
        f"n={n} >= 50,000: HNSW+FINGER (M=32) had the highest tuned QPS at the target on the large "
        "shared sets")


def tuning_queries(index: Any, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` queries like real ones, made from the indexed vectors.

    Each is a random indexed vector moved by Gaussian noise whose length is that vector's
    distance to its nearest other indexed vector: as far from the data as a fresh sample of the
    same distribution typically is, so the query is neither a trivial self-match nor off the
    data's manifold. Vectors are taken as the index stores them (normalised under cosine).
    """
    n = index.n_positions
    m = min(m, n)
    pos = np.sort(rng.choice(n, m, replace=False))
    S = np.asarray(index._vectors_at(pos), dtype=np.float32)
    near = index.exact_search(S, min(2, len(index)))
    other = near.ids[:, -1]
    # nearest other vector: the second result, unless the vector itself was not first (duplicates)
    radius = np.zeros(m, np.float64)
    ok = other >= 0
    if ok.any():
        nb = np.asarray(index._vectors_at(index._positions_of(other[ok])), dtype=np.float64)
        radius[ok] = np.linalg.norm(S[ok].astype(np.float64) - nb, axis=1)
    d = S.shape[1]
    noise = rng.standard_normal(S.shape) * (radius / np.sqrt(d))[:, None]
    return np.ascontiguousarray(S + noise, dtype=np.float32)


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
        Tuning queries made from the data (:func:`tuning_queries`); 30 % are held out to check.
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
    from ..api import Index

    target_recall = V.check_float("target_recall", target_recall, 0.0, 1.0, low_open=True)
    sample_size = V.check_int("sample_size", sample_size, 20)
    k = V.check_int("k", k, 1)
    seed = V.resolve_seed(random_state)
    X32, _ = V.as_vectors(X, "X")
    n, dim = X32.shape
    family, build_params, reason = choose_family(n, dim, metric if isinstance(metric, str) else "l2", target_recall)
    index = Index.build(X32 if X32 is not X else X, method=family, metric=metric, ids=ids, progress=progress,
                        threads=threads, random_state=seed, **build_params)
    rng = np.random.default_rng(seed)
    Q = tuning_queries(index, sample_size, rng)
    result = tune(index, Q, k=min(k, len(index)), target_recall=target_recall, apply=True,
                  random_state=seed, progress=progress)
    index.tuning = {**result.summary(), "chosen_by": "auto", "rule": reason,
                    "build_params": dict(build_params), "sample": f"{Q.shape[0]} queries made from the data"}
    return index
