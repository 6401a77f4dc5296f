"""SipHash-2-4 of array rows and keyed choices of sketch copies from it.

SipHash (Aumasson & Bernstein, 2012) is a keyed pseudo-random function: without the 128-bit key
its output for a new input cannot be predicted from outputs seen before. Hashing each query row
with it gives per-query randomness that is fresh for an adversary yet reproducible for the
index, in a few microseconds per query instead of a Python-level hash call per row.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["siphash24_rows", "keyed_choices"]


@numba.njit(inline="always")
def _rotl(x, b):
    return (x << np.uint64(b)) | (x >> np.uint64(64 - b))


@numba.njit(inline="always")
def _round(v0, v1, v2, v3):
    v0 += v1
    v1 = _rotl(v1, 13)
    v1 ^= v0
    v0 = _rotl(v0, 32)
    v2 += v3
    v3 = _rotl(v3, 16)
    v3 ^= v2
    v0 += v3
    v3 = _rotl(v3, 21)
    v3 ^= v0
    v2 += v1
    v1 = _rotl(v1, 17)
    v1 ^= v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


@numba.njit(cache=True, nogil=True)
def siphash24_rows(words, nbytes, k0, k1):
    """SipHash-2-4 of every row of a byte matrix, given as little-endian 64-bit words.

    Parameters
    ----------
    words : uint64 (q, w)
        Each row's bytes, zero-padded to ``w >= nbytes // 8 + 1`` words.
    nbytes : int
        Message length in bytes (the same for every row).
    k0, k1 : uint64
        The key (its first and second 8 bytes, little-endian).

    Returns
    -------
    ndarray uint64 (q,)
        The standard SipHash-2-4 value of each row.
    """
    out = np.empty(words.shape[0], dtype=np.uint64)
    full = nbytes // 8
    last = (np.uint64(nbytes & 0xFF)) << np.uint64(56)
    for r in range(words.shape[0]):
        v0 = k0 ^ np.uint64(0x736F6D6570736575)
        v1 = k1 ^ np.uint64(0x646F72616E646F6D)
        v2 = k0 ^ np.uint64(0x6C7967656E657261)
        v3 = k1 ^ np.uint64(0x7465646279746573)
        row = words[r]
        for t in range(full + 1):
            m = row[t] if t < full else (row[t] | last)  # the padding makes the tail bytes exact
            v3 ^= m
            v0, v1, v2, v3 = _round(v0, v1, v2, v3)
            v0, v1, v2, v3 = _round(v0, v1, v2, v3)
            v0 ^= m
        v2 ^= np.uint64(0xFF)
        for _ in range(4):
            v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        out[r] = v0 ^ v1 ^ v2 ^ v3
    return out


@numba.njit(cache=True, nogil=True)
def keyed_choices(h, copies, votes):
    """Per row, ``votes`` distinct values of ``[0, copies)`` drawn from the 64-bit seed ``h[r]``.

    A partial Fisher-Yates shuffle driven by the SplitMix64 sequence started at ``h[r]``: the
    keyed hash supplies the unpredictability, SplitMix64 only stretches its 64 bits.

    Returns
    -------
    ndarray int64 (q, votes)
    """
    out = np.empty((h.shape[0], votes), dtype=np.int64)
    perm = np.empty(copies, dtype=np.int64)
    for r in range(h.shape[0]):
        for a in range(copies):
            perm[a] = a
        state = h[r]
        for s in range(votes):
            state += np.uint64(0x9E3779B97F4A7C15)
            z = state
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z ^= z >> np.uint64(31)
            j = s + np.int64(z % np.uint64(copies - s))
            perm[s], perm[j] = perm[j], perm[s]
            out[r, s] = perm[s]
    return out
