"""annlib's algorithms for ann-benchmarks: :class:`AnnlibHNSW` and :class:`AnnlibPartitioned`.

This folder is copied into an ann-benchmarks checkout as ``ann_benchmarks/algorithms/annlib/``
(README.md beside this file); the harness reads ``config.yml``, builds the image from
``Dockerfile`` and constructs these classes with the data set's metric ("euclidean" or
"angular") and the build arguments of one run group, then calls ``fit``, and for every query
argument group ``set_query_arguments`` followed by ``query``/``batch_query``.

annlib is driven through its public API only (``annlib.Index.build`` and ``index.search``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

import annlib
from annlib import _validation as V

try:
    from ann_benchmarks.algorithms.base.module import BaseANN
except ImportError:  # outside an ann-benchmarks checkout (tests, own scripts)
    from .fallback_base import BaseANN

__all__ = ["AnnlibHNSW", "AnnlibPartitioned"]

# The harness' data set metrics -> annlib's.
METRICS = {"euclidean": "l2", "angular": "cosine"}


def available_cpus() -> int:
    """CPUs this process may run on.

    The harness pins a single-query run's container to one CPU (cpuset), while numba's default
    thread count is the machine's CPU count; asking for more threads than the pinned CPUs would
    only make them take turns.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # platforms without affinity masks
        return max(1, os.cpu_count() or 1)


class _Annlib(BaseANN):
    """What both algorithms share: metric mapping, build, queries, memory, name.

    Subclasses set ``family`` and ``label``, and implement ``_build_params(n)`` and
    ``set_query_arguments``.
    """

    family = ""
    label = ""

    def __init__(self, metric: str):
        if metric not in METRICS:
            raise V.unsupported_benchmark_metric(metric, METRICS)
        self.metric = metric
        self.index: Any = None
        self.size = 0
        self.search_params: dict[str, Any] = {}
        self.threads = available_cpus()
        self.res: list[np.ndarray] = []
        self.name = self.label

    def _build_params(self, n: int) -> dict[str, Any]:
        raise NotImplementedError

    def fit(self, X: np.ndarray) -> None:
        """Build the index over the training vectors ``X`` (the harness times this call)."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        # default_recall=None: the harness sets the search parameters of every run itself, so
        # the build's own tuning of default parameters would only lengthen the measured build
        self.index = annlib.Index.build(X, method=self.family, metric=METRICS[self.metric],
                                        threads=self.threads, default_recall=None,
                                        **self._build_params(X.shape[0]))
        self.size = len(self.index)  # the harness adds nothing after fit
        # compile and touch the search path now, so no timed query pays for it
        self.index.warmup()

    def _name(self, **query_params: Any) -> str:
        """``label(build params,query params)``, the run's name in the harness' results."""
        parts = [f"{key}={value}" for key, value in {**self._describe_build(), **query_params}.items()]
        return f"{self.label}({','.join(parts)})"

    def _describe_build(self) -> dict[str, Any]:
        raise NotImplementedError

    def query(self, q: np.ndarray, n: int) -> np.ndarray:
        """Ids of the ``n`` nearest training vectors of the vector ``q``, best first."""
        # this runs once per timed query (the harness' default mode): nothing here it can skip
        ids = self.index.search(q, n if n <= self.size else self.size, threads=self.threads,
                                **self.search_params)[0]
        # -1 pads only rows that cannot be filled, and pads last; the harness indexes with ids
        return ids if ids[-1] >= 0 else ids[ids >= 0]

    def batch_query(self, X: np.ndarray, n: int) -> None:
        """Answer all queries ``X`` in one call; :meth:`get_batch_results` returns the ids."""
        ids, _ = self.index.search(X, min(n, self.size), threads=self.threads, **self.search_params)
        self.res = [row[row >= 0] for row in ids]

    def get_batch_results(self) -> list[np.ndarray]:
        """Ids found by the last :meth:`batch_query`, one array per query."""
        return self.res

    def get_additional(self) -> dict[str, Any]:
        """The index's own size in kB, stored beside the harness' RSS-based ``index_size``."""
        if self.index is None:
            return {}
        return {"annlib_index_kb": self.index.memory_bytes() / 1024}

    def done(self) -> None:
        """Drop the index."""
        self.index = None
        self.res = []

    def __str__(self) -> str:
        return self.name


class AnnlibHNSW(_Annlib):
    """annlib's HNSW graph, optionally with FINGER.

    Parameters
    ----------
    metric : {"euclidean", "angular"}
        The data set's metric (``'@metric'`` in config.yml).
    M : int, default 32
        Out-degree of the upper layers (layer 0 keeps 2 M).
    ef_construction : int, default 200
        Beam width while inserting.
    finger : bool, default False
        Build the FINGER payload and use it while searching (the walk on float32 vectors).
    walk : {"auto", "float", "sq8"}, default "auto"
        What the walk scores (annlib's ``walk``): ``"auto"`` walks on 8-bit codes unless
        ``finger`` is on, as annlib's default build does; ``"float"`` the plain float32 walk.

    Query arguments: ``ef`` (beam width of the search).

    Raises
    ------
    ValueError
        Another metric; parameters out of annlib's ranges (at ``fit``).
    """

    family = "hnsw"
    label = "annlib-hnsw"

    def __init__(self, metric: str, M: int = 32, ef_construction: int = 200, finger: bool = False,
                 walk: str = "auto"):
        super().__init__(metric)
        self.M = M
        self.ef_construction = ef_construction
        self.finger = finger
        self.walk = walk
        self.name = self._name()

    def _build_params(self, n: int) -> dict[str, Any]:
        return {"M": self.M, "ef_construction": self.ef_construction, "finger": bool(self.finger),
                "walk": self.walk}

    def _describe_build(self) -> dict[str, Any]:
        return {"M": self.M, "efC": self.ef_construction, "finger": int(bool(self.finger)), "walk": self.walk}

    def set_query_arguments(self, ef: int) -> None:
        """Search with beam width ``ef`` from now on."""
        self.search_params = {"ef": int(ef)}
        self.name = self._name(ef=int(ef))


class AnnlibPartitioned(_Annlib):
    """annlib's partitioned index: k-means leaves, SOAR spilling, 4-bit PQ, exact re-ranking.

    Parameters
    ----------
    metric : {"euclidean", "angular"}
        The data set's metric (``'@metric'`` in config.yml).
    num_leaves : int or str, default "2*sqrt(n)"
        Number of leaves, or ``"<factor>*sqrt(n)"`` to scale it with the training set's size
        ``n`` (one config for every data set).

    Query arguments: ``leaves`` (leaves probed per query) and ``reorder`` (candidates re-scored
    exactly).

    Raises
    ------
    ValueError, TypeError
        Another metric, or a ``num_leaves`` of neither form.
    """

    family = "partitioned"
    label = "annlib-partitioned"

    def __init__(self, metric: str, num_leaves: Any = "2*sqrt(n)"):
        super().__init__(metric)
        self.num_leaves = num_leaves
        self._leaves = V.check_leaf_count(num_leaves)  # an int count, or a float factor of sqrt(n)
        self.name = self._name()

    def leaf_count(self, n: int) -> int:
        """Leaves built for ``n`` training vectors (at most ``n``)."""
        if isinstance(self._leaves, float):
            return max(1, min(n, round(self._leaves * math.sqrt(n))))
        return min(n, self._leaves)

    def _build_params(self, n: int) -> dict[str, Any]:
        return {"num_leaves": self.leaf_count(n)}

    def _describe_build(self) -> dict[str, Any]:
        return {"leaves": str(self.num_leaves).replace(" ", "")}

    def set_query_arguments(self, leaves: int, reorder: int) -> None:
        """Probe ``leaves`` leaves and re-score ``reorder`` candidates from now on."""
        self.search_params = {"leaves": int(leaves), "reorder": int(reorder)}
        self.name = self._name(probe=int(leaves), reorder=int(reorder))
