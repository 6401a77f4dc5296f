"""Thread control: one place that sets numba's and the BLAS library's thread counts together.

Nothing is changed at import time; :func:`set_num_threads` and the :func:`threads` context manager
are the only writers.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

from ._validation import check_int
from .kernels.threads import assume_blas_threads, blas_controllers, blas_limit

__all__ = ["set_num_threads", "get_num_threads", "threads", "max_threads"]

_lock = threading.Lock()
_blas_limiter = None  # threadpoolctl limiter kept alive so a global BLAS limit persists


def max_threads() -> int:
    """Number of threads this process may use (CPU affinity aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _numba():
    import numba

    return numba


def get_num_threads() -> int:
    """Threads numba kernels currently use in this thread."""
    return _numba().get_num_threads()


def _set_blas_threads(n: int):
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


def set_num_threads(n: int) -> None:
    """Set the number of threads for annlib's numba kernels and for BLAS, process-wide.

    Parameters
    ----------
    n : int
        Positive number of threads; values above the CPU count are clipped to it.

    Raises
    ------
    TypeError, ValueError
        ``n`` is not a positive integer.
    """
    global _blas_limiter
    n = min(check_int("n", n, 1), max(1, _numba().config.NUMBA_NUM_THREADS))
    with _lock:
        _numba().set_num_threads(n)
        _blas_limiter = _set_blas_threads(n)
        blas_controllers(refresh=True)  # pick up BLAS libraries loaded since the last call
        assume_blas_threads(n)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Context manager: run the enclosed block with ``n`` numba and BLAS threads, then restore.

    ``n=None`` leaves the current settings untouched, so call sites can pass a per-call
    ``threads=`` argument straight through.
    """
    if n is None:
        yield
        return
    numba = _numba()
    n = min(check_int("threads", n, 1), max(1, numba.config.NUMBA_NUM_THREADS))
    previous = numba.get_num_threads()
    # Per-call use (threads= on every search) must cost microseconds: blas_limit touches only
    # libraries whose setting differs, through controllers found once.
    if previous != n:
        numba.set_num_threads(n)
    try:
        with blas_limit(n):
            yield
    finally:
        if previous != n:
            numba.set_num_threads(previous)
