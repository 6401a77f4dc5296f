"""How close an exact search gets to the machine's matrix-multiply speed.

Exact k-NN over ``n`` vectors for ``q`` queries of dimension ``d`` costs at least the ``q x n``
score matrix, ``2·q·n·d`` floating-point operations. Dividing by the measured batch time gives
the achieved GFLOP/s; timing a plain float32 numpy ``Q @ X.T`` of the same shape in the same
run, with the same thread count, says what the BLAS on this machine can do, so the fraction is
comparable across machines where the absolute figure is not.
"""

from __future__ import annotations

import numpy as np

from .measures import best_time

__all__ = ["flop_count", "matmul_seconds", "exact_throughput"]

# Largest block of the score matrix materialised at once when timing the reference matmul:
# the full q x n matrix of a large set would need gigabytes. Blocking over queries does the
# same arithmetic, and a brute-force search blocks the same way.
_BLOCK_BYTES = 64 * 2**20


def flop_count(q: int, n: int, d: int) -> int:
    """Multiply-adds of the ``q x n`` score matrix, counted as 2 operations each."""
    return 2 * q * n * d


def matmul_seconds(
    train: np.ndarray,
    queries: np.ndarray,
    *,
    min_reps: int = 3,
    min_seconds: float = 0.5,
    block_bytes: int = _BLOCK_BYTES,
) -> float:
    """Best wall-clock time of the float32 product ``queries @ train.T``.

    The product is computed in query blocks into one preallocated buffer, so memory stays
    bounded; the thread count is whatever the caller's BLAS limit is.

    Parameters
    ----------
    train : ndarray, shape (n, d)
    queries : ndarray, shape (q, d)
    min_reps, min_seconds : int, float
        Best of at least ``min_reps`` repetitions spanning at least ``min_seconds``.
    block_bytes : int
        Largest score block held at once.
    """
    x = np.ascontiguousarray(train, dtype=np.float32)
    v = np.ascontiguousarray(queries, dtype=np.float32)
    rows = max(1, min(len(v), block_bytes // (4 * max(1, len(x)))))
    buf = np.empty((rows, len(x)), dtype=np.float32)
    xt = x.T

    def product():
        for lo in range(0, len(v), rows):
            hi = min(len(v), lo + rows)
            np.matmul(v[lo:hi], xt, out=buf[: hi - lo])

    product()  # warm-up: page in the buffer, let BLAS set up its threads
    seconds, _, _ = best_time(product, min_reps=min_reps, min_seconds=min_seconds)
    return seconds


def exact_throughput(
    train: np.ndarray,
    queries: np.ndarray,
    batch_seconds: float,
    *,
    metric: str = "l2",
    label: str = "",
) -> dict:
    """Achieved GFLOP/s of an exact batch search and its fraction of a plain matmul.

    Parameters
    ----------
    train, queries : ndarray
        The data searched, shaped as the search saw it.
    batch_seconds : float
        Best time of the whole query batch.
    metric : str
        Recorded only: every metric costs one matmul of this shape.
    label : str
        The index the figure belongs to.

    Returns
    -------
    dict
        ``label``, ``q``/``n``/``d``, ``gflops`` (search), ``matmul_seconds``,
        ``matmul_gflops`` and ``fraction`` = search GFLOP/s / matmul GFLOP/s.
    """
    q, (n, d) = len(queries), train.shape
    flops = flop_count(q, n, d)
    mm = matmul_seconds(train, queries)
    gflops = flops / batch_seconds / 1e9
    mm_gflops = flops / mm / 1e9
    return {"label": label, "metric": metric, "q": q, "n": n, "d": d,
            "batch_seconds": batch_seconds, "gflops": gflops,
            "matmul_seconds": mm, "matmul_gflops": mm_gflops,
            "fraction": gflops / mm_gflops}
