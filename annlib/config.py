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
from .kernels.threads import assume_blas_threads, blas_controllers, blas_limit, blas_settled_at

__all__ = ["set_num_threads", "get_num_threads", "threads", "max_threads", "process_threads"]

_lock = threading.Lock()
# numba's thread count is per Python thread; this mirrors what annlib last set in each thread (a
# count changed behind annlib's back, by numba.set_num_threads, is not seen: use annlib's calls)
_numba_in_thread = threading.local()
_blas_limiter = None  # threadpoolctl limiter kept alive so a global BLAS limit persists
# numba's thread count is per Python thread; the process-wide setting is kept here and applied by
# every annlib call in whichever thread it runs (None: never set, numba's own default applies).
_process_threads: int | None = None


def process_threads() -> int | None:
    """The count set by :func:`set_num_threads`, or None when it was never called."""
    return _process_threads


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
    # numba's own query costs microseconds (it checks its thread pool each time); what annlib
    # last set in this thread is known
    n = getattr(_numba_in_thread, "n", None)
    return n if n is not None else _numba().get_num_threads()


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
    global _blas_limiter, _process_threads
    n = min(check_int("n", n, 1), max(1, _numba().config.NUMBA_NUM_THREADS))
    with _lock:
        _process_threads = n
        _numba().set_num_threads(n)
        _numba_in_thread.n = n
        _blas_limiter = _set_blas_threads(n)
        blas_controllers(refresh=True)  # pick up BLAS libraries loaded since the last call
        assume_blas_threads(n)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Context manager: run the enclosed block with ``n`` numba and BLAS threads, then restore.

    ``n=None`` means the process setting of :func:`set_num_threads` (applied in this thread too:
    numba counts threads per Python thread), or nothing to change when it was never set, so call
    sites can pass a per-call ``threads=`` argument straight through.
    """
    if n is None:
        n = _process_threads
        if n is None:
            yield
            return
    numba = _numba()
    n = min(check_int("threads", n, 1), max(1, numba.config.NUMBA_NUM_THREADS))
    # Per-call use (threads= on every search, or the process setting) must cost microseconds:
    # when this thread's numba count (as annlib last set it) and BLAS already are n, there is
    # nothing to change or restore.
    if getattr(_numba_in_thread, "n", None) == n and blas_settled_at(n):
        yield
        return
    previous = numba.get_num_threads()
    if previous != n:
        numba.set_num_threads(n)
    _numba_in_thread.n = n
    try:
        with blas_limit(n):
            yield
    finally:
        if previous != n:
            numba.set_num_threads(previous)
        _numba_in_thread.n = previous
