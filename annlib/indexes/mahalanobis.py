"""Mahalanobis distance sketches: approximate distance estimation with online metric and point updates.

``d_M(q, x) = sqrt((q - x)^T M (q - x)) = ||U (q - x)||`` with ``M = U^T U`` positive
semi-definite. ``L`` independent Gaussian projections ``Pi_j`` (``m x p``) give per copy the map
``P_j = Pi_j U`` and the stored sketches ``s_{j,i} = P_j x_i``; a query is estimated against every
point by the median over ``R`` copies chosen per query (docs/mahalanobis.md). Because every stored
quantity is linear in ``U`` and in the points, point and low-rank metric changes are applied to
the sketches directly, far cheaper than re-transforming the data.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _validation as V
from .. import config
from .._progress import progress_reporter
from .._state import (
    bad_field, check_array, check_finite, check_range, require, take_array, take_meta,
)
from ..api import Index
from ..kernels.jl import MAX_SKETCH, choose_copies, gaussian_columns, query_keys, sketch_size
from ..kernels.sketch import (
    Sketches, gram_update, matvec64, median_estimate, median_search, median_search_one, one_query_table,
    outer_update, quadform_rows, quadratic_forms, rank_update, row_combinations, sketch_points,
    sqnorm_update,
)
from ..kernels.blockwise import ONE_QUERY_SERIAL_WORK
from ..kernels.topk import topk_rows
from ..metrics import ALIASES, METRICS

__all__ = ["MahalanobisSketch", "SketchState", "QUADFORM_LIMIT", "SKETCH_SCALE"]

_F32 = np.dtype(np.float32)  # dtype objects: np.empty takes them without a lookup
_I64 = np.dtype(np.int64)

_SUPPORTED = ["mahalanobis", "l2", "euclidean"]
_NO_MASK = np.zeros(0, dtype=np.bool_)
_EIG_RANK_TOL = 1e-10  # eigenvalues below this fraction of the largest are dropped from the factor

# Largest ``x^T M x`` (squared Mahalanobis norm) of a stored point or a query, ~4.3e37: the bound
# the base puts on ``||x||^2`` for l2 (every entry at most sqrt(FLT_MAX / 8d)), so an identity
# index accepts exactly what BruteForce accepts. Exact distances are float64 and at most
# 4 * QUADFORM_LIMIT < FLT_MAX when returned as float32.
QUADFORM_LIMIT = float(np.finfo(np.float32).max) / 8.0
# The sketches are float32 and a score is ``||z||^2 + ||s||^2 - 2<z, s>``, up to (|z| + |s|)^2. A
# sketch's squared norm is the point's times a chi-square(m)/m factor (rarely above 4, and above
# 128 with probability < 1e-25 even at m = 1), so the maps carry this exact power-of-two factor:
# with 1/64 on every squared sketch quantity no term, sum or GEMM entry can overflow. Estimates
# are scaled back on output; rankings do not depend on it.
SKETCH_SCALE = 0.125
_FLOAT32_SAFE = float(np.finfo(np.float32).max) / 16.0  # sketch maps and norms stay below this


def _factor_from_psd(M: Any) -> tuple[np.ndarray, np.ndarray]:
    """(M, U) with ``U^T U = M``: eigen-factor, rows for the non-negligible eigenvalues, largest first."""
    M, w, vecs = V.check_psd_matrix("M", M)
    keep = w > _EIG_RANK_TOL * w[-1]
    U = (np.sqrt(w[keep])[:, None] * vecs[:, keep].T)[::-1]
    return M, np.ascontiguousarray(U)


def _writable(arr: np.ndarray) -> np.ndarray:
    """``arr`` itself, or a private copy when it is read-only (a memory-mapped load)."""
    return arr if arr.flags.writeable else np.array(arr)


@dataclass
class SketchState:
    """Everything a built :class:`MahalanobisSketch` holds (layout of :mod:`annlib.kernels.sketch`).

    ``L`` copies of ``m`` rows, ``e`` rows of room for deferred metric updates, ``n`` positions
    (deleted ones included), dimension ``d``, ``p`` factor rows.

    Attributes
    ----------
    vectors : float32 (n, d)
        The points as given (exact re-ranking and metric updates read them).
    sketches : float32 (L, m + e, n)
        Per copy the sketches ``P_j x_i`` as columns; rows ``m .. m + pending`` hold the
        coefficients of the deferred metric updates.
    sketch_sqnorms : float32 (L, n)
        Current squared norms of the sketches (deferred updates included).
    maps : float32 (L, m, d)
        The sketch maps ``P_j = SKETCH_SCALE * Pi_j U`` (deferred updates already applied); every
        sketch quantity carries the factor, so estimates are divided by it on output.
    factor : float64 (p, d)
        ``U`` with ``M = U^T U``.
    matrix : float64 (d, d)
        ``M``.
    quadforms : float64 (n,)
        ``x_i^T M x_i`` (the exact distances are expanded around them).
    deleted : bool (n,)
        Deleted positions.
    pending_columns : float32 (L, m, e)
        Projection columns ``g_{j,t}`` of the deferred updates (the first ``pending`` are in use).
    pending : int
        Deferred updates held, ``0 <= pending <= e``.
    deleted_count : int
        ``deleted.sum()``, kept so ``len(index)`` costs nothing.
    identity : bool
        ``U = M = I``: the exact path skips the matrix.
    mahalanobis : bool
        The public metric name is ``"mahalanobis"`` (False: ``"l2"``, which implies ``identity``).
    """

    vectors: np.ndarray
    sketches: np.ndarray
    sketch_sqnorms: np.ndarray
    maps: np.ndarray
    factor: np.ndarray
    matrix: np.ndarray
    quadforms: np.ndarray
    deleted: np.ndarray
    pending_columns: np.ndarray
    pending: int
    deleted_count: int
    identity: bool
    mahalanobis: bool

    # ------------------------------------------------------------------ derived views
    @property
    def sketch_rows(self) -> int:
        """``m``, rows per sketch copy."""
        return self.maps.shape[1]

    @property
    def extra_rows(self) -> int:
        """``e``, rows of room for deferred-update coefficients."""
        return self.sketches.shape[1] - self.maps.shape[1]

    @functools.cached_property
    def kernel_view(self) -> Sketches:
        """The arrays the scoring kernels read (made once per state object, not per query)."""
        return Sketches(self.maps, self.sketches, self.sketch_sqnorms,
                        self.pending_columns[:, :, :self.pending])

    @functools.cached_property
    def live(self) -> np.ndarray | None:
        """Boolean mask of live positions, or None when nothing is deleted."""
        return ~self.deleted if self.deleted_count else None

    @functools.cached_property
    def matrix_bound(self) -> float:
        """An upper bound of ``M``'s largest eigenvalue (largest absolute row sum, Gershgorin)."""
        return 1.0 if self.identity else float(np.abs(self.matrix).sum(axis=1).max())

    def current_sketches(self) -> np.ndarray:
        """The sketches (L, m, n) with the deferred updates applied (a copy; for checks)."""
        m, r = self.sketch_rows, self.pending
        S = np.array(self.sketches[:, :m], dtype=np.float32)
        if r:
            S += np.einsum("jat,tn->jan", self.pending_columns[:, :, :r], self.sketches[0, m:m + r])
        return S

    def replace(self, **changes: Any) -> "SketchState":
        """A new state with ``changes`` (the derived views are made afresh)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ persistence
    _ARRAYS = ("vectors", "sketches", "sketch_sqnorms", "maps", "factor", "matrix", "quadforms",
               "deleted", "pending_columns")

    def to_file(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(metadata, arrays) for :func:`annlib.io.write_index_file`."""
        meta = {"sketch_rows": int(self.sketch_rows), "sketch_scale": SKETCH_SCALE, "pending": int(self.pending),
                "deleted_count": int(self.deleted_count), "identity": bool(self.identity),
                "mahalanobis": bool(self.mahalanobis)}
        return meta, {name: getattr(self, name) for name in self._ARRAYS}

    @classmethod
    def from_file(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "SketchState":
        """Read the state back (types only; :meth:`validate` checks the invariants).

        Raises
        ------
        IndexFormatError
            A missing field, or one of the wrong dtype, rank or type.
        """
        st = cls(
            vectors=take_array(arrays, "vectors", np.float32, 2),
            sketches=take_array(arrays, "sketches", np.float32, 3),
            sketch_sqnorms=take_array(arrays, "sketch_sqnorms", np.float32, 2),
            maps=take_array(arrays, "maps", np.float32, 3),
            factor=take_array(arrays, "factor", np.float64, 2),
            matrix=take_array(arrays, "matrix", np.float64, 2),
            quadforms=take_array(arrays, "quadforms", np.float64, 1),
            deleted=take_array(arrays, "deleted", np.bool_, 1),
            pending_columns=take_array(arrays, "pending_columns", np.float32, 3),
            pending=take_meta(meta, "pending", int),
            deleted_count=take_meta(meta, "deleted_count", int),
            identity=take_meta(meta, "identity", bool),
            mahalanobis=take_meta(meta, "mahalanobis", bool),
        )
        m = take_meta(meta, "sketch_rows", int)
        require(m == st.maps.shape[1], "sketch_rows",
                f"is {m} but the maps have {st.maps.shape[1]} rows per copy")
        scale = take_meta(meta, "sketch_scale", float)
        require(scale == SKETCH_SCALE, "sketch_scale",
                f"is {scale}; this version stores sketches scaled by {SKETCH_SCALE}")
        return st

    def validate(self, dim: int, n_positions: int, *, copies: int, deferred: int) -> None:
        """Check every invariant the kernels rely on; run on every load.

        Parameters
        ----------
        dim, n_positions : int
            From the file header.
        copies, deferred : int
            The index's build parameters ``L`` and ``e``.

        Raises
        ------
        IndexFormatError
            Names the first field that breaks an invariant: a shape that disagrees with
            ``dim``, ``n_positions``, ``copies``, ``deferred`` or the other arrays, a counter out
            of range, NaN/inf, a metric that is not ``U^T U``, or magnitudes that would overflow.
        """
        n, d, L = n_positions, dim, copies
        m = self.sketch_rows
        require(1 <= m <= MAX_SKETCH, "maps", f"rows per copy must be in [1, {MAX_SKETCH}]; got {m}")
        check_array(self.vectors, "vectors", np.float32, (n, d))
        check_array(self.maps, "maps", np.float32, (L, m, d))
        check_array(self.sketches, "sketches", np.float32, (L, m + deferred, n))
        check_array(self.sketch_sqnorms, "sketch_sqnorms", np.float32, (L, n))
        check_array(self.pending_columns, "pending_columns", np.float32, (L, m, deferred))
        check_array(self.factor, "factor", np.float64, (None, d))
        require(self.factor.shape[0] >= 1, "factor", "needs at least one row")
        check_array(self.matrix, "matrix", np.float64, (d, d))
        check_array(self.quadforms, "quadforms", np.float64, (n,))
        check_array(self.deleted, "deleted", np.bool_, (n,))
        # A bool array read from a file may hold bytes other than 0 and 1.
        check_range(self.deleted.view(np.uint8), "deleted", 0, 1)
        require(0 <= self.pending <= deferred, "pending",
                f"must be in [0, {deferred}] (the room for deferred updates); got {self.pending}")
        count = int(np.count_nonzero(self.deleted))
        require(self.deleted_count == count, "deleted_count",
                f"is {self.deleted_count} but {count} positions are marked deleted")
        require(self.identity or self.mahalanobis, "mahalanobis",
                "an index named 'l2' must have the identity metric")
        for name in ("vectors", "sketches", "sketch_sqnorms", "maps", "factor", "matrix", "quadforms",
                     "pending_columns"):
            check_finite(getattr(self, name), name)
        limit = METRICS["l2"].max_abs(d)
        check_range(self.vectors, "vectors", -limit, limit)
        # x^T M x >= 0 up to the rounding of incremental updates; a large negative value would
        # turn exact distances into noise.
        top = float(np.abs(self.quadforms).max()) if n else 0.0
        check_range(self.quadforms, "quadforms", -1e-6 * top - 1e-30, QUADFORM_LIMIT)
        check_range(self.sketch_sqnorms, "sketch_sqnorms", -_FLOAT32_SAFE, _FLOAT32_SAFE)
        check_range(self.maps, "maps", -_FLOAT32_SAFE, _FLOAT32_SAFE)
        if self.identity:
            eye = np.eye(d)
            require(self.factor.shape == (d, d) and np.array_equal(self.factor, eye), "factor",
                    "an identity index must store the identity factor")
            require(np.array_equal(self.matrix, eye), "matrix", "an identity index must store the identity matrix")
        else:
            # M = U^T U is what both the sketches (through P = Pi U) and the exact path measure. A
            # given M keeps eigenvalues the factor drops (down to -1e-6 of the largest, the
            # tolerance of the PSD check), so entries may differ by 1e-6 of the largest
            # eigenvalue, which is at most d times the largest entry.
            gram = self.factor.T @ self.factor
            scale = max(float(np.abs(gram).max()), float(np.abs(self.matrix).max()), 1e-300)
            require(float(np.abs(gram - self.matrix).max()) <= (2e-6 * d + 1e-9) * scale, "matrix",
                    "is not factor^T factor (the metric and its factor disagree)")


class MahalanobisSketch(Index):
    """Approximate Mahalanobis distances and k-NN from median-of-copies JL sketches, with updates.

    Parameters
    ----------
    metric : {"mahalanobis", "l2"}, default "mahalanobis"
        ``"l2"`` (alias ``"euclidean"``) with neither ``M`` nor ``U`` means ``M = I``; given ``M`` or
        ``U`` the metric is ``"mahalanobis"`` whatever is passed here (``Index.build`` passes
        ``"l2"`` by default). Cosine and inner product are refused.
    M : array-like (d, d), optional
        Symmetric positive semi-definite matrix (asymmetry or negative eigenvalues beyond 1e-6 of
        the largest are refused). Factored once by eigendecomposition into ``U`` with
        ``rank(M)`` rows. Give ``M`` or ``U``, not both; neither means the identity. Copied: later
        changes to the caller's array do not reach the index.
    U : array-like (p, d), optional
        A factor with ``M = U^T U`` (any ``p``); used as given (copied), so
        ``update_metric(row=...)`` addresses its rows.
    eps : float, default 0.1
        Target relative error of an estimated distance, in (0, 1). Smaller ``eps`` means larger
        sketches: ``m`` grows as ``1/eps^2``, and query time and memory with it.
    delta : float, default 0.05
        Allowed probability that one estimated distance misses ``(1 +- eps)``, in (0, 1). For all
        ``n`` distances of a query at once pass ``delta / n`` (``m`` grows with ``log(n/delta)``).
    m : int, optional
        Rows per sketch copy; default the smallest ``m`` for which the median of ``votes`` copies
        misses ``(1 +- eps)`` with probability at most ``0.8 * delta`` (chi-square law of Gaussian
        sketches, :func:`annlib.kernels.jl.sketch_size`; the headroom keeps a measured fraction
        within ``eps`` at or above ``1 - delta``): 96 for the defaults, 211 with ``votes=1``.
        Overrides ``eps`` and ``delta``.
    copies : int, default 16
        Independent sketch copies ``L`` stored. Memory and build time grow linearly; more copies
        make it harder for an adaptive sequence of queries to find directions every copy
        underestimates (the theory asks for ``L`` of order ``rank(M)``; see the user guide).
    votes : int, default 3
        Copies ``R`` combined by the median for each query (odd, ``<= copies``), chosen per query by
        a keyed hash of the query. Query time grows linearly in ``R``; ``R = 1`` is fastest but
        gives no robustness to adaptively chosen queries.
    deferred : int, default 8
        Rank of metric updates held back before they are swept into the stored sketches. A
        deferred update costs one pass over the points instead of a read and write of every
        sketch entry; queries pay for it with ``r/m`` more work (``r <= deferred`` pending) and
        memory grows by ``deferred/m`` of the sketches. 0 applies every update at once.
    random_state : None, int or numpy Generator, default None
        Seed of the projections and of the per-query copy choice (the common seed policy of
        :class:`~annlib.Index`: resolved to an int at construction and saved with the index).

    Search parameters
    -----------------
    reorder : int, default 100
        Candidates (by estimated distance) re-ranked with exact Mahalanobis distances;
        ``max(reorder, k)`` are used. Larger is slower and more accurate.

    Raises
    ------
    ValueError
        Bad ``M``/``U`` or parameters (at construction); vectors or queries whose squared
        Mahalanobis norm ``x^T M x`` exceeds :data:`QUADFORM_LIMIT` (about 4.3e37, the bound the
        base puts on ``||x||^2``, so the identity metric accepts what BruteForce does), and metrics so
        large that the float32 sketch maps overflow (at build, add, search and updates): the
        float32 sketches could not represent them.

    Notes
    -----
    Costs (``n`` points, dimension ``d``, factor rows ``p``, ``L`` copies of ``m`` rows, ``R``
    votes, ``e`` = ``deferred``): build ``O(n·L·m·d + n·d^2)``; memory ``4·n·(d + L·(m + e + 1))``
    bytes plus ``P``, ``U``, ``M``; ``estimate`` ``O(R·m·(d + n))`` per query (``R·(m + r)·n``
    with ``r`` updates pending); ``search`` that plus ``O(d^2 + reorder·d)``.
    Returned ``search`` distances are exact (float64 quadratic form on the raw points).
    Supports ``add``, ``delete``, ``filter=``, ids, save/load (mmap; an update then copies the
    mapped arrays), :meth:`estimate`, :meth:`exact_distances`, :meth:`update_point`,
    :meth:`update_metric`.

    Concurrency: every public method holds the index's reader-writer lock (``estimate`` and
    ``exact_distances`` as readers, ``update_point`` and ``update_metric`` as writers), so they
    may be called from several threads together with ``search``, ``add`` and ``delete``.

    Examples
    --------
    >>> import numpy as np, annlib
    >>> g = np.random.default_rng(0)
    >>> X = g.normal(size=(2000, 32)).astype("float32")
    >>> A = g.normal(size=(32, 32)); M = A @ A.T
    >>> index = annlib.Index.build(X, method="mahalanobis", M=M, random_state=0)
    >>> ids, dist = index.search(X[:3], k=5)
    >>> ids[:, 0].tolist()
    [0, 1, 2]
    >>> est = index.estimate(X[0])          # (1 +- eps) estimates to all 2,000 points
    >>> index.update_metric(g.normal(size=32))   # M <- M + u u^T, O(n·(d + L·m))
    """

    family = "mahalanobis"
    build_defaults = {"eps": 0.1, "delta": 0.05, "m": None, "copies": 16, "votes": 3, "deferred": 8,
                      "random_state": None}
    search_defaults = {"reorder": 100}
    supports_add = True
    supports_delete = True
    # the search kernels: uncached means the first searches compile (annlib.CompilationNotice)
    first_kernels = ("annlib.kernels.sketch:median_search_one", "annlib.kernels.sketch:fold_median_block")

    def __init__(self, metric: str = "mahalanobis", *, M: Any = None, U: Any = None, **params: Any):
        known = list(METRICS) + list(ALIASES) + ["mahalanobis"]
        V.check_supported_metric(type(self).__name__, metric, _SUPPORTED, known)
        V.check_exclusive(M=M, U=U)
        if M is not None:
            M64, U64 = _factor_from_psd(M)
        elif U is not None:
            # check_matrix may hand back the caller's own float64 array: the index keeps a copy.
            U64 = np.array(V.check_matrix("U", U, nonzero=True), dtype=np.float64, order="C")
            M64 = U64.T @ U64
            if not np.isfinite(M64).all():
                raise V.sketch_maps_overflow("U")
        else:
            M64 = U64 = None
        # The kernels score squared Euclidean distances of transformed vectors: the base metric is l2.
        super().__init__(metric="l2", **params)
        self._given_mahalanobis = U64 is not None or metric == "mahalanobis"
        self._given_name = "M" if M is not None else "U"
        self._given_factor, self._given_matrix = U64, M64  # None: the identity
        self._st: SketchState | None = None
        # The copy choice is keyed by the seed; derive the key once, not per query.
        self._query_key = query_keys(self.params["random_state"])
        self._one_plan: tuple = (None, None)  # what the one-query kernel reads of the current state

    # ----------------------------------------------------------------- parameters
    def _check_build_params(self, params: dict[str, Any]) -> dict[str, Any]:
        p = dict(params)
        p["eps"] = V.check_float("eps", p["eps"], 0.0, 1.0, low_open=True, high_open=True)
        p["delta"] = V.check_float("delta", p["delta"], 0.0, 1.0, low_open=True, high_open=True)
        if p["m"] is not None:
            p["m"] = V.check_int("m", p["m"], 1, MAX_SKETCH)
        p["copies"] = V.check_int("copies", p["copies"], 1, 4096)
        p["votes"] = V.check_odd_int("votes", p["votes"], 1, p["copies"])
        p["deferred"] = V.check_int("deferred", p["deferred"], 0, 1024)
        return p

    def _check_search_params(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"reorder": V.check_int("reorder", params["reorder"], 1)}

    @classmethod
    def _search_space(cls, n, dim):
        values = [10, 20, 50, 100, 200, 500, 1000, 2000]
        if n is not None:
            values = [v for v in values if v < n] + [n] if n <= values[-1] else values
        return {"build": {}, "search": {"reorder": values}}

    # ----------------------------------------------------------------- properties
    @property
    def metric(self) -> str:
        """``"mahalanobis"``, or ``"l2"`` for an index built without ``M``/``U`` under that name."""
        st = self._st
        mahalanobis = self._given_mahalanobis if st is None else st.mahalanobis
        return "mahalanobis" if mahalanobis else "l2"

    @property
    def M(self) -> np.ndarray | None:
        """The current metric matrix (float64 copy; None before build of an identity index)."""
        with self._rw.read():
            M = self._given_matrix if self._st is None else self._st.matrix
            return None if M is None else np.array(M)

    @property
    def U(self) -> np.ndarray | None:
        """The current factor ``U`` with ``M = U^T U`` (float64 copy); rebuild with ``U=index.U``."""
        with self._rw.read():
            U = self._given_factor if self._st is None else self._st.factor
            return None if U is None else np.array(U)

    @property
    def sketch_size(self) -> int | None:
        """Rows ``m`` per sketch copy (None before build)."""
        return None if self._st is None else self._st.sketch_rows

    @property
    def seed(self) -> int:
        """The seed in use (``params["random_state"]``, drawn at construction when None was given)."""
        return self.params["random_state"]

    def _live_count(self) -> int:
        return self._n_positions - (0 if self._st is None else self._st.deleted_count)

    def _live_mask(self) -> np.ndarray | None:
        return self._st.live

    def _is_deleted(self, positions: np.ndarray) -> np.ndarray:
        return self._st.deleted[positions]

    # ----------------------------------------------------------------- magnitudes
    def _check_forms(self, forms: np.ndarray, what: str, rows: np.ndarray | None = None) -> None:
        """Refuse squared Mahalanobis norms above :data:`QUADFORM_LIMIT` (``what`` names the rows)."""
        if forms.size and not float(forms.max()) <= QUADFORM_LIMIT:
            bad = int(np.flatnonzero(~(forms <= QUADFORM_LIMIT))[0])
            label = f"{what} {bad if rows is None else int(rows[bad])}"
            raise V.quadratic_form_too_large(label, float(forms[bad]), QUADFORM_LIMIT)

    def _check_queries_fit(self, Q: np.ndarray, st: SketchState) -> None:
        """The query rows' ``q^T M q`` within the limit: a free bound first, exact forms if needed."""
        sq = np.einsum("ij,ij->i", Q, Q, dtype=np.float64)
        if float(sq.max()) * st.matrix_bound <= QUADFORM_LIMIT:
            return
        self._check_forms(quadratic_forms(Q, None if st.identity else st.matrix), "Q row")

    def _query_forms(self, Q: np.ndarray, st: SketchState) -> tuple[np.ndarray, np.ndarray]:
        """``M q`` and ``q^T M q`` per query (float64), refusing queries that would overflow."""
        Q64 = Q.astype(np.float64)
        MQ = Q64 if st.identity else Q64 @ st.matrix
        qmq = np.einsum("ij,ij->i", MQ, Q64)
        self._check_forms(qmq, "Q row")
        return MQ, qmq

    # ----------------------------------------------------------------- build and search hooks
    def _metric_for(self, d: int) -> tuple[np.ndarray, np.ndarray, bool, bool]:
        """(U, M, identity, mahalanobis) a build uses: the current metric (updates included)."""
        st = self._st
        if st is not None and not st.identity:
            U, M, name = st.factor, st.matrix, "U"
        elif st is None and self._given_factor is not None:
            U, M, name = self._given_factor, self._given_matrix, self._given_name
        else:
            return np.eye(d), np.eye(d), True, (self._given_mahalanobis if st is None else st.mahalanobis)
        V.check_metric_dim(name, U.shape[1], d, "X")
        return U, M, False, True

    def _build(self, X: np.ndarray, progress: Any) -> None:
        # X is the index's own copy (the base made it); update_point writes into it later.
        n, d = X.shape
        p = self.params
        U, M, identity, mahalanobis = self._metric_for(d)
        xmx = quadratic_forms(X, None if identity else M, threads=config.get_num_threads())
        self._check_forms(xmx, "X row")
        m = p["m"] if p["m"] is not None else sketch_size(p["eps"], p["delta"], p["votes"])
        L = p["copies"]
        Pi = gaussian_columns(p["random_state"], np.arange(U.shape[0]), L, m)
        P64 = (Pi.reshape(-1, U.shape[0]) @ (SKETCH_SCALE * U)).reshape(L, m, d)
        if not float(np.abs(P64).max()) <= _FLOAT32_SAFE:
            raise V.sketch_maps_overflow(self._given_name)
        P = np.ascontiguousarray(P64, dtype=np.float32)
        with progress_reporter(progress, L, desc="sketching", unit="copy") as report:
            S, sn = sketch_points(X, P, report, extra=p["deferred"], threads=config.get_num_threads())
        self._st = SketchState(
            vectors=X, sketches=S, sketch_sqnorms=sn, maps=P, factor=np.array(U), matrix=np.array(M),
            quadforms=xmx, deleted=np.zeros(n, dtype=np.bool_),
            pending_columns=np.zeros((L, m, p["deferred"]), dtype=np.float32), pending=0,
            deleted_count=0, identity=identity, mahalanobis=mahalanobis,
        )

    def _allowed(self, mask: np.ndarray | None, st: SketchState) -> np.ndarray | None:
        live = st.live
        if live is None:
            return mask
        return live if mask is None else live & mask

    def _select(self, Q: np.ndarray) -> np.ndarray:
        return choose_copies(Q, self._query_key, self.params["copies"], self.params["votes"])

    def _search(self, Q: np.ndarray, k: int, mask: np.ndarray | None, reorder: int):
        st = self._st
        MQ, qmq = self._query_forms(Q, st)
        c = min(max(reorder, k), self._n_positions)
        _, cand = median_search(Q, st.kernel_view, self._select(Q), c, self._allowed(mask, st),
                                threads=config.get_num_threads())
        exact = quadform_rows(MQ, qmq, st.vectors, st.quadforms, cand).astype(np.float32)
        return topk_rows(exact, k, cand)

    def _search_one(self, q, k, params, threads):
        plan = self._one_plan
        st = self._st
        if plan[0] is not st or plan[1] is not self._ids:  # made again after every change
            table = one_query_table(st.kernel_view, st.vectors, st.quadforms, None if st.identity else st.matrix,
                                    st.deleted if st.deleted_count else None, self._ids_array(), self._query_key,
                                    self.params["votes"], QUADFORM_LIMIT, self._one_query_terms()[0])
            n = self._n_positions
            plan = self._one_plan = (st, self._ids, table, table.words, n, n - st.deleted_count,
                                     self.params["votes"] * st.sketches.shape[1] * n > ONE_QUERY_SERIAL_WORK)
        n, n_live = plan[4], plan[5]
        if type(k) is not int or not 0 < k <= n_live:
            return None
        if n_live < n and self._scan_is_cheaper(n_live, k, params):
            return None  # the ordinary path scores the few live points exactly
        if plan[6] and (threads or config.get_num_threads()) > 1:
            return None  # a long pass: the ordinary path's products use the threads
        out_d = np.empty(k, _F32)
        out_i = np.empty(k, _I64)
        if median_search_one(q, plan[3], min(max(params["reorder"], k), n), k, _NO_MASK, out_d, out_i):
            return None
        return out_i, out_d

    def _scan_is_cheaper(self, n_allowed: int, k: int, params: dict[str, Any]) -> bool:
        # When every allowed point fits in the candidate list the sketch pass would only hand
        # them all to the exact re-ranking: score them exactly at once (same answer, no pass).
        return n_allowed <= max(params["reorder"], k)

    def _exact_over(self, Q: np.ndarray, k: int, rows: np.ndarray):
        """Exact squared Mahalanobis top-``k`` of ``Q`` among the positions ``rows``."""
        st = self._st
        nq = Q.shape[0]
        out_d = np.full((nq, k), np.inf, np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        if rows.size == 0:
            return out_d, out_i
        MQ, qmq = self._query_forms(Q, st)
        kk = min(k, rows.size)
        step = max(1, (1 << 22) // rows.size)  # bounds the (queries x rows) float64 block
        for a in range(0, nq, step):
            b = min(nq, a + step)
            cols = np.ascontiguousarray(np.broadcast_to(rows, (b - a, rows.size)))
            sq = quadform_rows(MQ[a:b], qmq[a:b], st.vectors, st.quadforms, cols).astype(np.float32)
            out_d[a:b, :kk], out_i[a:b, :kk] = topk_rows(sq, kk, cols)
        return out_d, out_i

    # ----------------------------------------------------------------- estimation
    def _queries(self, Q: Any) -> tuple[np.ndarray, bool]:
        self._require_built()
        Q32, was_1d = V.as_vectors(Q, "Q", allow_1d=True, limit=self._metric.max_abs)
        V.check_dim(Q32.shape[1], self._dim)
        return Q32, was_1d

    def _columns(self, ids: Any, st: SketchState) -> np.ndarray | None:
        """Positions of the live ids ``ids`` (None: every position)."""
        if ids is None:
            return None
        arr = V.check_id_list(ids, "ids")
        pos = self._positions_of(arr)
        V.check_known_positions(arr, pos, st.deleted)
        return pos

    def estimate(self, Q: Any, ids: Any = None, *, threads: int | None = None) -> np.ndarray:
        """(1 +- eps)-approximate Mahalanobis distances from each query to the stored points.

        Each query uses ``votes`` of the ``copies`` sketches, chosen by a keyed hash of the query,
        and reports the median of their estimates (robust to adaptively chosen queries).

        Parameters
        ----------
        Q : array-like (q, d) or (d,)
        ids : array-like of int, optional
            External ids to estimate; default every position (in insertion order).
        threads : int, optional

        Returns
        -------
        ndarray float32 (q, n_positions) or (q, len(ids)); 1-D for a 1-D query
            Deleted positions are +inf.

        Raises
        ------
        TypeError, ValueError
            Bad queries, dimension mismatch, an id not in the index, or a query whose
            ``q^T M q`` exceeds :data:`QUADFORM_LIMIT`.

        Notes
        -----
        Cost ``O(R·m·(d + n))`` per query against ``O(p·(d + n))`` for the exact distances of
        pre-transformed points. Holds the index's read lock.
        """
        Q32, was_1d = self._queries(Q)
        threads = V.check_threads(threads)
        with self._rw.read():
            st = self._st
            pos = self._columns(ids, st)
            if pos is not None and pos.size == 0:
                est = np.zeros((Q32.shape[0], 0), dtype=np.float32)
                return est[0] if was_1d else est
            self._check_queries_fit(Q32, st)
            sk = st.kernel_view
            if pos is not None:
                sk = sk._replace(sketches=st.sketches[:, :, pos], sqnorms=st.sketch_sqnorms[:, pos])
            with config.threads(threads):
                est = median_estimate(Q32, sk, self._select(Q32), root=True)
            est *= np.float32(1.0 / SKETCH_SCALE)  # a power of two: exact
            if pos is None and st.deleted_count:
                est[:, st.deleted] = np.inf
        return est[0] if was_1d else est

    def exact_distances(self, Q: Any, ids: Any = None, *, threads: int | None = None) -> np.ndarray:
        """Exact Mahalanobis distances under the current ``M`` (float64), for checks and re-scoring.

        Same arguments, shapes and errors as :meth:`estimate`. Cost ``O(d^2 + n·d)`` per query.
        Holds the index's read lock.
        """
        Q32, was_1d = self._queries(Q)
        threads = V.check_threads(threads)
        with self._rw.read():
            st = self._st
            pos = self._columns(ids, st)
            MQ, qmq = self._query_forms(Q32, st)
            cols = np.arange(self._n_positions, dtype=np.int64) if pos is None else pos
            cols = np.ascontiguousarray(np.broadcast_to(cols, (Q32.shape[0], cols.size)))
            with config.threads(threads):
                out = np.sqrt(quadform_rows(MQ, qmq, st.vectors, st.quadforms, cols))
            if pos is None and st.deleted_count:
                out[:, st.deleted] = np.inf
        return out[0] if was_1d else out

    # ----------------------------------------------------------------- point updates
    def _add(self, X: np.ndarray, progress: Any) -> None:
        st = self._st
        xmx_new = quadratic_forms(X, None if st.identity else st.matrix, threads=config.get_num_threads())
        self._check_forms(xmx_new, "X row")
        with progress_reporter(progress, st.maps.shape[0], desc="sketching", unit="copy") as report:
            S_new, sn_new = sketch_points(X, st.maps, report, extra=st.extra_rows)
        # Every new array is complete before the state is replaced: a failure changes nothing.
        self._st = st.replace(
            vectors=np.concatenate([st.vectors, X]),
            sketches=np.concatenate([st.sketches, S_new], axis=2),
            sketch_sqnorms=np.concatenate([st.sketch_sqnorms, sn_new], axis=1),
            quadforms=np.concatenate([st.quadforms, xmx_new]),
            deleted=np.concatenate([st.deleted, np.zeros(X.shape[0], dtype=np.bool_)]),
        )

    def _delete(self, positions: np.ndarray) -> None:
        st = self._st
        deleted = st.deleted.copy()
        deleted[positions] = True
        self._st = st.replace(deleted=deleted, deleted_count=st.deleted_count + positions.size)

    def update_point(self, ids: Any, X: Any, *, threads: int | None = None) -> None:
        """Replace stored vectors in place: ``x_i <- X`` for each id, sketches included.

        Parameters
        ----------
        ids : int or array-like of int (r,)
            External ids of live points (distinct).
        X : array-like (r, d) or (d,)
            The new vectors (copied into the index).
        threads : int, optional

        Raises
        ------
        TypeError, ValueError
            Bad vectors, dimension mismatch, an id not in the index, repeated ids,
            a number of vectors different from the number of ids, or a vector whose ``x^T M x``
            exceeds :data:`QUADFORM_LIMIT`. The index is unchanged.

        Notes
        -----
        Cost ``O(r·(L·m·d + d^2))``, independent of ``n``; a rebuild costs ``O(n·(L·m·d + d^2))``.
        Holds the index's write lock.
        """
        self._require_built()
        X32, _ = V.as_vectors(X, "X", allow_1d=True, limit=self._metric.max_abs)
        V.check_dim(X32.shape[1], self._dim, "X")
        arr = V.check_ids(V.check_id_list(ids, "ids"), X32.shape[0])
        threads = V.check_threads(threads)
        with self._rw.write(), config.threads(threads):
            st = self._st
            pos = self._positions_of(arr)
            V.check_known_positions(arr, pos, st.deleted)
            xmx_new = quadratic_forms(X32, None if st.identity else st.matrix)
            self._check_forms(xmx_new, "X row")
            S_new, sn_new = sketch_points(X32, st.maps, extra=st.extra_rows)
            # Nothing below can fail: the writes are plain copies into arrays the index owns.
            Xs, S, sn, xmx = (_writable(a) for a in (st.vectors, st.sketches, st.sketch_sqnorms, st.quadforms))
            Xs[pos], S[:, :, pos], sn[:, pos], xmx[pos] = X32, S_new, sn_new, xmx_new
            self._st = st.replace(vectors=Xs, sketches=S, sketch_sqnorms=sn, quadforms=xmx)

    # ----------------------------------------------------------------- metric updates
    def update_metric(self, u: Any, *, row: Any = None, threads: int | None = None) -> None:
        """Low-rank change of the metric, applied to the sketches without re-transforming the points.

        Parameters
        ----------
        u : array-like (d,) or (r, d)
            With ``row=None``: new factor rows, ``U <- [U; u]``, i.e. ``M <- M + sum_t u_t u_t^T``
            (a rank-``r`` PSD update). With ``row``: changes of existing factor rows,
            ``U[row] <- U[row] + u`` (the update of the adaptive-estimation paper; any change of
            ``U`` is a sum of these).
        row : int or array-like of int (r,), optional
            Rows of ``U`` (``index.U``) to change; distinct, one per row of ``u``.
        threads : int, optional

        Raises
        ------
        TypeError, ValueError
            Non-numeric, NaN/inf or wrongly shaped ``u``, dimension mismatch, bad ``row``, or an
            update under which a live point's ``x^T M x`` would exceed :data:`QUADFORM_LIMIT`
            (or the sketch maps overflow). The index is unchanged.

        Notes
        -----
        Cost per update row: one pass over the points, ``O(n·d)`` for ``<u, x_i>`` (twice with
        ``row``), one read-only pass over the sketches, ``O(n·L·m)``, for their new norms, and
        ``O(L·m·d + d^2)`` for ``P`` and ``M``. The sketches are not written: the update is held
        back (``deferred``) and every ``deferred`` rows of updates are swept into them in one
        read-and-write pass, ``O(n·L·m)``, shared by those updates. Re-transforming every point
        for the exact path costs ``O(n·p·d)``. A new row gets projection columns drawn from the same
        seeded streams a fresh build would use, so the result equals ``MahalanobisSketch(U=
        index.U, same parameters).build(X)`` to float rounding. An identity (``"l2"``) index
        becomes ``"mahalanobis"``. Appending rows grows ``p`` by one per row. Holds the index's
        write lock.
        """
        self._require_built()
        W = V.check_matrix("u", u, allow_1d=True)
        V.check_metric_dim("u", W.shape[1], self._dim, "the indexed vectors")
        threads = V.check_threads(threads)
        with self._rw.write(), config.threads(threads):
            st = self._st
            # Row indices are checked under the lock: another writer may have grown U.
            rows = None if row is None else V.check_rows("row", row, st.factor.shape[0], W.shape[0])
            self._st = self._metric_updated(st, W, rows)

    def _metric_updated(self, st: SketchState, W: np.ndarray, rows: np.ndarray | None) -> SketchState:
        """The state after the factor update ``W`` (new rows, or changes of ``rows``).

        Everything that can fail (allocation, the magnitude checks) happens before the only
        in-place writes, into the sketches; the small arrays are updated in copies.
        """
        p, r, L, m = st.factor.shape[0], W.shape[0], st.maps.shape[0], st.sketch_rows
        cols = np.arange(p, p + r) if rows is None else rows
        G = np.ascontiguousarray(gaussian_columns(self.params["random_state"], cols, L, m), dtype=np.float32)
        defer = st.pending + r <= st.extra_rows
        old = np.zeros((0, W.shape[1])) if rows is None else st.factor[rows].copy()
        C, c_old = self._coefficients(st, W, old)
        if rows is None:
            U = np.concatenate([st.factor, W])
            xmx_delta = np.einsum("ij,ij->i", C, C)
        else:
            U = st.factor.copy()
            U[rows] += W
            c_new = c_old + C
            xmx_delta = np.einsum("ij,ij->i", c_new, c_new) - np.einsum("ij,ij->i", c_old, c_old)
        xmx = st.quadforms + xmx_delta
        self._check_forms(xmx, "under the updated metric, the point at position")
        M = np.array(st.matrix)
        gram_update(M, np.ascontiguousarray(W if rows is None else U[rows]), old)
        P = np.array(st.maps)
        outer_update(P, G, (SKETCH_SCALE * W).astype(np.float32))
        if not (np.isfinite(M).all() and float(np.abs(P).max()) <= _FLOAT32_SAFE):
            raise V.sketch_maps_overflow("u")
        C = SKETCH_SCALE * C  # the sketches' share of the coefficients (exact: a power of two)
        CT = np.ascontiguousarray(C.T, dtype=np.float32)
        sn = np.array(st.sketch_sqnorms)
        pending_columns = np.array(st.pending_columns)
        S = _writable(st.sketches)
        if defer:
            # New norms from one read of the current sketches; the update itself stays pending.
            sqnorm_update(sn, C, self._sketch_products(st, G), np.einsum("jat,jau->jtu", G, G))
            S[:, m + st.pending:m + st.pending + r] = CT  # rows the current state does not read
            pending_columns[:, :, st.pending:st.pending + r] = G
            pending = st.pending + r
        else:
            if st.pending:  # sweep the pending updates and these in one pass
                CT = np.concatenate([st.sketches[0, m:m + st.pending], CT])
                G = np.ascontiguousarray(np.concatenate([st.pending_columns[:, :, :st.pending], G], axis=2))
            rank_update(S, sn, CT, G)
            pending = 0
        return st.replace(factor=U, matrix=M, quadforms=xmx, maps=P, sketches=S, sketch_sqnorms=sn,
                          pending_columns=pending_columns, pending=pending, identity=False,
                          mahalanobis=True)

    @staticmethod
    def _coefficients(st: SketchState, W: np.ndarray, old: np.ndarray):
        """``<w_t, x_i>`` and ``<old_t, x_i>`` in float64 (they feed the exact quadratic forms)."""
        X = st.vectors
        c_old = matvec64(X, old) if old.shape[0] else np.zeros((X.shape[0], 0))
        return matvec64(X, W), c_old

    @staticmethod
    def _sketch_products(st: SketchState, G: np.ndarray) -> np.ndarray:
        """``<g_{j,t}, s_{j,i}>`` (L, r, n) with the current sketches, pending updates included.

        The current sketch is ``S_base + sum_u g_u c_u`` (``c_u`` = coefficient row ``m + u``), so
        the weights of the pending rows are ``<g_t, g_u>``: one pass over ``m + pending`` rows.
        """
        m, pend = st.sketch_rows, st.pending
        Wt = np.empty((G.shape[0], m + pend, G.shape[2]), dtype=np.float32)
        Wt[:, :m] = G
        if pend:
            Wt[:, m:] = np.einsum("jau,jat->jut", st.pending_columns[:, :, :pend], G)
        out = np.empty((G.shape[0], G.shape[2], st.vectors.shape[0]), dtype=np.float32)
        row_combinations(st.sketches, Wt, out)
        return out

    # ----------------------------------------------------------------- persistence
    def _state(self):
        meta, arrays = self._st.to_file()
        # A copy of the seed: a file whose parameters lost it would otherwise reseed silently.
        meta["seed"] = int(self.params["random_state"])
        return meta, arrays

    def _restore(self, meta, arrays) -> None:
        seed = take_meta(meta, "seed", int)
        if seed != self.params["random_state"]:
            raise bad_field("seed", f"is {seed} but the parameters' random_state is "
                                    f"{self.params['random_state']}")
        st = SketchState.from_file(meta, arrays)
        st.validate(self._dim, self._n_positions, copies=self.params["copies"],
                    deferred=self.params["deferred"])
        self._st = st
