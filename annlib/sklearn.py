"""scikit-learn estimators backed by annlib indexes: :class:`ANNTransformer`, :class:`ANNNeighbors`.

``ANNTransformer`` is a drop-in for :class:`sklearn.neighbors.KNeighborsTransformer`: it turns
samples into a sparse k-nearest-neighbour graph that estimators with ``metric="precomputed"``
(Isomap, TSNE, DBSCAN, KNeighborsClassifier, SpectralClustering, ...) consume, so a
``Pipeline`` gets an approximate index where it would otherwise compute exact neighbours.
``ANNNeighbors`` mirrors :class:`sklearn.neighbors.NearestNeighbors`' ``kneighbors`` and
``kneighbors_graph``.

The index finds the neighbours; the distances put in the graph are then recomputed in float64
from a copy of the fitted samples, so they are the metric's true distances (as scikit-learn's
metric gives them, without float32 rounding) and every row is sorted by them.

Needs scikit-learn >= 1.6 (``pip install 'annlib[sklearn]'``). See docs/sklearn.md.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import sklearn
from joblib import effective_n_jobs
from scipy import sparse
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from . import _validation as V
from .api import Index, families, get_family, load

try:  # public since scikit-learn 1.6, together with __sklearn_tags__
    from sklearn.utils.validation import validate_data
except ImportError:  # pragma: no cover - depends on the installed version
    raise V.sklearn_too_old(sklearn.__version__) from None

__all__ = ["ANNTransformer", "ANNNeighbors", "expected_failed_checks"]

# scikit-learn's metric names -> annlib's; "euclidean" and "l2" are one metric in both.
METRICS = {"euclidean": "l2", "l2": "l2", "cosine": "cosine", "ip": "ip"}
# The name effective_metric_ reports, as NearestNeighbors reports "euclidean" for "l2".
_EFFECTIVE_NAMES = {"euclidean": "euclidean", "l2": "euclidean", "cosine": "cosine", "ip": "ip"}
# Families whose distance is not the one `metric` names (Mahalanobis sketches measure under their
# own matrix), so the distances recomputed for the graph would not rank their answers.
_EXCLUDED_FAMILIES = ("mahalanobis",)
# Build arguments the estimator sets itself; method_params may not repeat them.
_OWNED_BUILD_ARGS = {"metric": "the metric parameter", "method": "the method parameter",
                     "threads": "n_jobs", "ids": "nothing (ids are sample positions)",
                     "progress": "nothing (fit shows no progress)"}
# Why one more neighbour than asked for is searched (for the error when there are too few).
_LEFT_OUT = "each fitted sample is left out of its own neighbours"
_SELF_STORED = "distance mode also stores each sample's distance to itself"
# float64 values gathered per chunk when distances are recomputed (64 MB).
_CHUNK_VALUES = 1 << 23


def accepted_methods() -> list[str]:
    """Values ``method`` accepts: "auto" and annlib's families that rank by ``metric``."""
    return ["auto"] + [name for name in families() if name not in _EXCLUDED_FAMILIES]


def expected_failed_checks(estimator: Any) -> dict[str, str]:
    """scikit-learn common checks these estimators are expected to fail, with the reason.

    For ``sklearn.utils.estimator_checks.check_estimator(est, expected_failed_checks=...)`` or
    ``parametrize_with_checks(..., expected_failed_checks=expected_failed_checks)``. Empty: every
    check that applies passes (docs/sklearn.md lists the run).
    """
    return {}


class _ANNNeighborsBase(BaseEstimator):
    """Fit, ``kneighbors`` and ``kneighbors_graph`` shared by both estimators.

    Subclasses define ``__init__`` with the public parameters (BaseEstimator reads them from its
    signature); nothing is checked or changed there, only in :meth:`fit`.
    """

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None):
        """Build the annlib index on ``X`` (a copy of it is kept for exact distances).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training samples; dense, finite, real. Converted to float64 (float32 stays float32).
        y : Ignored
            Present for API consistency.

        Returns
        -------
        self
            The fitted estimator, with ``index_``, ``n_samples_fit_``, ``n_features_in_`` and
            ``effective_metric_`` set.

        Raises
        ------
        ValueError
            Unknown ``mode``, ``metric`` or ``method``; ``n_neighbors`` < 1; NaN/inf or empty
            data; an unknown or out-of-range family parameter in ``method_params``; ``random_state``
            given both as a parameter and in ``method_params``.
        TypeError
            Sparse input, non-numeric data, a non-integer ``n_neighbors``, or ``method_params`` /
            ``search_params`` that are not dicts.
        """
        self._check_own_params()
        V.check_int("n_neighbors", self.n_neighbors, 1)
        metric = V.check_choice("metric", self.metric, list(METRICS))
        method = V.check_choice("method", self.method, accepted_methods())
        build_params = V.check_param_dict("method_params", self.method_params)
        V.check_not_in_params("method_params", build_params, _OWNED_BUILD_ARGS)
        V.check_param_dict("search_params", self.search_params)
        X = validate_data(self, X, accept_sparse=False, dtype=[np.float64, np.float32], order="C",
                          copy=True)
        build_params = self._with_seed(method, build_params)
        if method == "auto":
            # auto tunes its default search for recall@k; tune it at the k this estimator asks for
            build_params.setdefault("k", min(self.n_neighbors + 1, X.shape[0]))
        self.index_ = Index.build(X, method=method, metric=METRICS[metric], threads=self._threads(),
                                  **build_params)
        self._fit_X = X
        self._fit_norms = np.linalg.norm(X, axis=1) if metric == "cosine" else None
        self.n_samples_fit_ = X.shape[0]
        self.effective_metric_ = _EFFECTIVE_NAMES[metric]
        return self

    def _check_own_params(self) -> None:
        """Checks of parameters only one estimator has (ANNTransformer's ``mode``)."""

    def _with_seed(self, method: str, build_params: dict[str, Any]) -> dict[str, Any]:
        """``build_params`` with the seed ``random_state`` gives, for families that take one."""
        takes_seed = method == "auto" or "random_state" in get_family(method).build_defaults
        if "random_state" in build_params:
            if self.random_state is not None:
                raise V.random_state_given_twice()
            return build_params
        if not takes_seed:
            return build_params
        if isinstance(self.random_state, (int, np.integer)) and not isinstance(self.random_state, bool):
            seed = self.random_state  # used as given, so random_state=0 builds what annlib's seed 0 does
        else:
            # scikit-learn's convention: None draws from numpy's global generator, a RandomState
            # instance gives one draw
            seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        return {**build_params, "random_state": seed}

    def _threads(self) -> int:
        """Threads for annlib, from ``n_jobs`` as scikit-learn reads it (None -> 1, -1 -> all)."""
        return max(1, int(effective_n_jobs(self.n_jobs)))

    # ------------------------------------------------------------------ queries
    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """Find the k nearest fitted samples of each query, as ``NearestNeighbors.kneighbors``.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default None
            Queries. None queries the fitted samples themselves, each left out of its own
            neighbours (when duplicates hide it, one of the k + 1 found is left out instead).
        n_neighbors : int, default None
            Neighbours per query; None means the ``n_neighbors`` parameter.
        return_distance : bool, default True
            Also return the distances.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries, n_neighbors), float64
            True metric distances, ascending per row (only when ``return_distance``).
        neigh_ind : ndarray of shape (n_queries, n_neighbors), int64
            Positions of the neighbours in the fitted samples.

        Raises
        ------
        NotFittedError
            Before :meth:`fit`.
        ValueError
            A query with a different number of features, NaN/inf, ``n_neighbors`` < 1, or more
            neighbours than fitted samples (``n_neighbors + 1`` when ``X`` is None).
        TypeError
            A non-integer ``n_neighbors``, sparse or non-numeric queries.
        """
        check_is_fitted(self)
        Q = self._queries(X)
        k = self._checked_k(self.n_neighbors if n_neighbors is None else n_neighbors, Q.shape[0],
                            X is None, _LEFT_OUT)
        dist, ind = self._search(Q, k, leave_self_out=X is None)
        return (dist, ind) if return_distance else ind

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity"):
        """The k-nearest-neighbour graph of ``X`` as a sparse CSR matrix, as scikit-learn builds it.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default None
            Queries; None means the fitted samples, each left out of its own neighbours.
        n_neighbors : int, default None
            Neighbours per row; None means the ``n_neighbors`` parameter.
        mode : {"connectivity", "distance"}, default "connectivity"
            Stored values: ones, or the true metric distances.

        Returns
        -------
        graph : sparse CSR of shape (n_queries, n_samples_fit_)
            Exactly ``n_neighbors`` stored entries per row, in ascending distance order (column
            indices are not sorted), float64. ``csr_matrix`` or ``csr_array`` following
            scikit-learn's ``sparse_interface`` setting where it has one.

        Raises
        ------
        NotFittedError, ValueError, TypeError
            As :meth:`kneighbors`; ``ValueError`` for an unknown ``mode``.
        """
        check_is_fitted(self)
        mode = V.check_choice("mode", mode, ["connectivity", "distance"])
        Q = self._queries(X)
        k = self._checked_k(self.n_neighbors if n_neighbors is None else n_neighbors, Q.shape[0],
                            X is None, _LEFT_OUT)
        return self._graph(*self._search(Q, k, leave_self_out=X is None), mode)

    def _queries(self, X) -> np.ndarray:
        """Validated queries, or the fitted samples for ``X=None``."""
        if X is None:
            return self._fit_X
        return validate_data(self, X, accept_sparse=False, dtype=[np.float64, np.float32], order="C",
                             reset=False)

    def _checked_k(self, k: Any, n_queries: int, with_self: bool, why: str) -> int:
        """``k`` checked against the fitted samples; ``with_self``: one more is searched (``why``)."""
        k = V.check_int("n_neighbors", k, 1)
        if k + with_self > self.n_samples_fit_:
            raise V.too_many_neighbours(k, self.n_samples_fit_, n_queries, int(with_self), why)
        return k

    def _graph(self, dist: np.ndarray, ind: np.ndarray, mode: str):
        """CSR rows of ``ind`` (one row per query, ascending distance) holding ones or ``dist``."""
        n_queries, width = ind.shape
        data = np.ones(ind.size, dtype=np.float64) if mode == "connectivity" else dist.ravel()
        indptr = np.arange(0, n_queries * width + 1, width, dtype=np.int64)
        graph = sparse.csr_array((data, ind.ravel(), indptr), shape=(n_queries, self.n_samples_fit_))
        return _as_configured_sparse(graph)

    def _search(self, Q: np.ndarray, k: int, leave_self_out: bool) -> tuple[np.ndarray, np.ndarray]:
        """(distances float64, positions int64) of the ``k`` nearest, sorted by true distance."""
        search_params = V.check_param_dict("search_params", self.search_params)
        threads = self._threads()
        width = k + 1 if leave_self_out else k
        ind = np.array(self.index_.search(Q, width, threads=threads, **search_params).ids, dtype=np.int64)
        short = (ind < 0).any(axis=1)
        if short.any():
            # A row the approximate search could not fill would leave the graph ragged; answer
            # it exactly instead (does not happen with annlib's families without filters).
            ind[short] = self.index_.exact_search(Q[short], width, threads=threads).ids
        dist = self._true_distances(Q, ind)
        order = np.argsort(dist, axis=1, kind="stable")
        ind = np.take_along_axis(ind, order, axis=1)
        dist = np.take_along_axis(dist, order, axis=1)
        if leave_self_out:
            dist, ind = _without_self(dist, ind)
        return dist, ind

    def _true_distances(self, Q: np.ndarray, ind: np.ndarray) -> np.ndarray:
        """Metric distances from each query to its listed fitted samples, in float64."""
        n_queries, width = ind.shape
        out = np.empty((n_queries, width), dtype=np.float64)
        rows = max(1, _CHUNK_VALUES // max(1, width * Q.shape[1]))
        metric = self.effective_metric_
        for lo in range(0, n_queries, rows):
            q = np.asarray(Q[lo:lo + rows], dtype=np.float64)
            cols = ind[lo:lo + rows]
            x = np.asarray(self._fit_X[cols], dtype=np.float64)  # (rows, width, d)
            if metric == "euclidean":
                diff = x - q[:, None, :]
                out[lo:lo + rows] = np.sqrt(np.einsum("rkd,rkd->rk", diff, diff))
                continue
            dots = np.einsum("rkd,rd->rk", x, q)
            if metric == "ip":
                out[lo:lo + rows] = -dots
                continue
            # cosine as scikit-learn computes it: a zero vector has similarity 0 (distance 1),
            # and rounding is clipped to [0, 2]
            norms = np.linalg.norm(q, axis=1)[:, None] * self._fit_norms[cols]
            similarity = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
            out[lo:lo + rows] = np.clip(1.0 - similarity, 0.0, 2.0)
        return out

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        # annlib indexes hold locks and cannot be pickled; the index travels as its saved file
        state = dict(super().__getstate__())
        if isinstance(state.get("index_"), Index):
            state["index_"] = _IndexFile.of(state["index_"])
        return state

    def __setstate__(self, state):
        state = dict(state)
        if isinstance(state.get("index_"), _IndexFile):
            state["index_"] = state["index_"].load()
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False  # annlib indexes dense vectors only
        tags.input_tags.allow_nan = False
        return tags


class ANNTransformer(ClassNamePrefixFeaturesOutMixin, TransformerMixin, _ANNNeighborsBase):
    """Approximate k-nearest-neighbour graph transformer, following ``KNeighborsTransformer``.

    ``transform(X)`` returns the sparse graph of each row of ``X`` to its nearest fitted samples,
    in the format scikit-learn's estimators with ``metric="precomputed"`` read (Isomap, TSNE,
    DBSCAN, KNeighborsClassifier, ...). The neighbours come from an annlib index; the stored
    distances are recomputed exactly (float64) and each row is sorted by them.

    Parameters
    ----------
    mode : {"distance", "connectivity"}, default "distance"
        "distance": ``n_neighbors + 1`` entries per row holding the distances (scikit-learn's
        convention: each sample counts as its own neighbour, so ``fit_transform(X)`` stores an
        explicit 0 for every sample). "connectivity": ``n_neighbors`` entries of 1.0 per row
        (with ``fit_transform`` the sample itself is one of them).
    n_neighbors : int, default 5
        Neighbours per sample (>= 1).
    metric : {"euclidean", "l2", "cosine", "ip"}, default "euclidean"
        "euclidean"/"l2" store the Euclidean distance, "cosine" ``1 - cos`` (a zero vector is at
        distance 1 from everything), "ip" the negative inner product ``-<x, y>`` (maximum inner
        product search; negative values, so only for consumers that accept them).
    method : str, default "auto"
        annlib family: "auto" (annlib chooses and tunes one), "bruteforce" (exact), "hnsw",
        "partitioned", "tpuknn". ("mahalanobis" is refused: it ranks by its own matrix.)
    method_params : dict or None, default None
        Build parameters of the family (e.g. ``{"M": 16}`` for "hnsw"; for "auto"
        ``target_recall``, ``sample_size``, ``k``). Not ``metric``, ``threads`` or ``ids``.
    search_params : dict or None, default None
        Search parameters of the family (e.g. ``{"ef": 100}``); None uses the index's (tuned)
        defaults. Read at every transform.
    n_jobs : int or None, default None
        Threads for building and searching, as scikit-learn reads ``n_jobs``: None is 1 (unless
        in a joblib ``parallel_config`` block), -1 is every available core.
    random_state : int, RandomState instance or None, default None
        Seed of randomised builds (HNSW levels, k-means leaves). An int is passed to annlib as
        given; None draws a seed from numpy's global generator (scikit-learn's convention), so
        two fits may give different approximate graphs. Ignored by exact families.

    Attributes
    ----------
    index_ : annlib.Index
        The built index (a copy of the fitted samples is kept beside it for exact distances).
    n_samples_fit_ : int
        Number of fitted samples (columns of the graph).
    n_features_in_ : int
        Number of features seen in ``fit``.
    feature_names_in_ : ndarray of str
        Column names of a DataFrame given to ``fit``.
    effective_metric_ : str
        "euclidean", "cosine" or "ip".

    Raises
    ------
    ValueError, TypeError
        From :meth:`fit` and :meth:`transform`, never from the constructor (parameters are
        checked when fitting, as scikit-learn requires).

    Notes
    -----
    ``sklearn.utils.estimator_checks.check_estimator`` passes every check that applies, with
    :func:`expected_failed_checks` empty. Checks on sparse input are satisfied by refusing it
    with a ``TypeError`` (annlib indexes dense vectors; ``input_tags.sparse`` is False).
    Approximate neighbours do not break a common check: each query's answer is deterministic
    for a fitted index (independent of the batch it is in), and builds are reproducible for a
    fixed ``random_state``, which the checks set. Pickling stores the index as its saved file.

    Examples
    --------
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.manifold import Isomap
    >>> pipe = make_pipeline(ANNTransformer(n_neighbors=10, method="hnsw"),
    ...                      Isomap(n_neighbors=10, metric="precomputed"))   # doctest: +SKIP
    >>> embedding = pipe.fit_transform(X)                                   # doctest: +SKIP
    """

    def __init__(self, *, mode="distance", n_neighbors=5, metric="euclidean", method="auto",
                 method_params=None, search_params=None, n_jobs=None, random_state=None):
        self.mode = mode
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.method = method
        self.method_params = method_params
        self.search_params = search_params
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _check_own_params(self) -> None:
        V.check_choice("mode", self.mode, ["distance", "connectivity"])

    def fit(self, X, y=None):
        """Build the annlib index on ``X`` (a copy of it is kept for exact distances).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        self

        Raises
        ------
        ValueError
            Unknown ``mode``, ``metric`` or ``method``, bad data or family parameters.
        TypeError
            Sparse or non-numeric input, ``method_params``/``search_params`` not dicts.
        """
        super().fit(X, y)
        self._n_features_out = self.n_samples_fit_  # feature names: one per fitted sample
        return self

    def transform(self, X):
        """The neighbour graph of ``X`` against the fitted samples.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)

        Returns
        -------
        Xt : sparse CSR of shape (n_queries, n_samples_fit_)
            "distance" mode: ``n_neighbors + 1`` distances per row; "connectivity" mode:
            ``n_neighbors`` ones per row. Rows in ascending distance order, float64.

        Raises
        ------
        NotFittedError
            Before :meth:`fit`.
        ValueError
            A different number of features than in ``fit``, NaN/inf, or more neighbours than
            fitted samples (``n_neighbors + 1 > n_samples_fit_`` in "distance" mode).
        TypeError
            Sparse or non-numeric input.
        """
        check_is_fitted(self)
        mode = V.check_choice("mode", self.mode, ["distance", "connectivity"])
        # validated here, not by _queries: transform(None) is an error, as in scikit-learn
        Q = validate_data(self, X, accept_sparse=False, dtype=[np.float64, np.float32], order="C",
                          reset=False)
        with_self = mode == "distance"
        k = self._checked_k(self.n_neighbors, Q.shape[0], with_self, _SELF_STORED)
        # the queries are new samples (nothing left out): a fitted sample given again finds itself
        return self._graph(*self._search(Q, k + with_self, leave_self_out=False), mode)

    def fit_transform(self, X, y=None):
        """``fit(X).transform(X)``: the graph of the training samples, each its own neighbour.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        Xt : sparse CSR of shape (n_samples, n_samples)
            As :meth:`transform`; in "distance" mode every row stores its own 0 distance.

        Raises
        ------
        ValueError, TypeError
            As :meth:`fit` and :meth:`transform`.
        """
        return self.fit(X).transform(X)


class ANNNeighbors(_ANNNeighborsBase):
    """Approximate nearest neighbours with ``NearestNeighbors``' ``kneighbors`` interface.

    Parameters
    ----------
    n_neighbors : int, default 5
        Default number of neighbours of :meth:`kneighbors` and :meth:`kneighbors_graph`.
    metric : {"euclidean", "l2", "cosine", "ip"}, default "euclidean"
        As :class:`ANNTransformer`.
    method : str, default "auto"
        annlib family or "auto", as :class:`ANNTransformer`.
    method_params : dict or None, default None
        Family build parameters.
    search_params : dict or None, default None
        Family search parameters, read at every query.
    n_jobs : int or None, default None
        Threads (None is 1, -1 every core), as scikit-learn reads ``n_jobs``.
    random_state : int, RandomState instance or None, default None
        Seed of randomised builds, as :class:`ANNTransformer`.

    Attributes
    ----------
    index_ : annlib.Index
    n_samples_fit_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when ``fit`` was given a DataFrame with string column names.
    effective_metric_ : str

    Raises
    ------
    ValueError, TypeError
        From :meth:`fit` and the queries, never from the constructor.

    Notes
    -----
    ``radius_neighbors`` is not provided: annlib's indexes answer k-nearest queries.
    """

    def __init__(self, *, n_neighbors=5, metric="euclidean", method="auto", method_params=None,
                 search_params=None, n_jobs=None, random_state=None):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.method = method
        self.method_params = method_params
        self.search_params = search_params
        self.n_jobs = n_jobs
        self.random_state = random_state


def _without_self(dist: np.ndarray, ind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row's own position from k + 1 sorted neighbours, keeping k.

    A row whose own position is missing (more duplicates than neighbours, or an approximate
    miss) drops its farthest neighbour instead; with exact search that is one of the
    zero-distance duplicates, so the distances are those scikit-learn returns.
    """
    n_rows, width = ind.shape
    own = ind == np.arange(n_rows)[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), width - 1)
    keep = np.ones(ind.shape, dtype=bool)
    keep[np.arange(n_rows), drop] = False
    return dist[keep].reshape(n_rows, width - 1), ind[keep].reshape(n_rows, width - 1)


def _as_configured_sparse(graph: sparse.csr_array):
    """``graph`` as the sparse type scikit-learn hands out: its ``sparse_interface`` setting
    ("sparray" or "spmatrix") where it has one, else ``csr_matrix`` as older versions do."""
    if sklearn.get_config().get("sparse_interface", "spmatrix") == "sparray":
        return graph
    return sparse.csr_matrix(graph)


class _IndexFile:
    """A built index as the bytes of its saved file: what pickling an estimator stores."""

    def __init__(self, data: bytes):
        self.data = data

    @classmethod
    def of(cls, index: Index) -> "_IndexFile":
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "index.annlib")
            index.save(path)
            with open(path, "rb") as f:
                return cls(f.read())

    def load(self) -> Index:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "index.annlib")
            with open(path, "wb") as f:
                f.write(self.data)
            return load(path)
