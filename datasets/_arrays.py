"""Input checks shared by the writers and the ground-truth routine."""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["as_vectors", "check_k"]


def as_vectors(a, argument: str) -> np.ndarray:
    """Return ``a`` as a C-contiguous float32 ``(rows, d)`` array, or raise.

    Values are rounded to float32 first because that is what files store and what indexes
    search, so ground truth is computed on exactly those values.
    """
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{argument}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{argument}: expected a 2-D array (rows, dim), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{argument}: expected at least one row and one column, got shape {arr.shape}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{argument}: row {row} contains NaN or inf (after conversion to float32)")
    return out


def check_k(k, n: int, argument: str = "k") -> int:
    """Return ``k`` as an int after checking ``1 <= k <= n``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{argument}: expected an integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"{argument}: expected k >= 1, got {k}")
    if k > n:
        raise ValueError(f"{argument}: k={k} is larger than the number of train vectors ({n})")
    return k
