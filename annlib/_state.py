"""Checks for a family's typed state, used by every ``validate()`` (DESIGN §6).

A loaded file is untrusted input: before any kernel touches a restored array, the family's state
object checks dtypes, shapes, ranges and offsets through these functions, which raise
:class:`~annlib.errors.IndexFormatError` naming the field. They are cheap vectorised passes
(one pass over an array at most), so ``load`` stays fast even on large indexes.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .errors import IndexFormatError

__all__ = [
    "bad_field",
    "require",
    "take_array",
    "take_meta",
    "check_array",
    "check_range",
    "check_nondecreasing",
    "check_finite",
]


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
