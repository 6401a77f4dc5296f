"""Every input check and every user-facing error message of annlib (each listed, with what to do,
in docs/guide.md, "Troubleshooting").

Families never write their own checks: they call these functions at the public boundary, before
any state is touched, so a call that raises leaves the index exactly as it was.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .errors import DimensionMismatchError, ShardUnavailableError

__all__ = [
    "as_vectors",
    "check_dim",
    "check_k",
    "check_choice",
    "check_params",
    "check_int",
    "check_float",
    "check_bool",
    "check_ids",
    "check_filter",
    "check_threads",
    "check_progress",
    "check_random_state",
    "add_not_supported",
    "abstract_index_build",
    "delete_not_supported",
    "check_id_list",
    "already_deleted",
    "check_save_path",
    "resolve_seed",
    "check_odd_int",
    "check_exclusive",
    "check_matrix",
    "check_psd_matrix",
    "check_metric_dim",
    "check_rows",
    "check_supported_metric",
    "check_known_positions",
    "quadratic_form_too_large",
    "sketch_maps_overflow",
]


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _real_array(value: Any, name: str, what: str) -> np.ndarray:
    """``np.asarray(value)`` with a real numeric dtype, or the TypeError that says why not."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged nested lists and the like
        raise TypeError(f"{name} must be a numeric {what}; could not convert it ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must have a real numeric dtype (bool, int, uint or float); got dtype {arr.dtype}")
    return arr


def as_vectors(X: Any, name: str = "X", *, allow_1d: bool = False,
               limit: Callable[[int], float] | None = None) -> tuple[np.ndarray, bool]:
    """Convert an array-like of vectors to a C-contiguous float32 matrix, checking it.

    Parameters
    ----------
    X : array-like
        Real-valued vectors, shape (n, d), or (d,) when ``allow_1d``.
    name : str, default "X"
        Argument name used in error messages.
    allow_1d : bool, default False
        Accept a single vector of shape (d,) and return it as shape (1, d).
    limit : callable, optional
        ``limit(d)`` is the largest magnitude an entry may have (a metric's float32 range, see
        :meth:`annlib.metrics.Metric.max_abs`); larger entries are refused.

    Returns
    -------
    (ndarray, bool)
        The float32 matrix and whether the input was 1-D.

    Raises
    ------
    TypeError
        Non-numeric dtype (object, string, complex, ...).
    ValueError
        Wrong number of dimensions, zero rows or columns, NaN or inf (names the first bad row),
        or an entry above ``limit(d)``.
    """
    if type(X) is np.ndarray:
        arr = X
    else:
        try:
            arr = np.asarray(X)
        except (TypeError, ValueError) as exc:  # ragged nested lists and the like
            raise TypeError(f"{name} must be a numeric array-like; could not convert it ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"{name} must have a real numeric dtype (bool, int, uint or float); got dtype {arr.dtype}"
        )
    was_1d = arr.ndim == 1
    if was_1d and allow_1d:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        shapes = "(n, d) or (d,)" if allow_1d else "(n, d)"
        raise ValueError(f"{name} must be a 2-D array of shape {shapes}; got ndim={arr.ndim} with shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has zero rows (shape {arr.shape}); at least one vector is needed")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has zero columns (shape {arr.shape}); vectors need at least one dimension")
    out = arr if arr.dtype == np.float32 and arr.flags.c_contiguous else np.ascontiguousarray(arr, dtype=np.float32)
    # Checked after the cast so float64 values that overflow float32 are caught too. The largest
    # and smallest entries are NaN when any entry is, inf when any is, and bound the magnitude:
    # two passes that allocate nothing.
    top, bottom = float(out.max()), float(out.min())
    if not (np.isfinite(top) and np.isfinite(bottom)):
        finite = np.isfinite(out)
        bad_row = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise ValueError(f"{name} contains NaN or inf; the first bad row is {bad_row}")
    if limit is not None:
        bound = limit(out.shape[1])
        biggest = max(top, -bottom)
        if biggest > bound:
            bad_row = int(np.flatnonzero(np.abs(out).max(axis=1) > bound)[0])
            raise ValueError(
                f"{name} has an entry of magnitude {biggest:.3g} (first in row {bad_row}); in dimension "
                f"{out.shape[1]} entries must be at most {bound:.3g}, or distances overflow float32. "
                f"Rescale the vectors (distances scale with them)"
            )
    return out, was_1d


def check_dim(given: int, expected: int, name: str = "Q") -> None:
    """Raise :class:`DimensionMismatchError` when ``given != expected``."""
    if given != expected:
        raise DimensionMismatchError(
            f"{name} has dimension {given} but the index holds vectors of dimension {expected}"
        )


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """Check that ``value`` is an integer within ``[low, high]`` and return it as ``int``.

    Raises
    ------
    TypeError
        ``value`` is not an integer (bools are refused).
    ValueError
        ``value`` is outside the range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {_describe(value)} of type {type(value).__name__}")
    value = int(value)
    if low is not None and value < low:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}; got {value}")
    if high is not None and value > high:
        bound = f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}; got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check that ``value`` is a finite real number within the given bounds; return it as float.

    Raises
    ------
    TypeError
        Not a real number.
    ValueError
        NaN, infinite, or outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {_describe(value)} of type {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    lo_bad = low is not None and (value <= low if low_open else value < low)
    hi_bad = high is not None and (value >= high if high_open else value > high)
    if lo_bad or hi_bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be in {interval}; got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Check that ``value`` is a bool (numpy bools accepted)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {_describe(value)}")
    return bool(value)


def check_bool_or_auto(name: str, value: Any) -> bool | str:
    """Check that ``value`` is a bool (numpy bools accepted) or the string ``"auto"``."""
    if isinstance(value, str) and value == "auto":
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True, False or \"auto\"; got {_describe(value)}")
    return bool(value)


def check_k(k: Any, n: int) -> int:
    """Check the number of neighbours requested against the number of indexed vectors."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer; got {_describe(k)} of type {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1; got k={k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of indexed vectors ({n})")
    return k


def check_choice(name: str, value: Any, accepted: Iterable[str]) -> str:
    """Check that ``value`` is one of ``accepted`` (strings); the message lists them all."""
    accepted = list(accepted)
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"unknown {name} {_describe(value)}; accepted: {', '.join(accepted)}")
    return value


def check_params(params: Mapping[str, Any], accepted: Iterable[str], where: str) -> None:
    """Refuse parameter names that ``where`` does not know, listing the accepted ones."""
    accepted = sorted(accepted)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        names = ", ".join(accepted) if accepted else "(none)"
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for {where}; accepted: {names}")


def check_ids(ids: Any, n: int, existing: np.ndarray | None = None) -> np.ndarray:
    """Check external ids for ``n`` new vectors and return them as int64.

    Parameters
    ----------
    ids : array-like of int
        One non-negative integer per vector, all distinct (-1 is reserved for padding).
    n : int
        Number of vectors the ids are for.
    existing : ndarray of int64, optional
        Ids already in the index; a new id may not repeat one of them.

    Raises
    ------
    TypeError
        Non-integer ids.
    ValueError
        Wrong shape or length, negative or repeated ids, or ids already present.
    """
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
        raise TypeError(f"ids must be integers; got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"ids must be in [0, 2**63 - 1] (stored as int64); got {int(arr.max())}")
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"ids must be a 1-D array with one id per vector ({n}); got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"ids must be >= 0 (-1 marks padding in results); got {int(arr.min())}")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"ids must be distinct; id {int(uniq[counts > 1][0])} is repeated")
    if existing is not None and existing.size:
        clash = np.intersect1d(arr, existing)
        if clash.size:
            raise ValueError(f"ids already in the index: {int(clash[0])} (and {clash.size - 1} more)")
    return arr


def check_filter(
    filter: Any, n: int, positions_of: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray | None:
    """Turn a ``filter=`` argument into a boolean mask over the index's internal positions.

    Parameters
    ----------
    filter : None, boolean array of length ``n``, or integer array of allowed ids
        A boolean mask has one entry per indexed vector in insertion order. An integer array lists
        the external ids that may be returned; ids the index does not hold are ignored.
    n : int
        Number of vectors in the index.
    positions_of : callable
        Maps an int64 array of external ids to internal positions (-1 where absent).

    Raises
    ------
    TypeError
        A dtype other than bool or integer.
    ValueError
        A boolean mask of the wrong length, or an array that is not 1-D.
    """
    if filter is None:
        return None
    arr = np.asarray(filter)
    if arr.size == 0 and arr.ndim == 1 and arr.dtype.kind in "fiub":  # [] is an empty set of ids
        return np.zeros(n, dtype=np.bool_)
    if arr.ndim != 1:
        raise ValueError(f"filter must be 1-D (a boolean mask or an array of allowed ids); got shape {arr.shape}")
    if arr.dtype == np.bool_:
        if arr.shape[0] != n:
            raise ValueError(f"a boolean filter needs one entry per indexed vector ({n}); got length {arr.shape[0]}")
        return np.ascontiguousarray(arr)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"filter must be a boolean mask or an integer array of ids; got dtype {arr.dtype}")
    mask = np.zeros(n, dtype=np.bool_)
    if arr.dtype == np.uint64:  # ids above 2**63 - 1 cannot be in the index
        arr = arr[arr <= np.iinfo(np.int64).max]
    pos = positions_of(arr.astype(np.int64))
    mask[pos[pos >= 0]] = True
    return mask


def check_threads(threads: Any) -> int | None:
    """Check a ``threads=`` argument: None (current setting) or a positive integer."""
    if threads is None:
        return None
    return check_int("threads", threads, 1)


def check_progress(progress: Any) -> Any:
    """Check a ``progress=`` argument: a bool or a callable ``(done, total)``."""
    if isinstance(progress, (bool, np.bool_)) or callable(progress):
        return progress
    raise TypeError(f"progress must be True, False or a callable (done, total); got {_describe(progress)}")


def resolve_seed(random_state: Any) -> int:
    """The one seed policy: turn ``random_state`` into the int seed an index keeps and saves.

    ``None`` draws a fresh seed (from OS entropy) once; an int is used as given; a numpy
    ``Generator`` or ``SeedSequence`` gives one draw. The returned seed is stored in the index's
    parameters, so saving and loading reproduce the build.

    Raises
    ------
    TypeError
        Anything else.
    ValueError
        A negative int.
    """
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**63 - 1))
    if isinstance(random_state, np.random.SeedSequence):
        return int(random_state.generate_state(1, np.uint64)[0] >> np.uint64(1))
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral):
        raise TypeError(
            f"random_state must be None, an int seed, a SeedSequence or a numpy Generator; "
            f"got {_describe(random_state)}"
        )
    if random_state < 0 or random_state > 2**63 - 1:
        raise ValueError(f"random_state must be an integer seed in [0, 2**63 - 1]; got {random_state}")
    return int(random_state)


def check_random_state(random_state: Any) -> np.random.Generator:
    """Return a numpy Generator for None, an int seed, a SeedSequence or a Generator."""
    if random_state is None or isinstance(random_state, (numbers.Integral, np.random.SeedSequence)):
        if isinstance(random_state, numbers.Integral) and (isinstance(random_state, bool) or random_state < 0):
            raise ValueError(f"random_state must be a non-negative integer seed; got {random_state}")
        return np.random.default_rng(random_state)
    if isinstance(random_state, np.random.Generator):
        return random_state
    raise TypeError(f"random_state must be None, an int seed or a numpy Generator; got {_describe(random_state)}")


def check_auto_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse parameters ``Index.build(X, method="auto")`` does not take (family parameters
    belong to a named method)."""
    accepted = ("target_recall", "sample_size", "k", "random_state")
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for method='auto'; accepted: {', '.join(accepted)} "
            f"(family parameters need method=<family>)")
    return dict(params)


def abstract_index_build() -> TypeError:
    """The error for ``Index().build(X)``: the base class indexes nothing by itself."""
    return TypeError(
        "Index is the common base class and indexes nothing itself; use "
        "Index.build(X, method=...) or a family class such as annlib.HNSW(...).build(X)"
    )


def delete_not_supported(family: str, families_that_can: Iterable[str]) -> NotImplementedError:
    """The error for ``delete`` on a family that cannot delete (returned, for the caller to raise)."""
    can = ", ".join(sorted(families_that_can)) or "(none yet)"
    return NotImplementedError(f"{family} does not support delete(); families that can delete: {can}")


def check_id_list(ids: Any, name: str = "ids") -> np.ndarray:
    """Check a set of external ids given to ``delete`` (or similar); return it as 1-D int64.

    An empty list (numpy makes it float64) is a valid empty set.

    Raises
    ------
    TypeError
        Non-integer ids.
    ValueError
        More than one dimension, or ids outside [0, 2**63 - 1] (they cannot be in any index).
    """
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an integer or an array-like of integers ({exc})") from None
    arr = np.atleast_1d(arr)
    if arr.size == 0 and arr.ndim == 1:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers; got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one id or a 1-D array of ids; got shape {arr.shape}")
    if arr.dtype == np.uint64 and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"id {int(arr.max())} is not in the index (ids are in [0, 2**63 - 1])")
    return arr.astype(np.int64)


def already_deleted(external_id: int) -> ValueError:
    """The error for deleting an id twice (returned, for the caller to raise)."""
    return ValueError(f"id {external_id} was already deleted; nothing was deleted by this call")


def check_save_path(path: Any) -> Any:
    """Check a ``save`` destination: a non-empty path that is not a folder.

    Raises
    ------
    TypeError
        Not a str or path-like.
    ValueError
        An empty path, or one that names an existing folder.
    """
    import os

    try:
        text = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike; got {_describe(path)}") from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise ValueError("path must name a file; got an empty path")
    if os.path.isdir(text):
        raise ValueError(f"path {text!r} is a folder; give a file name inside it")
    return text


def add_not_supported(family: str, families_that_can: Iterable[str]) -> NotImplementedError:
    """The error for ``add`` on a family that cannot add (returned, for the caller to raise)."""
    can = ", ".join(sorted(families_that_can))
    return NotImplementedError(f"{family} does not support add(); families that can add: {can}")


def check_odd_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """Like :func:`check_int`, and the value must be odd (e.g. the number of votes of a median)."""
    value = check_int(name, value, low, high)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd (a median needs a middle element); got {value}")
    return value


def check_exclusive(**named: Any) -> None:
    """Refuse more than one of the given keyword arguments being set (not None)."""
    given = [k for k, v in named.items() if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of {', '.join(named)}; got {', '.join(given)}")


def check_matrix(name: str, value: Any, *, square: bool = False, allow_1d: bool = False,
                 nonzero: bool = False) -> np.ndarray:
    """Check a real, finite, non-empty 2-D matrix and return it as C-contiguous float64.

    Parameters
    ----------
    name : str
        Argument name for messages.
    value : array-like
    square : bool, default False
        Require shape (d, d).
    allow_1d : bool, default False
        Accept one row of shape (d,) and return it as (1, d).
    nonzero : bool, default False
        Refuse an all-zero matrix.

    Raises
    ------
    TypeError
        Non-numeric dtype.
    ValueError
        Not 2-D, empty, not square when ``square``, all zero when ``nonzero``, or NaN/inf.
    """
    arr = _real_array(value, name, "2-D array-like")
    if allow_1d and arr.ndim == 1:
        arr = arr.reshape(1, -1)
    shape = "(d, d)" if square else "(p, d)"
    if arr.ndim != 2 or 0 in arr.shape or (square and arr.shape[0] != arr.shape[1]):
        kind = "square " if square else ""
        raise ValueError(f"{name} must be a non-empty {kind}2-D matrix of shape {shape}; got shape {arr.shape}")
    out = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(out).all():
        bad_row = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
        raise ValueError(f"{name} contains NaN or inf; the first bad row is {bad_row}")
    if nonzero and not out.any():
        raise ValueError(f"{name} is all zeros; every distance would be 0")
    return out


def check_psd_matrix(name: str, value: Any, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check a symmetric positive semi-definite matrix; return it with its eigendecomposition.

    Parameters
    ----------
    name : str
        Argument name for messages.
    value : array-like (d, d)
    tol : float, default 1e-6
        Relative tolerance: asymmetry up to ``tol * max|M|`` and eigenvalues down to
        ``-tol * max eigenvalue`` are float noise (the matrix is symmetrised and the small
        negative eigenvalues are clipped to 0).

    Returns
    -------
    (M, w, V)
        The symmetrised float64 matrix, its eigenvalues (ascending, clipped at 0) and
        eigenvectors (columns), so callers need not factor it again.

    Raises
    ------
    TypeError
        Non-numeric dtype.
    ValueError
        Not square, NaN/inf, asymmetric, indefinite, or zero (every distance would be 0).
    """
    M = check_matrix(name, value, square=True)
    scale = float(np.abs(M).max())
    if scale == 0.0:
        raise ValueError(f"{name} is the zero matrix; every distance would be 0")
    asym = np.abs(M - M.T)
    worst = float(asym.max())
    if worst > tol * scale:
        i, j = np.unravel_index(int(asym.argmax()), asym.shape)
        raise ValueError(
            f"{name} must be symmetric; |{name}[{i},{j}] - {name}[{j},{i}]| = {worst:.3g} exceeds "
            f"{tol:g} * max|{name}| = {tol * scale:.3g}"
        )
    M = (M + M.T) / 2.0
    w, V = np.linalg.eigh(M)
    top = float(w[-1])
    if top <= 0.0 or float(w[0]) < -tol * top:
        raise ValueError(
            f"{name} must be positive semi-definite; its smallest eigenvalue is {float(w[0]):.4g} "
            f"(largest {top:.4g}, tolerance {-tol * max(top, 0.0):.3g})"
        )
    return M, np.maximum(w, 0.0), V


def check_metric_dim(name: str, given: int, expected: int, what: str = "the vectors") -> None:
    """Refuse a metric matrix (or update vector) whose dimension differs from the vectors'."""
    if given != expected:
        raise DimensionMismatchError(
            f"{name} acts on vectors of dimension {given}, but the dimension of {what} is {expected}"
        )


def check_rows(name: str, rows: Any, n_rows: int, count: int | None = None) -> np.ndarray:
    """Check row indices into a matrix with ``n_rows`` rows: integers, distinct, in range.

    ``count``, when given, is the number of indices required (one per row of an update).

    Returns
    -------
    ndarray int64 (r,)

    Raises
    ------
    TypeError
        Non-integer indices.
    ValueError
        Out of range or repeated.
    """
    arr = np.atleast_1d(np.asarray(rows))
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer row indices; got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be one index or a 1-D array of indices; got shape {arr.shape}")
    if count is not None and arr.size != count:
        raise ValueError(f"{name} must list one index per update row ({count}); got {arr.size}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= n_rows)
    if bad.any():
        raise ValueError(f"{name} must be in [0, {n_rows - 1}]; got {int(arr[bad][0])}")
    if np.unique(arr).size != arr.size:
        raise ValueError(f"{name} must be distinct; got {arr.tolist()}")
    return arr


def check_supported_metric(family: str, metric: Any, supported: Iterable[str], known: Iterable[str]) -> str:
    """Refuse an unknown metric name (listing the known ones) or one the family cannot serve."""
    check_choice("metric", metric, known)
    supported = list(supported)
    if metric not in supported:
        raise ValueError(f"{family} does not support metric {metric!r}; supported: {', '.join(supported)}")
    return metric


def check_known_positions(ids: np.ndarray, positions: np.ndarray, dead: np.ndarray | None = None) -> None:
    """Refuse ids that are not in the index (position -1) or were deleted (``dead[position]``).

    Raises
    ------
    ValueError
        Names the first offending id.
    """
    missing = positions < 0
    if dead is not None:
        missing = missing | (dead[np.maximum(positions, 0)] & (positions >= 0))
    if missing.any():
        raise ValueError(f"id {int(ids[np.flatnonzero(missing)[0]])} is not in the index")


def quadratic_form_too_large(what: str, value: float, limit: float) -> ValueError:
    """The error for a vector whose Mahalanobis norm ``x^T M x`` would overflow float32 sketches.

    ``what`` names the vector (e.g. ``"X row 3"``); returned, for the caller to raise.
    """
    return ValueError(
        f"{what} has x^T M x = {value:.3g}; MahalanobisSketch needs at most {limit:.3g}, or its "
        f"float32 sketches and distances overflow. Rescale the vectors or the metric (distances "
        f"scale with them)"
    )


def sketch_maps_overflow(name: str) -> ValueError:
    """The error for a metric factor so large that the float32 sketch maps ``Pi U`` overflow."""
    return ValueError(
        f"{name} has entries so large that the float32 sketch maps overflow; rescale {name} "
        f"(distances scale with it)"
    )


def check_not_above_count(name: str, value: int, n: int) -> None:
    """A count parameter (e.g. ``num_leaves``) must not exceed the number of vectors ``n``."""
    if value > n:
        raise ValueError(f"{name}={value} is larger than the number of vectors ({n})")


def check_capacity(family: str, total: int, limit: int) -> None:
    """A family that addresses its vectors with fixed-width integers holds at most ``limit``."""
    if total > limit:
        raise ValueError(f"{family} holds at most {limit} vectors; this call would make it hold {total}")


def finger_with_sq8() -> ValueError:
    """HNSW asked for FINGER together with the walk on 8-bit codes; returned, for the caller
    to raise."""
    return ValueError("finger=True cannot be combined with walk='sq8' (the walk on 8-bit codes has no "
                      "FINGER variant); use finger='auto' or False with walk='sq8'")


def avq_needs_inner_product(metric: str) -> ValueError:
    """Partitioned's ``avq`` (re-fit of leaf centres) with a metric that does not score by inner
    product; returned, for the caller to raise."""
    return ValueError(
        f"avq re-fits leaf centres for inner-product scores and applies to metric 'cosine' or 'ip'; "
        f"got metric {metric!r} (leave avq=None)"
    )


# ----------------------------------------------------------------------------- tuning
def not_an_index(value: Any) -> TypeError:
    """``annlib.tune`` given something that is not an annlib index."""
    return TypeError(f"index must be a built annlib index; got {type(value).__name__}")


def check_one_constraint(target_recall: Any, max_cost: Any) -> None:
    """Exactly one of a recall target and a cost budget."""
    if (target_recall is None) == (max_cost is None):
        raise ValueError("give exactly one of target_recall or max_cost")


def check_self_ids(own: np.ndarray, n_queries: int, has_truth: bool, k: int, n_indexed: int) -> None:
    """Leave-one-out ids: one per query, not with ground truth, and more than ``k`` vectors."""
    if own.shape != (n_queries,):
        raise ValueError(f"self_ids needs one id per query ({n_queries}); got shape {own.shape}")
    if has_truth:
        raise ValueError("give ground_truth or self_ids, not both")
    if n_indexed < k + 1:
        raise ValueError(f"leave-one-out tuning needs more than k={k} indexed vectors; got {n_indexed}")


def no_tuner(family: str, tunable: Iterable[str]) -> ValueError:
    """A family without a tuner."""
    return ValueError(f"no tuner for family {family!r}; families that can be tuned: {', '.join(sorted(tunable))}")


def target_unreachable(target: float, margin: float, index_name: str, k: int, reach: str) -> ValueError:
    """No setting of the index reaches the recall target on the sample."""
    return ValueError(
        f"target_recall={target} (plus margin {margin}) is not reachable by this {index_name}: the best "
        f"recall@{k} on the sample is {reach}; lower the target or rebuild with larger parameters")


def budget_too_small(budget: float, index_name: str, cheapest_cost: float, cheapest_params: Any) -> ValueError:
    """Every setting of the index costs more than the budget."""
    return ValueError(
        f"max_cost={budget:.3g} s/query is below the cheapest setting of this {index_name} "
        f"({cheapest_cost:.3g} s/query at {cheapest_params})")


def check_truth_ids(ids: np.ndarray, nq: int, k: int, name: str = "ground_truth ids") -> None:
    """Exact-neighbour ids: integers, one row per query, at least ``k`` columns."""
    if ids.dtype.kind not in "iu" or ids.ndim != 2 or ids.shape[0] != nq or ids.shape[1] < k:
        raise ValueError(f"{name} must be an integer array of shape ({nq}, >= {k}); got {ids.dtype} {ids.shape}")


def check_truth_distances(dist: np.ndarray, nq: int, k: int) -> None:
    """Exact-neighbour distances: one row per query, at least ``k`` columns."""
    if dist.ndim != 2 or dist.shape[0] != nq or dist.shape[1] < k:
        raise ValueError(f"ground_truth distances must have shape ({nq}, >= {k}); got {dist.shape}")


def check_increasing(name: str, values: np.ndarray) -> None:
    """A non-empty strictly increasing sequence (e.g. a grid of leaf counts)."""
    if values.size == 0 or (np.diff(values) <= 0).any():
        raise ValueError(f"{name} must be a non-empty increasing sequence; got {values.tolist()}")


def auto_is_not_a_class() -> ValueError:
    """``get_family("auto")``: auto builds, it is not a family class."""
    return ValueError('"auto" is not a class: Index.build(X, method="auto") chooses a family and builds it '
                      '(index.tuning then names the family)')


# ----------------------------------------------------------------------------- scikit-learn estimators
def missing_extra(what: str, extra: str, cause: BaseException) -> ImportError:
    """An optional dependency of ``what`` does not import."""
    return ImportError(f"{what} needs the optional dependencies of annlib[{extra}] "
                       f"(pip install 'annlib[{extra}]'): {cause}")


def sklearn_too_old(found: str) -> ImportError:
    """``annlib.sklearn`` imported with a scikit-learn that lacks the estimator API it follows."""
    return ImportError(
        f"annlib.sklearn needs scikit-learn >= 1.6 (validate_data and __sklearn_tags__); found "
        f"scikit-learn {found}. Upgrade it, e.g. pip install 'annlib[sklearn]'")


def check_param_dict(name: str, value: Any) -> dict[str, Any]:
    """None or a mapping of parameter names to values, returned as a new dict (never the caller's).

    Raises
    ------
    TypeError
        Not a mapping, or a key that is not a string.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of parameter names to values, or None; got {_describe(value)}")
    bad = [key for key in value if not isinstance(key, str)]
    if bad:
        raise TypeError(f"{name} keys must be parameter names (str); got {_describe(bad[0])}")
    return dict(value)


def check_not_in_params(name: str, params: Mapping[str, Any], owned: Mapping[str, str]) -> None:
    """Refuse keys of ``params`` that another argument owns; ``owned`` maps each key to its owner.

    Raises
    ------
    ValueError
        Names the first such key and the argument to use instead.
    """
    for key, owner in owned.items():
        if key in params:
            raise ValueError(f"{name} may not contain {key!r}; set it with {owner} instead")


def random_state_given_twice() -> ValueError:
    """Both an estimator's ``random_state`` and ``method_params["random_state"]`` were set."""
    return ValueError("random_state is set both as a parameter and in method_params; give it in one place")


def too_many_neighbours(n_neighbors: int, n_samples_fit: int, n_samples: int, extra: int, why: str) -> ValueError:
    """More neighbours asked for than the fitted samples can give.

    ``extra`` is 1 when the query also needs the sample itself (``why`` says why), 0 otherwise.
    The message names ``n_samples`` as scikit-learn's common tests expect.
    """
    need = f"n_neighbors + 1 = {n_neighbors + 1}" if extra else f"n_neighbors = {n_neighbors}"
    reason = f" ({why})" if extra else ""
    return ValueError(
        f"{need} neighbours are needed{reason}, but only n_samples_fit = {n_samples_fit} samples were "
        f"fitted (n_samples = {n_samples} in this call); lower n_neighbors or fit on more samples")


# ----------------------------------------------------------------------------- ann-benchmarks module
def check_leaf_count(value: Any) -> Any:
    """A leaf count for the ann-benchmarks module: an int >= 1, or ``"<factor>*sqrt(n)"``.

    Returns the int, or the factor as a float when given relative to ``sqrt(n)``.

    Raises
    ------
    TypeError, ValueError
        Anything else, with the two accepted forms.
    """
    if isinstance(value, str):
        text = value.replace(" ", "")
        head, sep, tail = text.partition("*")
        if sep and tail == "sqrt(n)":
            try:
                factor = float(head)
            except ValueError:
                factor = float("nan")
            if np.isfinite(factor) and factor > 0:
                return factor
        raise ValueError(f"num_leaves must be an int >= 1 or a string like '2*sqrt(n)'; got {_describe(value)}")
    return check_int("num_leaves", value, 1)


def unsupported_benchmark_metric(metric: Any, accepted: Iterable[str]) -> ValueError:
    """A data set metric the ann-benchmarks module does not serve (e.g. hamming, jaccard)."""
    return ValueError(f"annlib serves the ann-benchmarks metrics {', '.join(accepted)}; got {_describe(metric)}")


# ------------------------------------------------------------------ sharded indexes
def too_few_for_shards(n: int, shards: int) -> ValueError:
    """``ShardedIndex.build`` with fewer vectors than shards."""
    return ValueError(f"ShardedIndex needs at least one vector per shard: {n} vectors for {shards} shards")


def empty_shard(partition: str) -> ValueError:
    """A split that left a shard without vectors."""
    return ValueError(f"the {partition} split left a shard empty; use fewer shards or partition='random'")


def routing_needs_centres() -> ValueError:
    """``shards_to_search`` on an index without shared centres."""
    return ValueError("shards_to_search needs partition='kmeans' (shards with shared centres)")


def sharded_mask_length(n: int, shape: tuple) -> ValueError:
    """A boolean filter whose length is not the number of vectors ever added."""
    return ValueError(f"a boolean filter needs one entry per vector ever added ({n}); got shape {shape}")


def sharded_unknown_ids(ids: list) -> ValueError:
    """``delete`` of ids the sharded index does not hold."""
    return ValueError(f"ids not in the index (or already deleted): {ids}; nothing was deleted")


def sharded_duplicate_ids() -> ValueError:
    """``delete`` with an id given twice."""
    return ValueError("ids contains duplicates; nothing was deleted")


def sharded_add_not_supported(family: str) -> ValueError:
    """``ShardedIndex.add`` for a family whose indexes cannot add."""
    return ValueError(f"{family} does not support add")


def sharded_delete_not_supported(family: str) -> ValueError:
    """``ShardedIndex.delete`` for a family whose indexes cannot delete."""
    return ValueError(f"{family} does not support delete")


def sharded_ids_present(ids: list) -> ValueError:
    """``ShardedIndex.add`` with ids the index already holds (or held)."""
    return ValueError(f"ids already in the index: {ids}")


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def sharded_write_failed(op: str, shards: list, cause: BaseException) -> ShardUnavailableError:
    """A sharded write that some shard could not apply; every shard was returned to its state
    before the call."""
    return ShardUnavailableError(f"{op} failed on shard(s) {shards} ({_cause(cause)}); "
                                 f"the batch was undone on every shard it reached")


def sharded_delete_not_undone(shards: list, cause: BaseException) -> ShardUnavailableError:
    """A sharded delete that failed on some shard after shards in this process had deleted
    their part (an annlib index cannot undelete)."""
    return ShardUnavailableError(f"delete failed on shard(s) {shards} ({_cause(cause)}); shards in "
                                 f"this process that deleted their part keep it deleted")


def sharded_add_not_undone(shards: list, kept: list, family: str, cause: BaseException) -> ShardUnavailableError:
    """A sharded add that failed on some shard after shards in this process, of a family
    without delete, had taken their part (they cannot give it back)."""
    return ShardUnavailableError(f"add failed on shard(s) {shards} ({_cause(cause)}); shard(s) {kept} in this "
                                 f"process kept their part ({family} cannot delete): rebuild the index, or use "
                                 f"the Ray executor, which undoes a failed add on every shard")


def shard_restart_failed(number: int, cause: BaseException) -> ShardUnavailableError:
    """A dead shard actor whose restart from its artefact failed."""
    return ShardUnavailableError(f"shard {number} is unavailable: its actor died and could not be "
                                 f"restarted from its artefact ({_cause(cause)})")


def shard_died_again(number: int, cause: BaseException) -> ShardUnavailableError:
    """A shard actor that died again right after its restart."""
    return ShardUnavailableError(f"shard {number} is unavailable: its actor died again after a "
                                 f"restart ({_cause(cause)})")


def unknown_executor(executor: Any) -> ValueError:
    """``executor=`` that is neither a known name nor an object with ``map``."""
    return ValueError("executor must be None, 'thread', 'serial', 'ray' or an object with "
                      f"map(fn, items); got {_describe(executor)}")


def ray_options_need_ray_executor() -> ValueError:
    """``address=``/``storage=`` given with an executor other than "ray"."""
    return ValueError("address= and storage= apply to executor='ray' only")


def ray_not_installed(exc: BaseException) -> ImportError:
    """The Ray executor asked for where Ray cannot be imported."""
    return ImportError(f"the Ray executor needs Ray: pip install 'annlib[distributed]' ({_cause(exc)})")


def storage_needs_fsspec(location: str, exc: BaseException) -> ImportError:
    """A storage URI (other than file://) without fsspec installed."""
    return ImportError(f"{location!r} is a URI: reading and writing it needs fsspec "
                       f"(pip install 'annlib[distributed]') ({_cause(exc)})")


def ray_storage_required(nodes: int) -> ValueError:
    """A multi-node Ray cluster and no ``storage=`` every node can read."""
    return ValueError(f"the Ray cluster has {nodes} nodes: pass storage= (a path or URI every node "
                      f"can read) for the shard artefacts")


def ray_not_enough_cpus(actors: int, per_actor: float, free: float) -> ValueError:
    """Shard actors that would wait for CPUs the cluster does not have free."""
    return ValueError(f"{actors} shard actors with num_cpus={per_actor:g} need {actors * per_actor:g} CPUs; "
                      f"the Ray cluster has {free:g} free; pass a smaller num_cpus (0 reserves none)")


def check_workers(workers: Any) -> int | None:
    """None or a positive int (an executor's pool size)."""
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers must be a positive int or None; got {workers!r}")
    return workers



# --- attention (annlib.attention) ----------------------------------------------------------------

def as_heads(value: Any, name: str, *, allow_2d: bool = False) -> tuple[np.ndarray, bool]:
    """Convert per-head vectors ``(heads, n, d)`` to a C-contiguous float32 array, checking them.

    Parameters
    ----------
    value : array-like
        Real-valued, shape (heads, n, d), or (heads, d) when ``allow_2d`` (one row per head).
    name : str
        Argument name used in messages.
    allow_2d : bool, default False
        Accept (heads, d) and return it as (heads, 1, d).

    Returns
    -------
    (ndarray, bool)
        The float32 array and whether the input was 2-D.

    Raises
    ------
    TypeError
        Non-numeric dtype.
    ValueError
        Wrong number of dimensions, an empty axis, NaN or inf (names the head and row), or an entry
        so large that scores overflow float32.
    """
    arr = _real_array(value, name, "array-like")
    was_2d = arr.ndim == 2 and allow_2d
    if was_2d:
        arr = arr[:, None, :]
    if arr.ndim != 3:
        shapes = "(heads, n, d) or (heads, d)" if allow_2d else "(heads, n, d)"
        raise ValueError(f"{name} must be a 3-D array of shape {shapes}; got ndim={arr.ndim} with shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"{name} has an empty axis (shape {arr.shape}); heads, rows and dimensions must be >= 1")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    top, bottom = float(out.max()), float(out.min())
    if not (np.isfinite(top) and np.isfinite(bottom)):
        head, row = (int(i) for i in np.argwhere(~np.isfinite(out).all(axis=2))[0])
        raise ValueError(f"{name} contains NaN or inf; the first bad entry is at head {head}, row {row}")
    bound = float(np.sqrt(np.finfo(np.float32).max / (8.0 * out.shape[2])))
    if max(top, -bottom) > bound:
        raise ValueError(
            f"{name} has an entry of magnitude {max(top, -bottom):.3g}; in dimension {out.shape[2]} entries "
            f"must be at most {bound:.3g}, or attention scores overflow float32")
    return out, was_2d


def check_kv_pair(keys: np.ndarray, values: np.ndarray, what: str = "values") -> None:
    """Keys and values must have the same heads and rows."""
    if keys.shape[:2] != values.shape[:2]:
        raise ValueError(
            f"keys and {what} must have the same (heads, n); got keys {keys.shape} and {what} {values.shape}")


def check_head_shape(name: str, shape: tuple, heads: int, d: int, what: str) -> None:
    """An appended or queried array must match the cache's KV heads and dimension."""
    if shape[0] != heads or shape[2] != d:
        raise DimensionMismatchError(
            f"{name} has shape {shape} but the cache holds {heads} KV heads of {what} dimension {d}; "
            f"expected ({heads}, t, {d})")


def check_query_heads(query_heads: int, kv_heads: int, d_query: int, d_keys: int) -> None:
    """Grouped-query layout: query heads a multiple of KV heads, same head dimension."""
    if d_query != d_keys:
        raise DimensionMismatchError(f"q has head dimension {d_query} but the cached keys have {d_keys}")
    if query_heads % kv_heads:
        raise ValueError(
            f"q has {query_heads} heads, not a multiple of the cache's {kv_heads} KV heads; query head h "
            f"reads KV head h // (query_heads // kv_heads)")


def check_budget(budget: Any, n: int) -> int:
    """A key budget: a count >= 1, or a fraction in (0, 1] of the ``n`` cached keys."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be a key count or a fraction of the cache; got {_describe(budget)}")
    if isinstance(budget, numbers.Integral):
        return check_int("budget", budget, low=1)
    frac = check_float("budget", budget, 0.0, 1.0, low_open=True)
    return max(1, int(np.ceil(frac * n)))


def check_partials(shapes: list) -> None:
    """Partial attention results to combine: at least one, all of one shape."""
    if not shapes:
        raise ValueError("combine needs at least one Partial")
    if len(set(shapes)) != 1:
        raise ValueError(f"all parts must have the same output shape; got {sorted(set(shapes))}")


def mass_with_fixed_budget() -> ValueError:
    return ValueError("give either budget= (a fixed number of keys) or mass= (an adaptive budget), not both; "
                      "with mass=, cap the selection with max_budget=")

