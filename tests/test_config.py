"""Thread control sets numba and BLAS together and restores them."""

from __future__ import annotations

import numba
import pytest
from threadpoolctl import threadpool_info

import annlib


def blas_threads():
    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_set_num_threads_sets_numba_and_blas():
    original = numba.get_num_threads()
    try:
        annlib.set_num_threads(1)
        assert numba.get_num_threads() == 1 and blas_threads() == {1}
        with annlib.threads(2):
            assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
        assert numba.get_num_threads() == 1 and blas_threads() == {1}
        with annlib.threads(None):
            assert numba.get_num_threads() == 1
    finally:
        annlib.set_num_threads(original)


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-3, ValueError), (1.5, TypeError), ("2", TypeError)])
def test_bad_thread_counts(bad, exc):
    with pytest.raises(exc, match="must be"):
        annlib.set_num_threads(bad)


def test_process_setting_applies_in_other_threads():
    # numba counts threads per Python thread; annlib's process setting must reach every thread.
    import threading

    from annlib import config

    original = numba.get_num_threads()
    seen = []
    try:
        annlib.set_num_threads(1)

        def worker():
            with config.threads(None):
                seen.append(numba.get_num_threads())

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen == [1]
    finally:
        annlib.set_num_threads(original)


def test_overlapping_thread_blocks_restore_blas():
    # blas_limit blocks entered and left in several threads at once must leave BLAS as they found
    # it, and while any block runs BLAS never exceeds the smallest count asked for.
    import threading

    from annlib.kernels.threads import blas_limit

    before = blas_threads()
    barrier = threading.Barrier(4)
    errors = []

    def worker(n):
        try:
            for _ in range(200):
                with blas_limit(n):
                    barrier.wait(timeout=10) if _ == 0 else None
                    if max(blas_threads()) > 2:
                        errors.append(blas_threads())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(1 + i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert blas_threads() == before


def test_release_free_memory_never_raises_and_says_whether_it_trimmed():
    from annlib._memory import release_free_memory

    first = release_free_memory()
    assert isinstance(first, bool) and release_free_memory() == first  # the second call reuses the lookup
