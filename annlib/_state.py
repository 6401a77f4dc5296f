"""Checks for a family's typed state, used by every ``validate()`` (docs/api.md, "Persistence").

A loaded file is untrusted input: before any kernel touches a restored array, the family's state
object checks dtypes, shapes, ranges and offsets through these functions, which raise
:class:`~annlib.errors.IndexFormatError` naming the field. They are cheap vectorised passes
(one pass over an array at most), so ``load`` stays fast even on large indexes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import IndexFormatError
from .kernels.blockwise import ONE_QUERY_SERIAL_WORK, one_query_table, search_one
from .kernels.distances import sqnorms as _sqnorms

_NO_MASK = np.zeros(0, dtype=np.bool_)
_NO_IDS = np.zeros(0, dtype=np.int64)

__all__ = [
    "bad_field",
    "require",
    "take_array",
    "take_meta",
    "check_array",
    "check_range",
    "check_nondecreasing",
    "check_finite",
    "PreparedVectors",
]

_F32 = np.dtype(np.float32)  # dtype objects: np.empty takes them without a lookup
_I64 = np.dtype(np.int64)


def bad_field(field: str, problem: str) -> IndexFormatError:
    """The error for one field of a state that breaks an invariant (returned, to be raised)."""
    return IndexFormatError(f"field {field!r}: {problem}")


def require(condition: bool, field: str, problem: str) -> None:
    """Raise :func:`bad_field` ``(field, problem)`` unless ``condition`` holds."""
    if not condition:
        raise bad_field(field, problem)


def take_array(arrays: Mapping[str, np.ndarray], name: str, dtype: Any | None = None,
               ndim: int | None = None) -> np.ndarray:
    """Return ``arrays[name]``, checking that it exists and has the expected dtype and ndim.

    Raises
    ------
    IndexFormatError
        Missing array, wrong dtype, or wrong number of dimensions.
    """
    if name not in arrays:
        raise bad_field(name, "missing from the file")
    arr = arrays[name]
    if not isinstance(arr, np.ndarray):
        raise bad_field(name, f"expected an array, got {type(arr).__name__}")
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise bad_field(name, f"expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise bad_field(name, f"expected {ndim} dimension(s), got shape {arr.shape}")
    return arr


def take_meta(meta: Mapping[str, Any], name: str, kind: type | tuple = int, *, optional: bool = False) -> Any:
    """Return ``meta[name]`` checked to be of ``kind`` (bools are not ints here).

    Raises
    ------
    IndexFormatError
        Missing (unless ``optional``, which returns None) or of the wrong type.
    """
    if name not in meta:
        if optional:
            return None
        raise bad_field(name, "missing from the file's metadata")
    value = meta[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise bad_field(name, f"expected {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kinds):
        raise bad_field(name, f"expected {'/'.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def check_array(arr: np.ndarray, field: str, dtype: Any | None = None, shape: tuple | None = None) -> None:
    """Check dtype and shape (``None`` entries of ``shape`` match any length)."""
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise bad_field(field, f"expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    if shape is not None:
        ok = arr.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, arr.shape))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise bad_field(field, f"expected shape {want}, got {arr.shape}")


def check_range(arr: np.ndarray, field: str, low: int | float, high: int | float) -> None:
    """Every entry in ``[low, high]`` (inclusive); an empty array passes."""
    if arr.size == 0:
        return
    lo, hi = arr.min(), arr.max()
    if lo < low or hi > high:
        bad = lo if lo < low else hi
        raise bad_field(field, f"entries must be in [{low}, {high}]; found {bad}")


def check_nondecreasing(arr: np.ndarray, field: str) -> None:
    """Offsets must never decrease."""
    if arr.size > 1 and (np.diff(arr) < 0).any():
        at = int(np.flatnonzero(np.diff(arr) < 0)[0])
        raise bad_field(field, f"offsets must not decrease; entry {at + 1} < entry {at}")


def check_finite(arr: np.ndarray, field: str) -> None:
    """No NaN or inf (a float array read from a file)."""
    if arr.size and not np.isfinite(np.add.reduce(arr, axis=None, dtype=np.float64)):
        if not np.isfinite(arr).all():
            raise bad_field(field, "contains NaN or inf")


@dataclass
class PreparedVectors:
    """State made of metric-prepared vectors and their squared norms (BruteForce, TPUKNN).

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
    def of(cls, X: np.ndarray):
        """The state holding ``X`` (kept, not copied: the caller hands over an owned array)."""
        return cls(X, _sqnorms(X))

    def one_query_plan(self, ids: np.ndarray | None, proxy: int, terms: tuple) -> tuple:
        """What the exact one-query kernel needs of this state, for :meth:`search_one`:
        ``(self, ids, table, table words, n, long scan)``. ``ids`` are the index's external ids
        (None: positions), ``terms`` :meth:`annlib.Index._one_query_terms`. The plan holds this
        state and the ids, so a family keeps it until either is replaced."""
        n, d = self.vectors.shape
        table = one_query_table(self.vectors, _NO_IDS if ids is None else ids, proxy, terms)
        return (self, ids, table, table.words, n, n * d > ONE_QUERY_SERIAL_WORK)

    @staticmethod
    def search_raw(plan: tuple, q: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One prepared query (d,) through the one-query kernel for the ordinary path: ``plan`` made
        with ids None and :data:`annlib.kernels.query.RAW_TERMS`; (proxies, rows), each (1, k)."""
        out_d = np.empty((1, k), _F32)
        out_i = np.empty((1, k), _I64)
        search_one(q, plan[3], k, _NO_MASK if mask is None else mask, out_d[0], out_i[0])
        return out_d, out_i

    @staticmethod
    def search_one(plan: tuple, q: np.ndarray, k: Any, threads: int | None,
                   num_threads) -> tuple[np.ndarray, np.ndarray] | None:
        """The exact one-query search of :meth:`annlib.Index.search`'s short path, or None.

        ``plan`` is :meth:`one_query_plan`, ``q`` the raw query; ``num_threads()`` the thread
        setting, asked only for a long scan, which the ordinary path splits over the threads
        (then None, as for a bad ``k`` or query).
        """
        words, n, long_scan = plan[3], plan[4], plan[5]
        if type(k) is not int or not 0 < k <= n:
            return None
        if long_scan and (threads or num_threads()) > 1:
            return None
        out_d = np.empty(k, _F32)
        out_i = np.empty(k, _I64)
        if search_one(q, words, k, _NO_MASK, out_d, out_i):
            return None
        return out_i, out_d

    def appended(self, X: np.ndarray):
        """A new state with the rows of ``X`` appended (this one is left as it is)."""
        return type(self)(np.concatenate([self.vectors, X]), np.concatenate([self.sqnorms, _sqnorms(X)]))

    def to_file(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(metadata, arrays) for :func:`annlib.io.write_index_file`."""
        return {}, {"vectors": self.vectors, "sqnorms": self.sqnorms}

    @classmethod
    def from_file(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]):
        """Read the state back (types only; :meth:`validate` checks the invariants).

        Raises
        ------
        IndexFormatError
            A missing array, or one of the wrong dtype or rank.
        """
        return cls(take_array(arrays, "vectors", np.float32, 2), take_array(arrays, "sqnorms", np.float32, 1))

    def validate(self, dim: int, n_positions: int, metric: Any) -> None:
        """Check every invariant the kernels rely on; run on every load.

        Raises
        ------
        IndexFormatError
            Names the field: shapes that disagree with ``dim``/``n_positions``, NaN/inf,
            entries beyond the metric's float32 range, norms that are not the vectors' norms,
            or (cosine) rows that are not unit vectors.
        """
        n = n_positions
        check_array(self.vectors, "vectors", np.float32, (n, dim))
        check_array(self.sqnorms, "sqnorms", np.float32, (n,))
        check_finite(self.vectors, "vectors")
        limit = metric.max_abs(dim)
        if np.isfinite(limit):  # larger entries make the float32 distances overflow
            check_range(self.vectors, "vectors", -limit, limit)
        check_finite(self.sqnorms, "sqnorms")
        # Stale or altered norms would silently mis-rank every squared-L2 search; recomputing
        # them is one pass over the vectors, like the finiteness check.
        fresh = _sqnorms(self.vectors)
        if n:
            worst = int(np.argmax(np.abs(self.sqnorms - fresh) - 1e-3 * fresh))
            got, want = float(self.sqnorms[worst]), float(fresh[worst])
            require(abs(got - want) <= 1e-3 * want + 1e-30, "sqnorms",
                    f"entry {worst} is {got:.6g} but the vector's squared norm is {want:.6g}")
            if metric.normalize:
                bad = (np.abs(fresh - 1.0) > 1e-3) & (fresh > 1e-6)
                require(not bad.any(), "vectors",
                        f"row {int(np.argmax(bad))} of a cosine index is not a unit vector")
