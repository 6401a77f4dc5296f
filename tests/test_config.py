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
