"""Johnson-Lindenstrauss sketching: projection sizes, reproducible Gaussian columns, copy choice.

Plain numpy: everything here runs once per build, per metric update or per query batch, on
arrays of size ``copies x m x p`` or smaller (the keyed hash of the copy choice is a numba
kernel in :mod:`annlib.kernels.siphash`). The heavy per-point work lives in
:mod:`annlib.kernels.sketch`.

A projection ``Pi`` (``m x p``, entries ``N(0, 1/m)``) maps ``v`` to ``Pi v`` with
``||Pi v||^2 / ||v||^2 ~ chi2(m) / m`` exactly, so the sketch size needed for a target error and
failure probability can be computed exactly instead of from a constant-factor bound.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pair_failure", "sketch_size", "gaussian_columns", "query_keys", "choose_copies", "HEADROOM"]

MAX_SKETCH = 1 << 16  # sizes above this are never useful: a dense transform is cheaper

# The default sketch size is chosen for a miss probability of HEADROOM * delta, not delta. The
# chi-square/binomial rule is exact per estimate, but a measured fraction is an average over a few
# queries whose n estimates share that query's copies (and over a build's L fixed copies), so it
# scatters around its expectation: with m sized for exactly delta, MNIST's fraction within eps
# measured 0.947-0.955 over eight seeds (200 queries each) around an expected 0.951. The headroom
# (0.01 at delta = 0.05) is 2-4 standard errors of such a measurement with 50-200 queries; it
# costs 5-10% more rows.
HEADROOM = 0.8


def pair_failure(m: int, eps: float, votes: int) -> float:
    """Probability that the median of ``votes`` independent size-``m`` sketches misses (1 +- eps).

    For one fixed pair: a single copy estimates the distance with ratio ``sqrt(chi2(m)/m)``; the
    median of an odd number of copies fails low (high) exactly when more than half of them do.

    Parameters
    ----------
    m : int
        Rows per sketch copy.
    eps : float
        Relative error, 0 < eps < 1.
    votes : int
        Copies combined by the median (odd).

    Returns
    -------
    float
        ``P(|estimate / distance - 1| > eps)``.
    """
    from scipy.stats import binom, chi2  # lazy: `import annlib` stays light

    p_low = float(chi2.cdf(m * (1.0 - eps) ** 2, m))
    p_high = float(chi2.sf(m * (1.0 + eps) ** 2, m))
    half = votes // 2  # the median fails low iff at least half + 1 copies are low
    return float(binom.sf(half, votes, p_low) + binom.sf(half, votes, p_high))


def sketch_size(eps: float, delta: float, votes: int = 1, headroom: float = HEADROOM) -> int:
    """Smallest ``m`` with :func:`pair_failure` ``(m, eps, votes) <= headroom * delta``.

    Parameters
    ----------
    eps : float
        Relative distance error, 0 < eps < 1.
    delta : float
        Allowed failure probability per estimated distance, 0 < delta < 1. For all ``n``
        distances of a query to hold at once with probability ``1 - delta``, pass ``delta / n``.
    votes : int, default 1
        Copies combined by the median per query (odd).
    headroom : float, default HEADROOM (0.8)
        Fraction of ``delta`` the expected miss rate is sized for, in (0, 1]; 1 gives the
        smallest ``m`` whose expected miss rate is exactly at most ``delta`` (a measured rate then
        exceeds ``delta`` about half the time), below 1 leaves room for the measurement's scatter.

    Returns
    -------
    int
        Rows per copy, at most :data:`MAX_SKETCH`.
    """
    delta = delta * headroom
    if pair_failure(MAX_SKETCH, eps, votes) > delta:
        return MAX_SKETCH
    lo, hi = 0, MAX_SKETCH  # invariant: fails at lo (or lo == 0), holds at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pair_failure(mid, eps, votes) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def gaussian_columns(seed: int, columns: np.ndarray, copies: int, m: int) -> np.ndarray:
    """Columns of the ``copies`` projection matrices, each drawn from its own seeded stream.

    Column ``a`` of every copy depends only on ``(seed, a)``, so a factor that gains a row later
    gets the same projection as a factor built with that row from the start: updates and a fresh
    build agree exactly in their randomness.

    Parameters
    ----------
    seed : int
        The index's root seed (non-negative).
    columns : array of int
        Which columns (= rows of the metric factor) to draw.
    copies, m : int
        Number of sketch copies and rows per copy.

    Returns
    -------
    ndarray float64, shape (copies, m, len(columns))
        Entries ``N(0, 1/m)``.
    """
    out = np.empty((copies, m, len(columns)), dtype=np.float64)
    scale = 1.0 / np.sqrt(m)
    for t, a in enumerate(np.asarray(columns, dtype=np.int64)):
        rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(0, int(a))))
        out[:, :, t] = rng.standard_normal((copies, m)) * scale
    return out


def query_keys(seed: int) -> bytes:
    """The secret key that turns queries into copy choices (32 bytes derived from ``seed``)."""
    return np.random.SeedSequence(int(seed), spawn_key=(1,)).generate_state(8, np.uint32).tobytes()


def choose_copies(Q: np.ndarray, key: bytes, copies: int, votes: int) -> np.ndarray:
    """Per query, ``votes`` distinct copies out of ``copies``, chosen by a keyed hash of the query.

    SipHash-2-4 keyed with the first 16 bytes of ``key`` is a pseudo-random function: without the
    key, the choice for a new query is unpredictable from earlier answers, which is what adaptive
    queries need; with it, the same query always gets the same copies, so searches are
    reproducible, need no shared mutable generator (concurrent searches stay safe) and a saved
    index answers exactly as before. Cost: one pass over the query bytes (~2 us per 784-d query).

    Parameters
    ----------
    Q : float32 (q, d)
    key : bytes
        From :func:`query_keys` (at least 16 bytes).
    copies, votes : int
        ``1 <= votes <= copies``.

    Returns
    -------
    ndarray int64, shape (q, votes)
    """
    from .siphash import keyed_choices, siphash24_rows  # numba kernels, compiled on first use

    nq, nbytes = Q.shape[0], Q.shape[1] * Q.itemsize
    words = np.zeros((nq, nbytes // 8 + 1), dtype=np.uint64)  # zero padding: exact tail bytes
    words.view(np.uint8)[:, :nbytes] = np.ascontiguousarray(Q).view(np.uint8).reshape(nq, nbytes)
    k0, k1 = np.frombuffer(key[:16], dtype=np.uint64)
    return keyed_choices(siphash24_rows(words, nbytes, k0, k1), copies, votes)
