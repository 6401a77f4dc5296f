"""Mahalanobis distance sketches: approximate distance estimation with online metric and point updates.

``d_M(q, x) = sqrt((q - x)^T M (q - x)) = ||U (q - x)||`` with ``M = U^T U`` positive
semi-definite. ``L`` independent Gaussian projections ``Pi_j`` (``m x p``) give per copy the map
``P_j = Pi_j U`` and the stored sketches ``s_{j,i} = P_j x_i``; a query is estimated against every
point by the median over ``R`` copies chosen per query (ALGORITHMS §4). Because every stored
quantity is linear in ``U`` and in the points, point and low-rank metric changes are applied to
the sketches directly, far cheaper than re-transforming the data.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from .. import _validation as V
from .. import config
from ..api import Index
from ..kernels.jl import choose_copies, gaussian_columns, query_keys, sketch_size
from ..kernels.sketch import (
    gram_update, matvec64, median_estimate, median_search, outer_update, quadform_rows,
    quadratic_forms, rank_update, row_combinations, sketch_points, sqnorm_update,
)
from ..kernels.topk import topk_rows
from ..metrics import ALIASES, METRICS

__all__ = ["MahalanobisSketch"]

_SUPPORTED = ["mahalanobis", "l2", "euclidean"]
_EIG_RANK_TOL = 1e-10  # eigenvalues below this fraction of the largest are dropped from the factor


def _reporter(progress: Any):
    """Turn ``progress=`` into a ``(done, total)`` callable, or None."""
    if callable(progress) and not isinstance(progress, bool):
        return progress
    if not progress:
        return None
    from tqdm.auto import tqdm  # lazy: only when a bar is asked for

    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="sketching", unit="copy")
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report


def _factor_from_psd(M: Any) -> tuple[np.ndarray, np.ndarray]:
    """(M, U) with ``U^T U = M``: eigen-factor, rows for the non-negligible eigenvalues, largest first."""
    M, w, vecs = V.check_psd_matrix("M", M)
    keep = w > _EIG_RANK_TOL * w[-1]
    U = (np.sqrt(w[keep])[:, None] * vecs[:, keep].T)[::-1]
    return M, np.ascontiguousarray(U)


def _writable(arr: np.ndarray) -> np.ndarray:
    """``arr`` itself, or a private copy when it is read-only (a memory-mapped load)."""
    return arr if arr.flags.writeable else np.array(arr)


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
        ``rank(M)`` rows. Give ``M`` or ``U``, not both; neither means the identity.
    U : array-like (p, d), optional
        A factor with ``M = U^T U`` (any ``p``); used as given, so ``update_metric(row=...)``
        addresses its rows.
    eps : float, default 0.1
        Target relative error of an estimated distance, in (0, 1). Smaller ``eps`` means larger
        sketches: ``m`` grows as ``1/eps^2``, and query time and memory with it.
    delta : float, default 0.05
        Allowed probability that one estimated distance misses ``(1 +- eps)``, in (0, 1). For all
        ``n`` distances of a query at once pass ``delta / n`` (``m`` grows with ``log(n/delta)``).
    m : int, optional
        Rows per sketch copy; default the smallest ``m`` for which the median of ``votes`` copies
        meets ``(eps, delta)`` exactly (chi-square law of Gaussian sketches; 87 for the defaults,
        192 with ``votes=1``). Overrides ``eps`` and ``delta``.
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
        Seed of the projections and of the per-query copy choice. A Generator is turned into an
        int seed at construction; None draws a fresh seed at build (kept in the saved file).

    Search parameters
    -----------------
    reorder : int, default 100
        Candidates (by estimated distance) re-ranked with exact Mahalanobis distances;
        ``max(reorder, k)`` are used. Larger is slower and more accurate.

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

    def __init__(self, metric: str = "mahalanobis", *, M: Any = None, U: Any = None, **params: Any):
        known = list(METRICS) + list(ALIASES) + ["mahalanobis"]
        V.check_supported_metric(type(self).__name__, metric, _SUPPORTED, known)
        V.check_exclusive(M=M, U=U)
        if M is not None:
            M64, U64 = _factor_from_psd(M)
        elif U is not None:
            U64 = V.check_matrix("U", U, nonzero=True)
            M64 = U64.T @ U64
        else:
            M64 = U64 = None
        # The kernels score squared Euclidean distances of transformed vectors: the base metric is l2.
        super().__init__(metric="l2", **params)
        self._mahalanobis = U64 is not None or metric == "mahalanobis"
        self._given = "M" if M is not None else "U"
        self._U, self._M = U64, M64
        self._identity = U64 is None
        self._seed: int | None = None
        self._m: int | None = None
        self._X = self._S = self._sn = self._P = self._xmx = self._dead = None
        self._G = None  # projection columns of deferred metric updates (L, m, deferred)
        self._pend = 0  # how many of them are pending

    # ----------------------------------------------------------------- parameters
    def _check_build_params(self, params: dict[str, Any]) -> dict[str, Any]:
        p = dict(params)
        p["eps"] = V.check_float("eps", p["eps"], 0.0, 1.0, low_open=True, high_open=True)
        p["delta"] = V.check_float("delta", p["delta"], 0.0, 1.0, low_open=True, high_open=True)
        if p["m"] is not None:
            p["m"] = V.check_int("m", p["m"], 1, 1 << 16)
        p["copies"] = V.check_int("copies", p["copies"], 1, 4096)
        p["votes"] = V.check_odd_int("votes", p["votes"], 1, p["copies"])
        p["deferred"] = V.check_int("deferred", p["deferred"], 0, 1024)
        rs = p["random_state"]
        gen = V.check_random_state(rs)
        if rs is not None and not isinstance(rs, numbers.Integral):
            # Generators and SeedSequences become an int so the parameters can be saved.
            p["random_state"] = int(gen.integers(0, 2**63 - 1))
        elif rs is not None:
            p["random_state"] = int(rs)
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
        return "mahalanobis" if self._mahalanobis else "l2"

    @property
    def M(self) -> np.ndarray | None:
        """The current metric matrix (float64 copy; None before build of an identity index)."""
        return None if self._M is None else self._M.copy()

    @property
    def U(self) -> np.ndarray | None:
        """The current factor ``U`` with ``M = U^T U`` (float64 copy); rebuild with ``U=index.U``."""
        return None if self._U is None else self._U.copy()

    @property
    def sketch_size(self) -> int | None:
        """Rows ``m`` per sketch copy (None before build)."""
        return self._m

    @property
    def seed(self) -> int | None:
        """The seed in use (drawn at build when ``random_state`` is None)."""
        return self._seed

    def _live_count(self) -> int:
        return self._n_positions - (0 if self._dead is None else int(self._dead.sum()))

    # ----------------------------------------------------------------- build and search hooks
    def _build(self, X: np.ndarray, progress: Any) -> None:
        d = X.shape[1]
        if self._identity:
            U, M = np.eye(d), np.eye(d)
        else:
            V.check_metric_dim(self._given, self._U.shape[1], d, "X")
            U, M = self._U, self._M
        seed = self.params["random_state"]
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63 - 1))
        p = self.params
        m = p["m"] if p["m"] is not None else sketch_size(p["eps"], p["delta"], p["votes"])
        Pi = gaussian_columns(seed, np.arange(U.shape[0]), p["copies"], m)
        P = np.ascontiguousarray((Pi.reshape(-1, U.shape[0]) @ U).reshape(p["copies"], m, d), dtype=np.float32)
        X = np.array(X, dtype=np.float32, order="C")  # own copy: update_point writes into it
        S, sn = sketch_points(X, P, _reporter(progress), extra=p["deferred"])
        xmx = quadratic_forms(X, M)
        self._U, self._M, self._seed, self._m = U, M, seed, m
        self._X, self._S, self._sn, self._P, self._xmx = X, S, sn, P, xmx
        self._G, self._pend = np.zeros((p["copies"], m, p["deferred"]), dtype=np.float32), 0
        self._dead = np.zeros(X.shape[0], dtype=np.bool_)

    def _allowed(self, mask: np.ndarray | None) -> np.ndarray | None:
        if not self._dead.any():
            return mask
        live = ~self._dead
        return live if mask is None else live & mask

    def _pending(self) -> np.ndarray | None:
        """Projection columns of the deferred metric updates (L, m, r), or None."""
        return self._G[:, :, :self._pend] if self._pend else None

    def _sketches(self) -> np.ndarray:
        """The current sketches (L, m, n) with deferred updates applied (a copy; for checks)."""
        m = self._m
        S = np.array(self._S[:, :m], dtype=np.float32)
        if self._pend:
            S += np.einsum("jat,tn->jan", self._G[:, :, :self._pend], self._S[0, m:m + self._pend])
        return S

    def _select(self, Q: np.ndarray) -> np.ndarray:
        return choose_copies(Q, query_keys(self._seed), self.params["copies"], self.params["votes"])

    def _exact_sq(self, Q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact squared distances (float64) from each query to the positions ``ids`` (q, c)."""
        Q64 = Q.astype(np.float64)
        MQ = Q64 if self._identity else Q64 @ self._M
        qmq = np.einsum("ij,ij->i", MQ, Q64)
        return quadform_rows(np.ascontiguousarray(MQ), qmq, self._X, self._xmx, ids)

    def _search(self, Q: np.ndarray, k: int, mask: np.ndarray | None, reorder: int):
        c = min(max(reorder, k), self._n_positions)
        _, cand = median_search(Q, self._P, self._S, self._sn, self._select(Q), c, self._allowed(mask),
                                pending=self._pending())
        exact = self._exact_sq(Q, cand).astype(np.float32)
        return topk_rows(exact, k, cand)

    # ----------------------------------------------------------------- estimation
    def _queries(self, Q: Any) -> tuple[np.ndarray, bool]:
        self._require_built()
        Q32, was_1d = V.as_vectors(Q, "Q", allow_1d=True)
        V.check_dim(Q32.shape[1], self._dim)
        return Q32, was_1d

    def _columns(self, ids: Any) -> np.ndarray | None:
        if ids is None:
            return None
        arr = np.atleast_1d(np.asarray(ids))
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise TypeError(f"ids must be a 1-D array of integers; got dtype {arr.dtype}, shape {arr.shape}")
        pos = self._positions_of(arr.astype(np.int64))
        V.check_known_positions(arr, pos, self._dead)
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
            Bad queries (DESIGN §4), dimension mismatch, or an id not in the index.

        Notes
        -----
        Cost ``O(R·m·(d + n))`` per query against ``O(p·(d + n))`` for the exact distances of
        pre-transformed points.
        """
        Q32, was_1d = self._queries(Q)
        pos = self._columns(ids)
        threads = V.check_threads(threads)
        S, sn = (self._S, self._sn) if pos is None else (self._S[:, :, pos], self._sn[:, pos])
        with config.threads(threads):
            est = median_estimate(Q32, self._P, S, sn, self._select(Q32), pending=self._pending(), root=True)
        if pos is None and self._dead.any():
            est[:, self._dead] = np.inf
        return est[0] if was_1d else est

    def exact_distances(self, Q: Any, ids: Any = None, *, threads: int | None = None) -> np.ndarray:
        """Exact Mahalanobis distances under the current ``M`` (float64), for checks and re-scoring.

        Same arguments, shapes and errors as :meth:`estimate`. Cost ``O(d^2 + n·d)`` per query.
        """
        Q32, was_1d = self._queries(Q)
        pos = self._columns(ids)
        threads = V.check_threads(threads)
        cols = np.arange(self._n_positions, dtype=np.int64) if pos is None else pos
        cols = np.broadcast_to(cols, (Q32.shape[0], cols.size))
        with config.threads(threads):
            out = np.sqrt(self._exact_sq(Q32, np.ascontiguousarray(cols)))
        if pos is None and self._dead.any():
            out[:, self._dead] = np.inf
        return out[0] if was_1d else out

    # ----------------------------------------------------------------- point updates
    def _add(self, X: np.ndarray, progress: Any) -> None:
        S_new, sn_new = sketch_points(X, self._P, _reporter(progress), extra=self._S.shape[1] - self._m)
        xmx_new = quadratic_forms(X, self._M)
        # Build every new array first, then swap, so a failure leaves the index as it was.
        X_all = np.concatenate([self._X, X])
        S_all = np.concatenate([self._S, S_new], axis=2)
        sn_all = np.concatenate([self._sn, sn_new], axis=1)
        xmx_all = np.concatenate([self._xmx, xmx_new])
        dead = np.concatenate([self._dead, np.zeros(X.shape[0], dtype=np.bool_)])
        self._X, self._S, self._sn, self._xmx, self._dead = X_all, S_all, sn_all, xmx_all, dead

    def _delete(self, positions: np.ndarray) -> None:
        V.check_known_positions(self._external_ids(positions), positions, self._dead)
        dead = _writable(self._dead)
        dead[positions] = True
        self._dead = dead

    def update_point(self, ids: Any, X: Any, *, threads: int | None = None) -> None:
        """Replace stored vectors in place: ``x_i <- X`` for each id, sketches included.

        Parameters
        ----------
        ids : int or array-like of int (r,)
            External ids of live points (distinct).
        X : array-like (r, d) or (d,)
            The new vectors.
        threads : int, optional

        Raises
        ------
        TypeError, ValueError
            Bad vectors (DESIGN §4), dimension mismatch, an id not in the index, repeated ids, or
            a number of vectors different from the number of ids.

        Notes
        -----
        Cost ``O(r·(L·m·d + d^2))``, independent of ``n``; a rebuild costs ``O(n·(L·m·d + d^2))``.
        """
        self._require_built()
        X32, _ = V.as_vectors(X, "X", allow_1d=True)
        V.check_dim(X32.shape[1], self._dim, "X")
        arr = np.atleast_1d(np.asarray(ids))
        if arr.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers; got dtype {arr.dtype}")
        V.check_ids(arr, X32.shape[0])
        threads = V.check_threads(threads)
        with self._write_lock, config.threads(threads):
            pos = self._positions_of(arr.astype(np.int64))
            V.check_known_positions(arr, pos, self._dead)
            S_new, sn_new = sketch_points(X32, self._P, extra=self._S.shape[1] - self._m)
            xmx_new = quadratic_forms(X32, self._M)
            Xs, S, sn, xmx = (_writable(a) for a in (self._X, self._S, self._sn, self._xmx))
            Xs[pos], S[:, :, pos], sn[:, pos], xmx[pos] = X32, S_new, sn_new, xmx_new
            self._X, self._S, self._sn, self._xmx = Xs, S, sn, xmx

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
            Non-numeric, NaN/inf or wrongly shaped ``u``, dimension mismatch, bad ``row``.

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
        becomes ``"mahalanobis"``. Appending rows grows ``p`` by one per row.
        """
        self._require_built()
        W = V.check_matrix("u", u, allow_1d=True)
        V.check_metric_dim("u", W.shape[1], self._dim, "the indexed vectors")
        rows = None if row is None else V.check_rows("row", row, self._U.shape[0], W.shape[0])
        threads = V.check_threads(threads)
        with self._write_lock, config.threads(threads):
            self._apply_metric_update(W, rows)

    def _apply_metric_update(self, W: np.ndarray, rows: np.ndarray | None) -> None:
        # Everything that can fail (allocation) happens before the first in-place write.
        p, r, L, m = self._U.shape[0], W.shape[0], self.params["copies"], self._m
        cols = np.arange(p, p + r) if rows is None else rows
        G = gaussian_columns(self._seed, cols, L, m).astype(np.float32)  # (L, m, r)
        cap = self._S.shape[1] - m
        defer = self._pend + r <= cap
        old = np.zeros((0, W.shape[1])) if rows is None else self._U[rows].copy()
        C, c_old = self._coefficients(W, old)
        if rows is None:
            U = np.concatenate([self._U, W])
            xmx_delta = np.einsum("ij,ij->i", C, C)
        else:
            U = self._U.copy()
            U[rows] += W
            c_new = c_old + C
            xmx_delta = np.einsum("ij,ij->i", c_new, c_new) - np.einsum("ij,ij->i", c_old, c_old)
        M, xmx, P = _writable(self._M), _writable(self._xmx), _writable(self._P)
        S, sn, Gp = _writable(self._S), _writable(self._sn), _writable(self._G)
        gram_update(M, np.ascontiguousarray(W if rows is None else U[rows]), old)
        xmx += xmx_delta
        CT = np.ascontiguousarray(C.T, dtype=np.float32)
        if defer:
            # New norms from one read of the current sketches; the update itself stays pending.
            sqnorm_update(sn, C, self._sketch_products(G), np.einsum("jat,jau->jtu", G, G))
            S[:, m + self._pend:m + self._pend + r] = CT
            Gp[:, :, self._pend:self._pend + r] = G
            pend = self._pend + r
        else:
            if self._pend:  # sweep the pending updates and these in one pass
                CT = np.concatenate([S[0, m:m + self._pend], CT])
                G = np.concatenate([Gp[:, :, :self._pend], G], axis=2)
            rank_update(S, sn, CT, np.ascontiguousarray(G))
            pend = 0
        outer_update(P, G[:, :, -r:] if not defer else G, W.astype(np.float32))
        self._U, self._M, self._xmx, self._P, self._S, self._sn, self._G = U, M, xmx, P, S, sn, Gp
        self._pend = pend
        self._identity = False
        self._mahalanobis = True

    def _coefficients(self, W: np.ndarray, old: np.ndarray):
        """``<w_t, x_i>`` and ``<old_t, x_i>`` in float64 (they feed the exact quadratic forms)."""
        c_old = matvec64(self._X, old) if old.shape[0] else np.zeros((self._X.shape[0], 0))
        return matvec64(self._X, W), c_old

    def _sketch_products(self, G: np.ndarray) -> np.ndarray:
        """``<g_{j,t}, s_{j,i}>`` (L, r, n) with the current sketches, pending updates included.

        The current sketch is ``S_base + sum_u g_u c_u`` (``c_u`` = coefficient row ``m + u``), so
        the weights of the pending rows are ``<g_t, g_u>``: one pass over ``m + pending`` rows.
        """
        m, pend = self._m, self._pend
        Wt = np.empty((G.shape[0], m + pend, G.shape[2]), dtype=np.float32)
        Wt[:, :m] = G
        if pend:
            Wt[:, m:] = np.einsum("jau,jat->jut", self._G[:, :, :pend], G)
        out = np.empty((G.shape[0], G.shape[2], self._X.shape[0]), dtype=np.float32)
        row_combinations(self._S, Wt, out)
        return out

    # ----------------------------------------------------------------- persistence
    def _state(self):
        meta = {"seed": str(self._seed), "m": int(self._m), "identity": bool(self._identity),
                "mahalanobis": bool(self._mahalanobis), "pending": int(self._pend)}
        arrays = {"vectors": self._X, "sketches": self._S, "sketch_sqnorms": self._sn,
                  "maps": self._P, "factor": self._U, "matrix": self._M, "quadforms": self._xmx,
                  "deleted": self._dead}
        if self._G.shape[2]:  # (deferred = 0 stores none: the file format refuses empty arrays)
            arrays["pending_columns"] = self._G
        return meta, arrays

    def _restore(self, meta, arrays) -> None:
        X, S, sn, P = arrays["vectors"], arrays["sketches"], arrays["sketch_sqnorms"], arrays["maps"]
        U, M, xmx, dead = arrays["factor"], arrays["matrix"], arrays["quadforms"], arrays["deleted"]
        n, d = X.shape
        L, m = self.params["copies"], int(meta["m"])
        # no pending columns: deferred = 0, or a file written before deferred updates existed
        G = arrays.get("pending_columns", np.zeros((L, m, 0), dtype=np.float32))
        pend = int(meta.get("pending", 0))
        if (S.ndim != 3 or S.shape[0] != L or S.shape[2] != n or sn.shape != (L, n)
                or P.shape != (L, m, d) or U.ndim != 2 or U.shape[1] != d or M.shape != (d, d)
                or xmx.shape != (n,) or dead.shape != (n,) or G.shape != (L, m, S.shape[1] - m)
                or not 0 <= pend <= G.shape[2]):
            raise ValueError("array shapes do not agree with each other")
        self._G, self._pend = G, pend
        self._X, self._S, self._sn, self._P = X, S, sn, P
        self._U, self._M, self._xmx, self._dead = np.asarray(U), np.asarray(M), xmx, dead
        self._seed, self._m = int(meta["seed"]), m
        self._identity, self._mahalanobis = bool(meta["identity"]), bool(meta["mahalanobis"])
