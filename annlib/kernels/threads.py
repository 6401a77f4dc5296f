"""Thread plumbing shared by the kernels: BLAS thread limits and a worker pool.

BLAS pools and numba's pool both spin while idle; when they alternate (GEMM, then a numba pass)
with more than one thread each, they steal cores from each other and small blocks slow down by
orders of magnitude on a busy machine. Multi-threaded kernels therefore run their own workers, each
calling single-threaded BLAS and serial numba code, and this module provides the two pieces.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

__all__ = ["blas_controllers", "blas_limit", "worker_pool"]

_blas_libs = None
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


@contextlib.contextmanager
def blas_limit(n: int) -> Iterator[None]:
    """Run the block with every known BLAS library at ``n`` threads, then restore.

    Only libraries whose setting differs are touched, so the common case costs microseconds.
    """
    changed = [(lib, lib.get_num_threads()) for lib in blas_controllers()]
    changed = [(lib, old) for lib, old in changed if old != n]
    for lib, _ in changed:
        lib.set_num_threads(n)
    try:
        yield
    finally:
        for lib, old in changed:
            lib.set_num_threads(old)


def worker_pool(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``n`` worker threads, created on first use and reused."""
    with _pool_lock:
        pool = _pools.get(n)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="annlib-worker")
            _pools[n] = pool
        return pool
