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
    """Tuning queries and held-out queries (prepared float32), with their truth."""

    queries: np.ndarray
    truth: Truth
    held_out: np.ndarray | None
    held_out_truth: Truth | None


def make_sample(index: Any, Q: np.ndarray, k: int, ground_truth: Any, held_out: float,
                rng: np.random.Generator) -> TuningSample:
    """Split ``Q`` and attach exact truth (``index.exact_search`` unless ``ground_truth`` is given)."""
    nq = Q.shape[0]
    if ground_truth is None:
        res = index.exact_search(Q, k)
        truth_ids, truth_kth = res.ids, res.distances[:, k - 1].astype(np.float64)
    else:
        truth_ids, truth_kth = ground_truth
    order = rng.permutation(nq)
    n_held = int(round(held_out * nq)) if nq >= 20 else 0
    held, tune = np.sort(order[:n_held]), np.sort(order[n_held:])

    def part(rows):
        return Truth(truth_ids[rows, :k], None if truth_kth is None else truth_kth[rows])

    return TuningSample(Q[tune], part(tune), Q[held] if n_held else None, part(held) if n_held else None)
