"""The tuning sample: queries split into a tuning part and a held-out part, with exact truth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .measure import per_query_recall

__all__ = ["Truth", "TuningSample", "make_sample"]


@dataclass(frozen=True)
class Truth:
    """Exact answers for a set of queries.

    Attributes
    ----------
    ids : ndarray int64 (q, k)
        External ids of the true k nearest neighbours.
    kth : ndarray float (q,) or None
        True k-th distance (threshold recall, ties count); None when only ids were given
        (recall is then the overlap of id sets).
    """

    ids: np.ndarray
    kth: np.ndarray | None

    def recall(self, ids: np.ndarray, distances: np.ndarray) -> float:
        """Recall@k of search results against this truth."""
        return float(self.per_query(ids, distances).mean())

    def per_query(self, ids: np.ndarray, distances: np.ndarray) -> np.ndarray:
        """Recall@k of each query."""
        if self.kth is not None:
            return per_query_recall(distances, self.kth, ids)
        k = self.ids.shape[1]
        out = np.empty(ids.shape[0])
        for r in range(ids.shape[0]):
            out[r] = np.intersect1d(ids[r][ids[r] >= 0], self.ids[r]).size / k
        return out


@dataclass(frozen=True)
class TuningSample:
    """Tuning queries and held-out queries, with their truth.

    With ``self_ids`` (leave-one-out tuning on indexed vectors) each query is an indexed vector
    whose own id is removed from its truth and from its search results: statistically a fresh
    query of the data's distribution against the other vectors.
    """

    queries: np.ndarray
    truth: Truth
    held_out: np.ndarray | None
    held_out_truth: Truth | None
    self_ids: np.ndarray | None = None
    held_out_self_ids: np.ndarray | None = None

    def search(self, index: Any, k: int, params: dict[str, Any], held_out: bool = False):
        """``index.search`` of the tuning (or held-out) queries, each query's own id removed."""
        Q = self.held_out if held_out else self.queries
        own = self.held_out_self_ids if held_out else self.self_ids
        if own is None:
            return index.search(Q, k, **params)
        ids, dist = index.search(Q, min(k + 1, len(index)), **params)
        return drop_own(ids, dist, own, k)


def drop_own(ids: np.ndarray, dist: np.ndarray, own: np.ndarray, k: int):
    """Rows without each query's own id (the last column goes where it is absent)."""
    keep = ids != own[:, None]
    # where the own id is absent, drop the last column instead so every row keeps k entries
    absent = keep.all(axis=1)
    keep[absent, -1] = False
    if ids.shape[1] == k:  # k == len(index): nothing to drop beyond the own id
        keep[absent, -1] = True
    cols = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, cols, axis=1), np.take_along_axis(dist, cols, axis=1)


def make_sample(index: Any, Q: np.ndarray, k: int, ground_truth: Any, held_out: float,
                rng: np.random.Generator, self_ids: np.ndarray | None = None) -> TuningSample:
    """Split ``Q`` and attach exact truth (``index.exact_search`` unless ``ground_truth`` is given)."""
    nq = Q.shape[0]
    if ground_truth is None:
        if self_ids is None:
            res = index.exact_search(Q, k)
            truth_ids, truth_d = res.ids, res.distances
        else:
            res = index.exact_search(Q, min(k + 1, len(index)))
            truth_ids, truth_d = drop_own(res.ids, res.distances, self_ids, k)
        truth_kth = truth_d[:, k - 1].astype(np.float64)
    else:
        truth_ids, truth_kth = ground_truth
    order = rng.permutation(nq)
    n_held = int(round(held_out * nq)) if nq >= 20 else 0
    held, tune = np.sort(order[:n_held]), np.sort(order[n_held:])

    def part(rows):
        return Truth(truth_ids[rows, :k], None if truth_kth is None else truth_kth[rows])

    own = (None, None) if self_ids is None else (self_ids[tune], self_ids[held] if n_held else None)
    return TuningSample(Q[tune], part(tune), Q[held] if n_held else None, part(held) if n_held else None,
                        own[0], own[1])
