"""Exact search: blocked matrix multiplication fused with a running top-k.

The ground truth for every test and the baseline every family is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._progress import progress_reporter
from .._state import check_array, check_finite, check_range, require, take_array
from ..api import Index
from ..config import get_num_threads
from ..kernels.blockwise import exact_search
from ..kernels.distances import sqnorms
from ..metrics import Metric

__all__ = ["BruteForce", "BruteForceState"]


@dataclass
class BruteForceState:
    """Everything a built :class:`BruteForce` holds.

    Attributes
    ----------
    vectors : float32 (n, d), C-contiguous
        The metric-prepared vectors (unit rows for cosine), owned by the index.
    sqnorms : float32 (n,)
        Their squared norms (the norm expansion of squared L2 reads them).
    """

    vectors: np.ndarray
    sqnorms: np.ndarray

    @classmethod
    def of(cls, X: np.ndarray) -> "BruteForceState":
        """The state holding ``X`` (kept, not copied: the caller hands over an owned array)."""
        return cls(X, sqnorms(X))

    def appended(self, X: np.ndarray) -> "BruteForceState":
        """A new state with the rows of ``X`` appended (this one is left as it is)."""
        return BruteForceState(np.concatenate([self.vectors, X]), np.concatenate([self.sqnorms, sqnorms(X)]))

    def to_file(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(metadata, arrays) for :func:`annlib.io.write_index_file`."""
        return {}, {"vectors": self.vectors, "sqnorms": self.sqnorms}

    @classmethod
    def from_file(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "BruteForceState":
        """Read the state back (types only; :meth:`validate` checks the invariants).

        Raises
        ------
        IndexFormatError
            A missing array, or one of the wrong dtype or rank.
        """
        return cls(take_array(arrays, "vectors", np.float32, 2), take_array(arrays, "sqnorms", np.float32, 1))

    def validate(self, dim: int, n_positions: int, metric: Metric) -> None:
        """Check every invariant the kernels rely on; run on every load.

        Raises
        ------
        IndexFormatError
            Names the field: shapes that disagree with ``dim``/``n_positions``, NaN/inf,
            entries beyond the metric's float32 range, norms that are not the vectors' norms,
            or (cosine) rows that are not unit vectors.
        """
        validate_vectors(self.vectors, self.sqnorms, dim, n_positions, metric)


def validate_vectors(vectors: np.ndarray, norms: np.ndarray, dim: int, n: int, metric: Metric) -> None:
    """Checks shared by every state made of prepared vectors and their squared norms."""
    check_array(vectors, "vectors", np.float32, (n, dim))
    check_array(norms, "sqnorms", np.float32, (n,))
    check_finite(vectors, "vectors")
    limit = metric.max_abs(dim)
    if np.isfinite(limit):  # larger entries make the float32 distances overflow
        check_range(vectors, "vectors", -limit, limit)
    check_finite(norms, "sqnorms")
    # Stale or altered norms would silently mis-rank every squared-L2 search; recomputing them
    # is one pass over the vectors, like the finiteness check.
    fresh = sqnorms(vectors)
    if n:
        worst = int(np.argmax(np.abs(norms - fresh) - 1e-3 * fresh))
        require(abs(float(norms[worst]) - float(fresh[worst])) <= 1e-3 * float(fresh[worst]) + 1e-30,
                "sqnorms", f"entry {worst} is {float(norms[worst]):.6g} but the vector's squared norm "
                           f"is {float(fresh[worst]):.6g}")
        if metric.normalize:
            bad = (np.abs(fresh - 1.0) > 1e-3) & (fresh > 1e-6)
            require(not bad.any(), "vectors",
                    f"row {int(np.argmax(bad)) if bad.any() else 0} of a cosine index is not a unit vector")


class BruteForce(Index):
    """Exact k-NN by blocked float32 GEMM and a numba top-k (like faiss ``IndexFlat``).

    Parameters
    ----------
    metric : {"l2", "cosine", "ip"}, default "l2"

    Notes
    -----
    No build or search parameters. Supports ``add``, ``filter=``, ids, save/load (mmap).
    Memory: the vectors (4·n·d bytes) plus their squared norms (4·n bytes). The index keeps its
    own copy of the vectors: changing the array given to ``build`` or ``add`` afterwards does
    not change it, and read-only arrays (also ``np.memmap``) are accepted.
    Returned distances are recomputed directly from the vectors for the k survivors, so they are
    free of the cancellation error of the norm expansion used for ranking.
    Concurrency: searches run together; ``add`` waits for them and they for it.

    Examples
    --------
    >>> import numpy as np, annlib
    >>> X = np.random.default_rng(0).normal(size=(1000, 16)).astype("float32")
    >>> ids, dist = annlib.BruteForce.build(X).search(X[:3], k=5)
    >>> ids[:, 0].tolist()
    [0, 1, 2]
    """

    family = "bruteforce"
    supports_add = True

    def __init__(self, metric: str = "l2", **params: Any):
        super().__init__(metric=metric, **params)
        self._st: BruteForceState | None = None

    def _build(self, X: np.ndarray, progress: Any) -> None:
        with progress_reporter(progress, X.shape[0], desc="BruteForce build", unit="vec") as report:
            st = BruteForceState.of(X)
            report(X.shape[0])
        self._st = st

    def _add(self, X: np.ndarray, progress: Any) -> None:
        # The new state is complete before it replaces the old one: a failure changes nothing.
        with progress_reporter(progress, X.shape[0], desc="BruteForce add", unit="vec") as report:
            st = self._st.appended(X)
            report(X.shape[0])
        self._st = st

    def _search(self, Q: np.ndarray, k: int, mask: np.ndarray | None, **params: Any):
        st = self._st
        return exact_search(Q, st.vectors, st.sqnorms, k, self._metric.proxy, mask,
                            workers=get_num_threads())

    def _vectors_at(self, positions: np.ndarray) -> np.ndarray:
        return self._st.vectors[positions]

    def _exact_over(self, Q: np.ndarray, k: int, rows: np.ndarray):
        if rows.size == self._n_positions:  # every row: scan the stored arrays, no gathered copy
            return self._search(Q, k, None)
        return super()._exact_over(Q, k, rows)

    def _state(self):
        return self._st.to_file()

    def _restore(self, meta, arrays) -> None:
        st = BruteForceState.from_file(meta, arrays)
        st.validate(self._dim, self._n_positions, self._metric)
        self._st = st

    @classmethod
    def _search_space(cls, n, dim):
        return {"build": {}, "search": {}}
