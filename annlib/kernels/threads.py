"""Thread plumbing shared by the kernels: BLAS thread limits and a worker pool.

BLAS pools and numba's pool both spin while idle; when they alternate (GEMM, then a numba pass)
with more than one thread each, they steal cores from each other and small blocks slow down by
orders of magnitude on a busy machine. Multi-threaded kernels therefore run their own workers, each
calling single-threaded BLAS and serial numba code, and this module provides the two pieces.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["blas_controllers", "blas_limit", "assume_blas_threads", "worker_pool"]

_blas_libs = None
_assumed: int | None = None  # BLAS thread count last set through this module
_pools: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def blas_controllers(refresh: bool = False) -> list:
    """threadpoolctl controllers of the loaded BLAS libraries, found once (finding costs ~0.1 ms).

    ``refresh=True`` looks again, to pick up libraries loaded since.
    """
    global _blas_libs
    if _blas_libs is None or refresh:
        from threadpoolctl import ThreadpoolController

        _blas_libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _blas_libs


class blas_limit:
    """Context manager: every known BLAS library at ``n`` threads inside the block, then restore.

    Per-call use must cost microseconds: when the last setting made through this module already
    is ``n`` nothing is queried or changed; otherwise only libraries whose setting differs are
    touched, through controllers found once.
    """

    __slots__ = ("n", "changed", "outer")

    def __init__(self, n: int):
        self.n = n
        self.changed = ()
        self.outer = None

    def __enter__(self):
        global _assumed
        self.outer = _assumed
        if _assumed == self.n:
            return self
        changed = [(lib, lib.get_num_threads()) for lib in blas_controllers()]
        self.changed = [(lib, old) for lib, old in changed if old != self.n]
        for lib, _ in self.changed:
            lib.set_num_threads(self.n)
        _assumed = self.n
        return self

    def __exit__(self, *exc):
        global _assumed
        for lib, old in self.changed:
            lib.set_num_threads(old)
        _assumed = self.outer
        return False


def assume_blas_threads(n: int | None) -> None:
    """Record that every BLAS library now runs ``n`` threads (None: unknown, query next time)."""
    global _assumed
    _assumed = n


def worker_pool(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``n`` worker threads, created on first use and reused."""
    with _pool_lock:
        pool = _pools.get(n)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="annlib-worker")
            _pools[n] = pool
        return pool
