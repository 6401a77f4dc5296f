"""Thread plumbing shared by the kernels: BLAS thread limits and a worker pool.

BLAS pools and numba's pool both spin while idle; when they alternate (GEMM, then a numba pass)
with more than one thread each, they steal cores from each other and small blocks slow down by
orders of magnitude on a busy machine. Multi-threaded kernels therefore run their own workers, each
calling single-threaded BLAS and serial numba code, and this module provides the two pieces.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

__all__ = ["blas_controllers", "blas_limit", "blas_settled_at", "assume_blas_threads", "worker_pool",
           "split_ranges", "run_split"]

_blas_libs = None
_assumed: int | None = None  # BLAS thread count last set through this module
_pools: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()
_in_worker = threading.local()  # set in the threads of the pools below while they run a task


def blas_controllers(refresh: bool = False) -> list:
    """threadpoolctl controllers of the loaded BLAS libraries, found once (finding costs ~0.1 ms).

    ``refresh=True`` looks again, to pick up libraries loaded since.
    """
    global _blas_libs
    if _blas_libs is None or refresh:
        from threadpoolctl import ThreadpoolController

        _blas_libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _blas_libs


# BLAS thread counts are process-wide, while blas_limit blocks run in many threads at once: the
# blocks in flight are counted under one lock, BLAS runs the smallest count any of them asked for
# (never more threads than a caller allowed), and the setting found before the first block is put
# back when the last one leaves.
_blas_lock = threading.Lock()
_active: dict[int, int] = {}  # requested thread count -> blocks in flight asking for it
_saved: list = []  # (controller, threads before the first block) of libraries this module changed


def _apply_blas(n: int) -> None:
    global _assumed
    if _assumed == n:
        return
    saved = {id(lib) for lib, _ in _saved}
    for lib in blas_controllers():
        old = lib.get_num_threads()
        if old != n:
            if id(lib) not in saved:
                _saved.append((lib, old))
            lib.set_num_threads(n)
    _assumed = n


class blas_limit:
    """Context manager: every known BLAS library at ``n`` threads inside the block, then restore.

    Safe when blocks overlap in several threads (see the note above). Per-call use must cost
    microseconds: when the setting already is ``n`` nothing is queried or changed; otherwise only
    libraries whose setting differs are touched, through controllers found once.
    """

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        with _blas_lock:
            if not _active:
                _saved.clear()
            _active[self.n] = _active.get(self.n, 0) + 1
            _apply_blas(min(_active))
        return self

    def __exit__(self, *exc):
        global _assumed
        with _blas_lock:
            left = _active[self.n] - 1
            if left:
                _active[self.n] = left
            else:
                del _active[self.n]
            if _active:
                _apply_blas(min(_active))
            else:
                for lib, old in _saved:
                    lib.set_num_threads(old)
                if _saved:
                    _assumed = None if len({old for _, old in _saved}) > 1 else _saved[0][1]
                _saved.clear()
        return False


def blas_settled_at(n: int) -> bool:
    """Whether BLAS already runs ``n`` threads with no ``blas_limit`` block in flight (a racy
    read: a block starting meanwhile only changes the thread count of this one call)."""
    return _assumed == n and not _active


def assume_blas_threads(n: int | None) -> None:
    """Record that every BLAS library now runs ``n`` threads (None: unknown, query next time)."""
    global _assumed
    with _blas_lock:
        _assumed = n
        if _active and n is not None:
            # a process-wide setting made while blocks run is what the last block restores
            _saved[:] = [(lib, n) for lib in blas_controllers()]


def worker_pool(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``n`` worker threads, created on first use and reused."""
    with _pool_lock:
        pool = _pools.get(n)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="annlib-worker")
            _pools[n] = pool
        return pool


def split_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges ``(lo, hi)`` covering ``0 .. n`` with sizes differing by at most one."""
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _run_marked(fn, lo, hi):
    _in_worker.on = True
    try:
        return fn(lo, hi)
    finally:
        _in_worker.on = False


def run_split(fn, n: int, workers: int, min_part: int = 1) -> list:
    """``fn(lo, hi)`` over contiguous ranges of ``0 .. n``, one per worker thread; results in order.

    Each worker runs serial code end to end on its range with BLAS held at one thread (the
    model of the module note): one large chunk per thread, no synchronisation between them; the
    calling thread is the first worker (the pool runs the other ranges). The
    work runs as one range on the calling thread (BLAS untouched) when ``workers`` is 1, when
    fewer than ``2 * min_part`` items would leave a worker too little to do, or when the caller
    already is one of these workers (a nested split would wait on its own pool).

    Parameters
    ----------
    fn : callable
        ``fn(lo, hi)``; must release the GIL for most of its time (nogil numba, BLAS, large
        numpy operations) for the workers to overlap.
    n : int
        Items to split.
    workers : int
        Threads wanted.
    min_part : int, default 1
        Fewest items worth a worker of their own.

    Returns
    -------
    list
        ``fn``'s results, ranges in ascending order.
    """
    workers = max(1, min(int(workers), n // max(1, min_part)))
    if workers == 1 or getattr(_in_worker, "on", False):
        return [fn(0, n)]
    first, *rest = split_ranges(n, workers)
    with blas_limit(1):
        # the calling thread runs the first range itself instead of sleeping until the pool is
        # done: one thread fewer to wake per call, and no wake-up of the caller at the end
        futures = [worker_pool(workers).submit(_run_marked, fn, lo, hi) for lo, hi in rest]
        try:
            mine = _run_marked(fn, *first)
        finally:
            wait(futures)  # never leave workers writing into the caller's arrays
        return [mine] + [f.result() for f in futures]
