"""The common index API: :class:`Index`, :class:`SearchResult`, the family registry, :func:`load`.

A family subclasses :class:`Index`, declares its build and search parameters with defaults, and
implements a handful of private hooks (``_build``, ``_search``, optionally ``_add``, ``_delete``,
``_state``/``_restore``). Everything a user can get wrong is checked here, once, through
:mod:`annlib._validation`, before a hook runs; hooks therefore see clean float32 data prepared for
the metric, and a call that raises leaves the index untouched.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Any, Callable, ClassVar, NamedTuple

import numpy as np

from . import _validation as V
from . import _compile_ahead, config, io
from ._locks import ReadWriteLock
from ._state import bad_field, check_array, check_range, require, take_meta
from ._compile_notice import notice_compilation
from ._memory import release_free_memory
from .errors import IndexFormatError, NotBuiltError
from .metrics import Metric, get_metric

__all__ = ["Index", "SearchResult", "load", "families", "get_family", "register_family"]

__version__ = "0.1.0"

_F32 = np.dtype(np.float32)
_NO_IDS = np.zeros(0, dtype=np.int64)
# Searches of at most this many queries run the families' few-query kernels; more run the batch
# kernels (a first build compiles the two groups separately, see _compile_ahead).
_FEW_QUERIES = 4


class SearchResult(NamedTuple):
    """Result of :meth:`Index.search`; unpacks like ``ids, distances = result``.

    Attributes
    ----------
    ids : ndarray of int64, shape (q, k) (or (k,) for a 1-D query)
        External ids, best first; -1 pads rows with fewer than ``k`` results.
    distances : ndarray of float32, same shape
        Distances of the index's metric: Euclidean (l2), ``1 - cos`` (cosine) or ``-<q, x>`` (ip);
        smaller is better; +inf where the id is -1.
    """

    ids: np.ndarray
    distances: np.ndarray


def _new_result(pair: tuple) -> SearchResult:
    # SearchResult(ids, distances) without the generated __new__'s Python frame (per-call path)
    return tuple.__new__(SearchResult, pair)


# name -> "module:Class"; imported on first use so `import annlib` stays light (no jax).
_REGISTRY: dict[str, str] = {}


def register_family(name: str, target: str) -> None:
    """Register an index family under ``name``; ``target`` is ``"module.path:ClassName"``."""
    _REGISTRY[name] = target


def families() -> list[str]:
    """Names accepted by ``Index.build(method=...)`` (besides ``"auto"``).

    Only families whose module is present are listed, so a partial installation (or a family
    still being written) never breaks the others.
    """
    return [name for name, target in _REGISTRY.items() if _module_exists(target.partition(":")[0])]


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def get_family(name: str) -> type["Index"]:
    """Return the index class registered under ``name``.

    Raises
    ------
    ValueError
        Unknown name; the message lists the accepted names.
    """
    V.check_choice("method", name, families() + ["auto"])
    if name == "auto":
        raise V.auto_is_not_a_class()
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


class _ClassOrInstanceMethod:
    """Descriptor: one name, two behaviours (``Index.build(X, ...)`` and ``index.build(X)``)."""

    def __init__(self, on_class: Callable, on_instance: Callable):
        self.on_class = on_class
        self.on_instance = on_instance
        functools.update_wrapper(self, on_instance)

    def __get__(self, obj, objtype=None):
        if obj is None:
            return functools.partial(self.on_class, objtype)
        return functools.partial(self.on_instance, obj)


def _report(progress: Any, done: int, total: int) -> None:
    if callable(progress) and not isinstance(progress, bool):
        progress(done, total)


class Index:
    """Base class of every index family; also the entry point ``Index.build(X, method=...)``.

    Subclasses set ``family`` (registry name), ``build_defaults`` and ``search_defaults`` (every
    accepted parameter with its default), ``supports_add``/``supports_delete``, and implement
    ``_build``, ``_search`` and, where they apply, ``_add``, ``_delete``, ``_state``, ``_restore``.

    Parameters
    ----------
    metric : {"l2", "cosine", "ip"}, default "l2"
        Also accepts the aliases "euclidean", "angular", "dot".
    **params
        The family's build parameters (see its docstring).

    Raises
    ------
    ValueError
        Unknown metric or parameter name, or a parameter out of range.
    """

    family: ClassVar[str] = "index"
    build_defaults: ClassVar[dict[str, Any]] = {}
    search_defaults: ClassVar[dict[str, Any]] = {}
    supports_add: ClassVar[bool] = False
    supports_delete: ClassVar[bool] = False
    # How tuning without a query sample makes queries from the data (annlib.tune.auto).
    tuning_queries: ClassVar[str] = "leave_one_out"
    # Families that can make an index without kernels for annlib._compile_ahead set this and
    # implement _compile_ahead_index.
    compiles_ahead: ClassVar[bool] = False
    # Build parameters added since the first file format, with the value files written before
    # them were built with (a default that changed since must not change an old file's meaning).
    earlier_file_params: ClassVar[dict[str, Any]] = {}

    def __init__(self, metric: str = "l2", **params: Any):
        self._metric: Metric = get_metric(metric)
        V.check_params(params, self.build_defaults, f"{type(self).__name__}()")
        merged = {**self.build_defaults, **params}
        if "random_state" in merged:
            # One seed policy for every family: None draws a seed once, a Generator gives one;
            # the int kept in params is what is saved, so a loaded index rebuilds identically.
            merged["random_state"] = V.resolve_seed(merged["random_state"])
        if merged.get("default_recall") is not None:
            merged["default_recall"] = V.check_float("default_recall", merged["default_recall"], 0.0, 1.0,
                                                     low_open=True)
        self.params: dict[str, Any] = self._check_build_params(merged)
        self._dim: int | None = None
        self._n_positions = 0
        self._ids: np.ndarray | None = None  # None: ids are positions
        self._id_to_pos: dict[int, int] | None = None
        # Searches share the lock; build/add/delete (and family writers) hold it alone.
        self._rw = ReadWriteLock()
        # Search defaults set on this index (by the tuner or the user), saved with it.
        self._search_overrides: dict[str, Any] = {}
        self.tuning: dict[str, Any] | None = None

    # ----------------------------------------------------------------- hooks for families
    def _check_build_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Validate build parameters (types and ranges); return the cleaned dict."""
        return params

    def _check_search_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Validate search parameters (types and ranges); return the cleaned dict."""
        return params

    def _check_build_data(self, n: int) -> None:
        """Checks that need the number of vectors (e.g. num_leaves <= n)."""

    def _build(self, X: np.ndarray, progress: Any) -> None:
        raise NotImplementedError

    def _search(self, Q: np.ndarray, k: int, mask: np.ndarray | None, **params: Any):
        """Return (proxy distances float32 (q, k) ascending, positions int64 (q, k), -1 padded)."""
        raise NotImplementedError

    # The one-query path of :meth:`search` (None: the family has none). Called under the read
    # lock as ``_search_one(q, k, params, threads)`` with ``q`` a float32 C-contiguous (d,) query
    # as the caller gave it (not yet checked for NaN/inf/range, not prepared for the metric),
    # ``k`` as given (not checked), ``params`` the validated search parameters and ``threads``
    # None or a positive int. Returns ``(ids int64 (k,), distances float32 (k,))`` exactly as
    # :meth:`search` would (external ids, public distances, -1/+inf padding), or None whenever
    # anything is not its case (a bad k or query value, a policy that needs another path), and
    # then the ordinary path answers or raises. It must apply the family's filter policy
    # (deletions) as :meth:`_search_under_policy` does.
    _search_one: Callable[..., Any] | None = None

    def _ids_array(self) -> np.ndarray:
        """External ids by position, or an empty array when ids are positions (for kernels)."""
        return _NO_IDS if self._ids is None else self._ids

    def _one_query_terms(self) -> tuple[float, bool, int]:
        """``(bound, normalize, out_metric)`` of the one-query kernels (:mod:`annlib.kernels.query`):
        the largest magnitude a query entry may have (:func:`annlib._validation.as_vectors`'s
        limit; the largest float32 when the metric has none, so only NaN and inf fail), whether
        the metric normalises queries, and the public-distance code."""
        terms = self.__dict__.get("_one_terms")
        if terms is None:  # once per build (the dimension may change)
            from .kernels.query import OUT_COSINE, OUT_IP, OUT_L2

            bound = self._metric.max_abs(self._dim)
            if not np.isfinite(bound):
                bound = float(np.finfo(np.float32).max)
            code = {"l2": OUT_L2, "cosine": OUT_COSINE, "ip": OUT_IP}[self._metric.name]
            terms = self.__dict__["_one_terms"] = (bound, self._metric.normalize, code)
        return terms

    def _relabel_positions(self, new_of_old: np.ndarray) -> None:
        """Renumber every position ``p`` to ``new_of_old[p]`` (a permutation), vectors unchanged.

        Needed by families tuned on held-out vectors (``tuning_queries = "held_out"``): they are
        built on all but a sample, tuned with the sample as queries, then given the sample with
        ``_add``; this puts every vector back at its row of the build input.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot renumber its positions")

    def _add(self, X: np.ndarray, progress: Any) -> None:
        raise NotImplementedError

    def _delete(self, positions: np.ndarray) -> None:
        raise NotImplementedError

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Return (JSON-able metadata, arrays) that fully describe the built index."""
        raise NotImplementedError

    def _restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _live_count(self) -> int:
        return self._n_positions

    def _is_deleted(self, positions: np.ndarray) -> np.ndarray:
        """True where a position was deleted (families that delete override this)."""
        return np.zeros(positions.shape, dtype=np.bool_)

    def _live_mask(self) -> np.ndarray | None:
        """Boolean mask of live positions, or None when nothing was deleted."""
        return None

    def _scan_is_cheaper(self, n_allowed: int, k: int, params: dict[str, Any]) -> bool:
        """Whether an exact scan of ``n_allowed`` allowed rows beats the family's own search.

        Families with a sub-linear search (graph walks, probed leaves) override this; the base
        then answers filtered (or heavily deleted) searches by :meth:`_exact_over`.
        """
        return False

    def _vectors_at(self, positions: np.ndarray) -> np.ndarray:
        """Stored (metric-prepared) float32 vectors at ``positions``, shape (m, d)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its vectors")

    # rows scanned per step of _exact_over: bounds the copy of gathered vectors (64 MB at d = 256)
    _EXACT_CHUNK = 65536

    def _exact_over(self, Q: np.ndarray, k: int, rows: np.ndarray):
        """Exact top-``k`` of ``Q`` among the positions ``rows`` (proxy distances, positions).

        Rows are gathered and scanned a chunk at a time and the chunks' answers merged, so the
        memory this needs does not grow with the index.
        """
        from .kernels.blockwise import ONE_QUERY_SERIAL_WORK, exact_search
        from .kernels.topk import merge_topk

        nq = Q.shape[0]
        out_d = np.full((nq, k), np.inf, np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        for lo in range(0, rows.size, self._EXACT_CHUNK):
            part = rows[lo:lo + self._EXACT_CHUNK]
            Xs = np.ascontiguousarray(self._vectors_at(part), dtype=np.float32)
            kk = min(k, part.size)
            # the call's threads (a build's self-tune computes its truth here, inside the build's
            # threads), unless the scan is too short to be worth handing to workers
            workers = config.get_num_threads() if nq * Xs.size >= ONE_QUERY_SERIAL_WORK else 1
            # small batches choose their survivors by numpy: the self-tune needs no fold kernel
            d, i = exact_search(Q, Xs, None, kk, self._metric.proxy, workers=workers, small_by_numpy=True)
            i = np.where(i >= 0, part[np.maximum(i, 0)], -1)
            if lo == 0:
                out_d[:, :kk] = d
                out_i[:, :kk] = i
            else:
                out_d, out_i = merge_topk(out_d, out_i, np.ascontiguousarray(d, np.float32),
                                          np.ascontiguousarray(i, np.int64), k)
        return out_d, out_i

    # ----------------------------------------------------------------- build
    def _build_on_class(cls, X, method: str | None = None, metric: str = "l2", *, ids=None,
                        progress=False, threads=None, **params):
        if cls is Index:
            if method is None or method == "auto":
                from .tune.auto import build_auto

                return build_auto(X, metric=metric, ids=ids, progress=progress, threads=threads,
                                  **V.check_auto_params(params))
            family_cls = get_family(method)
        else:
            family_cls = cls
            if method is not None and get_family(method) is not cls:
                raise ValueError(f"method={method!r} conflicts with {cls.__name__}.build(); omit method")
        return family_cls(metric=metric, **params).build(X, ids=ids, progress=progress, threads=threads)

    def _build_on_instance(self, X, *, ids=None, progress=False, threads=None):
        """Index the vectors ``X`` (replacing anything indexed before) and return ``self``.

        Parameters
        ----------
        X : array-like, shape (n, d)
            Vectors, any real dtype (converted once to float32).
        ids : array-like of int, shape (n,), optional
            External non-negative distinct ids returned by ``search``; default positions 0..n-1.
        progress : bool or callable, default False
            True shows a progress bar; a callable receives ``(done, total)``.
        threads : int, optional
            Threads for this call (numba and BLAS); default the process setting.

        Raises
        ------
        TypeError, ValueError
            Bad vectors or ids, or parameters that do not fit the data.
        """
        if type(self) is Index:
            raise V.abstract_index_build()
        X32, _ = V.as_vectors(X, "X", limit=self._metric.max_abs)
        compiles = notice_compilation(type(self))
        ext = None if ids is None else V.check_ids(ids, X32.shape[0])
        V.check_progress(progress)
        threads = V.check_threads(threads)
        self._check_build_data(X32.shape[0])
        if compiles:  # a first build on this machine: its search kernels compile on another core
            _compile_ahead.start(self, X32.shape[0], X32.shape[1])
        Xp = self._owned(self._metric.prepare(X32), X)
        with self._rw.write(), config.threads(threads):
            if self.params.get("default_recall") is None:
                self._build(Xp, progress)
                self._reset_state(X32.shape[1], X32.shape[0], ext)
            else:
                # Families that take default_recall tune their own defaults on queries made
                # from the data, so an untuned index is already a useful one.
                from .tune.auto import build_self_tuned

                build_self_tuned(self, Xp, ext, progress)
        release_free_memory()  # the build's temporaries are freed; give their pages back
        return self

    @classmethod
    def _compile_ahead_index(cls, X: np.ndarray, metric: str, params: dict[str, Any],
                             shape: tuple[int, int], with_build_kernels: bool = False) -> "Index | None":
        """An index of ``X`` (a few hundred rows) made without running a search or build kernel,
        whose searches compile the kernels a build of data of ``shape`` with ``params`` will
        search with (:mod:`annlib._compile_ahead`); None when the family cannot make one for these
        params. ``with_build_kernels``: also run the build's kernels that need no trained state
        (they are then cached before the build reaches them)."""
        return None

    def _reset_state(self, dim: int, n_positions: int, ids: np.ndarray | None) -> None:
        """The base's bookkeeping after a (re)build: shape, ids, and no tuned defaults."""
        self._dim = dim
        self._n_positions = n_positions
        self._ids = ids
        self._id_to_pos = None
        self._search_overrides = {}
        self.tuning = None
        self._forget_validated_params()

    @staticmethod
    def _owned(prepared: np.ndarray, given: Any) -> np.ndarray:
        """``prepared`` as an array the index may keep and write: never the caller's memory."""
        if isinstance(given, np.ndarray) and np.may_share_memory(prepared, given):
            return prepared.copy()
        if not prepared.flags.writeable:
            return prepared.copy()
        return prepared

    build = _ClassOrInstanceMethod(_build_on_class, _build_on_instance)
    build.__doc__ = (
        "Build an index.\n\n"
        "``Index.build(X, method='hnsw', metric='l2', **params)`` chooses a family by name and\n"
        "returns the built index; ``SomeFamily.build(X, metric=..., **params)`` does the same for\n"
        "that family; ``SomeFamily(**params).build(X)`` builds an already configured object.\n\n"
        "Parameters\n----------\nX : array-like (n, d)\nmethod : str\n    One of families() or 'auto'.\n"
        "metric : {'l2', 'cosine', 'ip'}\nids : array-like of int, optional\n"
        "progress : bool or callable\nthreads : int, optional\n**params\n    Family build parameters.\n\n"
        "Raises\n------\nValueError\n    Unknown method, metric or parameter; bad data.\n"
        "TypeError\n    Non-numeric data."
    )

    # ----------------------------------------------------------------- properties
    def _require_built(self) -> None:
        if self._dim is None:
            raise NotBuiltError(f"this {type(self).__name__} has not been built; call build(X) first")

    @property
    def dim(self) -> int | None:
        """Dimension of the indexed vectors (None before build)."""
        return self._dim

    @property
    def metric(self) -> str:
        """Public metric name ("l2", "cosine" or "ip")."""
        return self._metric.name

    @property
    def n_positions(self) -> int:
        """Number of positions ever assigned (deleted ones included); the length of a boolean filter."""
        return self._n_positions

    def __len__(self) -> int:
        return self._live_count() if self._dim is not None else 0

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        sep = ", " if params else ""
        state = f"n={len(self)}, dim={self._dim}" if self._dim is not None else "not built"
        return f"{type(self).__name__}(metric={self.metric!r}{sep}{params}) [{state}]"

    # ----------------------------------------------------------------- ids
    def _positions_of(self, ids: np.ndarray) -> np.ndarray:
        """Internal positions of external ids (-1 where unknown)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._ids is None:
            return np.where((ids >= 0) & (ids < self._n_positions), ids, -1)
        if self._id_to_pos is None:
            self._id_to_pos = {int(v): p for p, v in enumerate(self._ids)}
        lookup = self._id_to_pos
        return np.fromiter((lookup.get(int(v), -1) for v in ids), dtype=np.int64, count=ids.size)

    def _external_ids(self, positions: np.ndarray) -> np.ndarray:
        if self._ids is None:
            return positions
        out = np.full(positions.shape, -1, dtype=np.int64)
        ok = positions >= 0
        out[ok] = self._ids[positions[ok]]
        return out

    # ----------------------------------------------------------------- search
    def search(self, Q, k: int = 10, *, threads: int | None = None, filter=None, **params) -> SearchResult:
        """Find the ``k`` nearest indexed vectors of each query.

        Parameters
        ----------
        Q : array-like, shape (q, d) or (d,)
            Queries; a 1-D query returns 1-D ``ids`` and ``distances``.
        k : int, default 10
            Neighbours per query, 1 <= k <= len(index).
        threads : int, optional
            Threads for this call; default the process setting (:func:`annlib.set_num_threads`).
        filter : bool array (n_positions,) or int array of ids, optional
            Only vectors allowed by the filter are returned; rows with fewer than ``k`` allowed
            vectors are padded with id -1 and distance +inf.
        **params
            The family's search parameters (see its docstring and ``search_space()``).

        Returns
        -------
        SearchResult
            ``ids`` (int64) and ``distances`` (float32), best first.

        Raises
        ------
        TypeError, ValueError
            Bad queries, dimension mismatch, bad ``k``, unknown or out-of-range parameters,
            bad filter.
        """
        # One query per call is a common way to search (the ann-benchmarks harness's default),
        # so the common case takes a short path: one valid float32 query (C-contiguous, aligned,
        # writeable; shape (d,) or (1, d)), no filter, default or already validated parameters.
        # (float32 by equality too: arrays read from HDF5, as the ann-benchmarks harness reads its
        # queries, carry an equal dtype object that is not numpy's own.)
        # The family's one-query kernel checks the query's values (NaN, inf, the float32 range)
        # itself and says when anything is wrong or not its case: the ordinary path below then
        # runs and raises, or answers, exactly as it always does.
        if (filter is None and type(Q) is np.ndarray and (Q.dtype is _F32 or Q.dtype == _F32) and Q.flags.carray
                and (threads is None or (type(threads) is int and threads > 0))):
            one = self._search_one
            ndim = Q.ndim
            q = Q if ndim == 1 else (Q[0] if ndim == 2 and len(Q) == 1 else None)
            if one is not None and q is not None and len(q) == self._dim:
                if params:
                    try:
                        sp = self.__dict__["_search_param_cache"].get(tuple(params.items()))
                    except (KeyError, TypeError):  # nothing validated yet, or unhashable values
                        sp = None
                else:
                    sp = self.__dict__.get("_cached_search_defaults")
                # (while a first build's one-query kernel still compiles aside, the path below)
                if sp is not None and (not _compile_ahead.pending
                                       or _compile_ahead.ready(self.family, _compile_ahead.STAGE_ALL)):
                    found = self._rw.call_read(one, q, k, sp, threads)
                    if found is not None:
                        if ndim == 2:
                            return _new_result((found[0].reshape(1, -1), found[1].reshape(1, -1)))
                        return _new_result(found)
        # This path runs once per query in one-at-a-time use, so it avoids work it can skip.
        self._require_built()
        Q32, was_1d = V.as_vectors(Q, "Q", allow_1d=True, limit=self._metric.max_abs)
        if Q32.shape[1] != self._dim:
            V.check_dim(Q32.shape[1], self._dim)
        if threads is not None:
            threads = V.check_threads(threads)
        Qp = self._metric.prepare(Q32)
        asked = 0
        if _compile_ahead.pending:  # a first build's search kernels are being compiled aside
            _compile_ahead.wait(self.family, _compile_ahead.STAGE_MANY)
            if Qp.shape[0] <= _FEW_QUERIES and not _compile_ahead.ready(self.family, _compile_ahead.STAGE_ALL):
                # the kernels of one and a few queries are still compiling: meanwhile these
                # queries run through the batch kernels, padded to a batch with the last one
                asked = Qp.shape[0]
                Qp = np.concatenate([Qp, np.repeat(Qp[-1:], _FEW_QUERIES + 1 - asked, axis=0)])
        with self._rw.read():
            k = V.check_k(k, len(self))
            sp = self._validated_search_params(params) if params else self._default_search_params()
            mask = None if filter is None else V.check_filter(filter, self._n_positions, self._positions_of)
            if threads is None and config._process_threads is None:
                proxy, pos = self._search_under_policy(Qp, k, mask, sp)
            else:
                with config.threads(threads):
                    proxy, pos = self._search_under_policy(Qp, k, mask, sp)
            if asked:
                proxy, pos = proxy[:asked], pos[:asked]
            dist = self._metric.to_distance(proxy)
            pos = np.asarray(pos, dtype=np.int64)
            # Rows are sorted with padding last, so a -1 anywhere shows in the last column.
            if pos.size and pos[:, -1].min() < 0:
                dist[pos < 0] = np.inf
            ids = self._external_ids(pos)
        if was_1d:
            return SearchResult(ids[0], dist[0])
        return SearchResult(ids, dist)

    def _search_under_policy(self, Q: np.ndarray, k: int, mask: np.ndarray | None, sp: dict[str, Any]):
        """The one filter policy: scan the allowed rows exactly when that is cheaper.

        A filter (or many deletions) leaves ``n_allowed`` candidates; a graph walk or a leaf probe
        then has to visit about ``n / n_allowed`` times more vectors to fill ``k`` results, so below
        the family's break-even point (:meth:`_scan_is_cheaper`) the exact answer is also the
        fastest one.
        """
        live = self._live_mask()
        if mask is None and live is None:
            return self._search(Q, k, None, **sp)
        allowed = mask if live is None else (live if mask is None else mask & live)
        # without a filter the live count is known; counting the mask would cost a pass per search
        n_allowed = self._live_count() if mask is None else int(np.count_nonzero(allowed))
        if self._scan_is_cheaper(n_allowed, k, sp):
            return self._exact_over(Q, k, np.flatnonzero(allowed))
        return self._search(Q, k, mask, **sp)

    def exact_search(self, Q, k: int = 10, *, threads: int | None = None) -> SearchResult:
        """Exact k nearest neighbours among the index's own stored vectors (deleted ones excluded).

        The ground truth for this index: the tuner and tests compare ``search`` against it. For
        families that keep full-precision vectors the distances are those ``search`` returns.

        Raises
        ------
        TypeError, ValueError
            As :meth:`search`.
        """
        self._require_built()
        if _compile_ahead.pending:
            _compile_ahead.wait(self.family, _compile_ahead.STAGE_MANY)
        Q32, was_1d = V.as_vectors(Q, "Q", allow_1d=True, limit=self._metric.max_abs)
        V.check_dim(Q32.shape[1], self._dim)
        threads = V.check_threads(threads)
        Qp = self._metric.prepare(Q32)
        with self._rw.read(), config.threads(threads):
            k = V.check_k(k, len(self))
            live = self._live_mask()
            rows = np.arange(self._n_positions, dtype=np.int64) if live is None else np.flatnonzero(live)
            proxy, pos = self._exact_over(Qp, k, rows)
            dist = self._metric.to_distance(proxy)
            ids = self._external_ids(np.asarray(pos, dtype=np.int64))
        if was_1d:
            return SearchResult(ids[0], dist[0])
        return SearchResult(ids, dist)

    def _forget_validated_params(self) -> None:
        # Search-parameter checks may depend on the index's size; redo them after it changes.
        self.__dict__.pop("_search_param_cache", None)
        self.__dict__.pop("_cached_search_defaults", None)
        self.__dict__.pop("_one_terms", None)

    def _validated_search_params(self, params: dict[str, Any]) -> dict[str, Any]:
        # One-query-at-a-time callers repeat the same settings; validating them once per distinct
        # setting keeps the per-call cost flat. Unhashable values skip the cache.
        cache = self.__dict__.setdefault("_search_param_cache", {})
        try:
            key = tuple(params.items())
            hit = cache.get(key)
        except TypeError:
            key, hit = None, None
        if hit is not None:
            return hit
        V.check_params(params, self.search_defaults, f"{type(self).__name__}.search()")
        checked = self._check_search_params({**self.search_defaults, **self._search_overrides, **params})
        if key is not None and len(cache) < 256:
            cache[key] = checked
        return checked

    def _default_search_params(self) -> dict[str, Any]:
        cached = self.__dict__.get("_cached_search_defaults")
        if cached is None:
            cached = self._check_search_params({**self.search_defaults, **self._search_overrides})
            self.__dict__["_cached_search_defaults"] = cached
        return cached

    @property
    def default_search_params(self) -> dict[str, Any]:
        """The search parameters used when ``search`` is called without them.

        The family's defaults, overridden by :meth:`set_default_search_params` (for example by
        ``annlib.tune(..., apply=True)``); saved with the index.
        """
        return {**self.search_defaults, **self._search_overrides}

    def set_default_search_params(self, **params: Any) -> None:
        """Make ``params`` this index's default search parameters (saved with the index).

        Parameters not named keep their current default; call with no arguments to return to
        the family's own defaults.

        Raises
        ------
        ValueError, TypeError
            Unknown parameter names or values out of range (checked before anything changes).
        """
        self._require_built()
        V.check_params(params, self.search_defaults, f"{type(self).__name__}.set_default_search_params()")
        with self._rw.write():
            overrides = {**self._search_overrides, **params} if params else {}
            self._check_search_params({**self.search_defaults, **overrides})
            self._search_overrides = overrides
            self._forget_validated_params()

    def warmup(self) -> None:
        """Run tiny searches so JIT compilation is not counted in the first real query."""
        self._require_built()
        q = np.ones((2, self._dim), dtype=np.float32)
        self.search(q, k=1)
        self.search(q[0], k=1)

    # ----------------------------------------------------------------- add / delete
    def add(self, X, *, ids=None, progress=False, threads: int | None = None) -> "Index":
        """Add vectors to a built index and return ``self``.

        Parameters
        ----------
        X : array-like, shape (m, d)
        ids : array-like of int, shape (m,), optional
            Required when the index was built with ids; must not repeat existing ids.
        progress : bool or callable, default False
        threads : int, optional

        Raises
        ------
        NotImplementedError
            The family cannot add (the message names the families that can).
        TypeError, ValueError
            Bad vectors or ids.
        """
        if not self.supports_add:
            raise V.add_not_supported(type(self).__name__, _families_with("supports_add"))
        self._require_built()
        X32, _ = V.as_vectors(X, "X", limit=self._metric.max_abs)
        V.check_dim(X32.shape[1], self._dim, "X")
        V.check_progress(progress)
        threads = V.check_threads(threads)
        Xp = self._owned(self._metric.prepare(X32), X)
        with self._rw.write(), config.threads(threads):
            # ids are checked against the index as it is under the lock, so two writers can
            # never both take the same ids or lose each other's.
            new_ids = self._new_ids_for_add(ids, X32.shape[0])
            self._add(Xp, progress)
            if new_ids is not None:
                self._ids = new_ids
                self._id_to_pos = None
            self._n_positions += X32.shape[0]
            self._forget_validated_params()
        return self

    def _new_ids_for_add(self, ids, m: int) -> np.ndarray | None:
        if ids is None:
            if self._ids is not None:
                raise ValueError("this index was built with ids; add() needs ids for the new vectors too")
            return None
        existing = self._ids if self._ids is not None else np.arange(self._n_positions, dtype=np.int64)
        new = V.check_ids(ids, m, existing)
        return np.concatenate([existing, new])

    def delete(self, ids) -> None:
        """Remove vectors by external id; they are never returned by ``search`` again.

        ``ids`` is a set: an id repeated within one call is removed once, and an empty list does
        nothing. Every id must be in the index now: an unknown id, or one already deleted, raises
        and nothing is deleted (the same rule in every family).

        Raises
        ------
        NotImplementedError
            The family cannot delete (the message names the families that can).
        TypeError
            Non-integer ids.
        ValueError
            An id that is not in the index or was already deleted.
        """
        if not self.supports_delete:
            raise V.delete_not_supported(type(self).__name__, _families_with("supports_delete"))
        self._require_built()
        arr = V.check_id_list(ids, "ids")
        if arr.size == 0:
            return
        with self._rw.write():
            arr = np.unique(arr)
            pos = self._positions_of(arr)
            V.check_known_positions(arr, pos, dead=None)
            dead = self._is_deleted(pos)
            if dead.any():
                raise V.already_deleted(int(arr[np.flatnonzero(dead)[0]]))
            self._delete(pos)
            self._forget_validated_params()

    # ----------------------------------------------------------------- sizes and spaces
    def memory_bytes(self) -> int:
        """Bytes held by the index's arrays (vectors, graph, codes, ids)."""
        self._require_built()
        with self._rw.read():
            _, arrays = self._state()
        total = sum(int(a.nbytes) for a in arrays.values())
        return total + (0 if self._ids is None else int(self._ids.nbytes))

    def _space_on_class(cls, n: int | None = None, dim: int | None = None):
        return cls._search_space(n, dim)

    def _space_on_instance(self):
        """Parameter ranges for the tuner and the benchmark sweep.

        Returns
        -------
        dict
            ``{"build": {name: [values...]}, "search": {name: [values...]}}``, each list ordered
            from cheap to expensive. Called on the class it takes optional ``n`` and ``dim``.
        """
        return self._search_space(len(self) if self._dim is not None else None, self._dim)

    search_space = _ClassOrInstanceMethod(_space_on_class, _space_on_instance)

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically (see :mod:`annlib.io`); reload with :func:`load`.

        Raises
        ------
        NotBuiltError
            The index has not been built.
        OSError
            The destination cannot be written; an existing file there is left as it was.
        """
        path = V.check_save_path(path)
        self._require_built()
        with self._rw.read():
            meta, arrays = self._state()
            arrays = dict(arrays)
            if self._ids is not None:
                arrays["__ids__"] = self._ids
            meta = {**meta, "__dim__": self._dim, "__n_positions__": self._n_positions}
            if self._search_overrides:
                meta["__search_defaults__"] = dict(self._search_overrides)
            if self.tuning is not None:
                meta["__tuning__"] = self.tuning
            io.write_index_file(
                path, family=self.family, metric=self.metric, params=self.params,
                meta=meta, arrays=arrays, library_version=__version__,
            )


def _families_with(flag: str) -> list[str]:
    out = []
    for name in families():
        try:
            if getattr(get_family(name), flag):
                out.append(name)
        except ImportError:
            continue
    return out


def load(path: str | os.PathLike, *, mmap: bool = False, verify: bool = True) -> Index:
    """Load an index written by :meth:`Index.save`.

    Parameters
    ----------
    path : path-like
    mmap : bool, default False
        Memory-map the arrays copy-on-write instead of reading them: pages are shared with
        the file and read on demand; the file is never written.
    verify : bool, default True
        Check every array's checksum.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    IndexFormatError
        Corrupt, truncated or foreign file; nothing is half-loaded.
    """
    header = io.read_index_file(path, mmap=mmap, verify=verify)
    family_name = header["family"]
    if not isinstance(family_name, str) or family_name not in _REGISTRY:
        raise IndexFormatError(f"{path} holds an index of unknown family {family_name!r}")
    cls = get_family(family_name)
    meta = dict(header["meta"]) if isinstance(header["meta"], dict) else None
    arrays = dict(header["arrays"])
    try:
        if meta is None:
            raise bad_field("meta", "expected a mapping")
        if not isinstance(header["params"], dict):
            raise bad_field("params", "expected a mapping")
        try:
            index = cls(metric=header["metric"], **{**cls.earlier_file_params, **header["params"]})
        except (TypeError, ValueError) as exc:
            raise bad_field("params", f"not valid for {cls.__name__} ({exc})") from None
        dim = take_meta(meta, "__dim__")
        n_positions = take_meta(meta, "__n_positions__")
        require(1 <= dim <= 1 << 24, "__dim__", f"must be in [1, 2^24]; got {dim}")
        require(0 <= n_positions < 1 << 40, "__n_positions__", f"must be >= 0; got {n_positions}")
        del meta["__dim__"], meta["__n_positions__"]
        overrides = meta.pop("__search_defaults__", None) or {}
        tuning = meta.pop("__tuning__", None)
        ids = arrays.pop("__ids__", None)
        if ids is not None:
            ids = _checked_ids(ids, n_positions)
        # The family's _restore reads its typed state and validates it against these.
        index._dim = dim
        index._n_positions = n_positions
        index._restore(meta, arrays)
        if overrides:
            try:
                require(isinstance(overrides, dict), "__search_defaults__", "expected a mapping")
                V.check_params(overrides, index.search_defaults, "the saved search defaults")
                index._check_search_params({**index.search_defaults, **overrides})
            except (TypeError, ValueError) as exc:
                raise bad_field("__search_defaults__", str(exc)) from None
            index._search_overrides = dict(overrides)
        index.tuning = tuning if isinstance(tuning, dict) else None
    except IndexFormatError as exc:
        raise IndexFormatError(f"{path} is corrupt: {family_name} index, {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        # A family check that is not yet phrased as a field error; still never a half-load.
        raise IndexFormatError(f"{path} is corrupt: cannot restore the {family_name} index "
                               f"({type(exc).__name__}: {exc})") from None
    index._ids = ids
    index._id_to_pos = None
    return index


def _checked_ids(ids: np.ndarray, n_positions: int) -> np.ndarray:
    check_array(ids, "__ids__", np.int64, (n_positions,))
    check_range(ids, "__ids__", 0, np.iinfo(np.int64).max)
    require(np.unique(ids).size == ids.size, "__ids__", "external ids must be distinct")
    return np.array(ids, dtype=np.int64)


register_family("bruteforce", "annlib.indexes.bruteforce:BruteForce")
register_family("hnsw", "annlib.indexes.hnsw:HNSW")
register_family("partitioned", "annlib.indexes.partitioned:Partitioned")
register_family("tpuknn", "annlib.indexes.tpuknn:TPUKNN")
register_family("mahalanobis", "annlib.indexes.mahalanobis:MahalanobisSketch")
