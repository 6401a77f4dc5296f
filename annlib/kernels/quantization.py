"""Vector quantization: 4-bit product quantization (plain or anisotropic), 8-bit lookup tables,
and symmetric int8 scalar quantization (docs/partitioned.md, step 3).

Product quantization splits a (zero-padded) vector into ``M`` sub-spaces of ``w`` dimensions and
stores, per sub-space, the index of one of 16 codewords (4 bits). ``M`` is always even so two codes
share one byte (:func:`pad_dim`). Codes of a point set are packed in blocks of 32 points,
transposed so that one byte column holds the same code pair of 32 consecutive points
(:func:`pack_codes`); :mod:`annlib.kernels.fastscan` scans that layout.

Scores are inner products: a query's table holds ``-<q_s, codeword>`` per sub-space and code
(smaller is better, as every proxy in annlib). Tables are quantized to 8 bits with a per-sub-space
offset and one scale per query chosen so that the sum over all sub-spaces fits 16 bits, which
makes the scan exact integer arithmetic.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np

from .cluster import kmeans_small
from .threads import run_split

__all__ = [
    "CODEWORDS",
    "LookupTables",
    "pad_dim",
    "pad_columns",
    "train_codebooks",
    "encode_nearest",
    "encode_anisotropic",
    "parallel_cost_multiplier",
    "split_residual_error",
    "pack_codes",
    "unpack_codes",
    "unpack_decode",
    "pq_errors",
    "build_luts",
    "int8_fit",
    "int8_encode",
    "int8_errors",
]

CODEWORDS = 16  # 4-bit codes
ACC_MAX = 65535  # 16-bit unsigned accumulators


class LookupTables(NamedTuple):
    """8-bit lookup tables of a batch of queries (:func:`build_luts`).

    Attributes
    ----------
    tables : uint8 (nq, M, 16)
        ``tables[q, s, j] = round((F[q, s, j] - min_j F[q, s, j]) / scale[q])`` with
        ``F[q, s, j] = -<q_s, codeword_j>``.
    scale : float32 (nq,)
        Value of one table unit.
    base : float32 (nq,)
        Sum of the per-sub-space minima: an accumulated sum ``acc`` stands for
        ``acc * scale + base``.
    """

    tables: np.ndarray
    scale: np.ndarray
    base: np.ndarray


def pad_dim(d: int, w: int) -> int:
    """Smallest ``d' >= d`` that splits into an even number of ``w``-wide sub-spaces."""
    return int(math.ceil(d / (2 * w)) * 2 * w)


def pad_columns(X: np.ndarray, d_pad: int) -> np.ndarray:
    """``X`` with zero columns appended up to ``d_pad`` (float32, C-contiguous)."""
    if X.shape[1] == d_pad:
        return np.ascontiguousarray(X, dtype=np.float32)
    out = np.zeros((X.shape[0], d_pad), dtype=np.float32)
    out[:, : X.shape[1]] = X
    return out


def train_codebooks(R: np.ndarray, w: int, *, iters: int, rng: np.random.Generator, threads: int = 1) -> np.ndarray:
    """Train 16 codewords per sub-space by plain k-means (ScaNN's default).

    Parameters
    ----------
    R : float32 (n, d_pad)
        Training vectors (residuals in the partitioned index), ``d_pad`` a multiple of ``2 w``.
    w : int
        Dimensions per sub-space.
    iters : int
        Lloyd rounds.
    rng : numpy Generator
        Chooses the initial codewords (distinct training rows).
    threads : int, default 1
        Worker threads, each training a range of the sub-spaces (the result does not depend on it).

    Returns
    -------
    float32 (M, 16, w)
    """
    n, d_pad = R.shape
    M = d_pad // w
    Xs = np.ascontiguousarray(R.reshape(n, M, w).transpose(1, 0, 2))
    k = CODEWORDS
    rows = rng.choice(n, k, replace=n < k)
    init = np.ascontiguousarray(Xs[:, rows, :])
    return kmeans_small(Xs, init, iters, threads)


@numba.njit(inline="always", cache=True, nogil=True)
def _nearest_codes(r, cb, codes):
    M, k, w = cb.shape
    for s in range(M):
        best = np.inf
        arg = 0
        for j in range(k):
            acc = np.float32(0.0)
            for t in range(w):
                diff = r[s * w + t] - cb[s, j, t]
                acc += diff * diff
            if acc < best:
                best = acc
                arg = j
        codes[s] = arg


# Fewest rows a worker thread of the encoders gets.
MIN_SPLIT_ROWS = 1024


@numba.njit(cache=True, nogil=True)
def _encode_nearest_rows(R, cb, out, lo, hi):
    for i in range(lo, hi):
        _nearest_codes(R[i], cb, out[i])


def encode_nearest(R, cb, threads=1):
    """Plain PQ codes: the nearest codeword of every sub-space. uint8 (n, M).

    ``threads`` splits the rows over worker threads (the codes do not depend on it).
    """
    out = np.empty((R.shape[0], cb.shape[0]), dtype=np.uint8)
    run_split(lambda lo, hi: _encode_nearest_rows(R, cb, out, lo, hi), R.shape[0], threads, MIN_SPLIT_ROWS)
    return out


def encode_anisotropic(R, U, cb, eta, rounds, threads=1):
    """Anisotropic (score-aware) PQ codes by coordinate descent (Guo et al., ICML 2020).

    Minimises ``eta ||e_par||^2 + ||e_perp||^2`` where ``e = r - r~`` is the quantization error
    and the parallel direction is the unit *original* vector ``u`` (not the residual).

    Parameters
    ----------
    R : float32 (n, d_pad)
        Vectors to encode (residuals).
    U : float32 (n, d_pad)
        Unit original vectors giving the parallel direction (zero rows: plain PQ).
    cb : float32 (M, 16, w)
    eta : float32 (n,)
        Parallel cost multiplier per point (>= 1; 1 gives plain PQ).
    rounds : int
        Maximum sweeps over the sub-spaces (stops early when no code changes).
    threads : int, default 1
        Worker threads, each coding a contiguous range of the rows (the codes do not depend on it).

    Returns
    -------
    uint8 (n, M)
    """
    out = np.empty((R.shape[0], cb.shape[0]), dtype=np.uint8)
    run_split(lambda lo, hi: _encode_anisotropic_rows(R, U, cb, eta, rounds, out, lo, hi), R.shape[0], threads,
              MIN_SPLIT_ROWS)
    return out


@numba.njit(cache=True, nogil=True)
def _encode_anisotropic_rows(R, U, cb, eta, rounds, out, lo, hi):
    """:func:`encode_anisotropic` of the rows ``lo .. hi`` into ``out``."""
    M, k, w = cb.shape
    for i in range(lo, hi):
        r = R[i]
        u = U[i]
        codes = out[i]
        _nearest_codes(r, cb, codes)
        if eta[i] == 1.0:
            continue
        # running totals of the error e = r - r~: its squared norm and <e, u>
        enorm = 0.0
        par = 0.0
        for s in range(M):
            c = codes[s]
            for t in range(w):
                e = r[s * w + t] - cb[s, c, t]
                enorm += e * e
                par += e * u[s * w + t]
        h = eta[i]
        for _ in range(rounds):
            changed = False
            for s in range(M):
                c = codes[s]
                old_n = 0.0
                old_p = 0.0
                for t in range(w):
                    e = r[s * w + t] - cb[s, c, t]
                    old_n += e * e
                    old_p += e * u[s * w + t]
                best = np.inf
                arg = c
                best_n = 0.0
                best_p = 0.0
                for j in range(k):
                    nn = 0.0
                    pp = 0.0
                    for t in range(w):
                        e = r[s * w + t] - cb[s, j, t]
                        nn += e * e
                        pp += e * u[s * w + t]
                    tot_n = enorm - old_n + nn
                    tot_p = par - old_p + pp
                    loss = h * tot_p * tot_p + (tot_n - tot_p * tot_p)
                    if loss < best:
                        best = loss
                        arg = j
                        best_n = nn
                        best_p = pp
                if arg != c:
                    changed = True
                    codes[s] = arg
                    enorm += best_n - old_n
                    par += best_p - old_p
            if not changed:
                break


def parallel_cost_multiplier(threshold: float, sqnorms: np.ndarray, dim: int) -> np.ndarray:
    """ScaNN's per-point anisotropic weight ``eta = (d-1) (T^2/||x||^2) / (1 - T^2/||x||^2)``.

    Clamped to ``[1, 1e4]``: below 1 the loss would favour parallel error (the opposite of the
    intent) and ``T >= ||x||`` would make it infinite or negative.

    Returns
    -------
    float32 (n,)
    """
    ratio = (threshold * threshold) / np.maximum(np.asarray(sqnorms, dtype=np.float64), 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = (dim - 1) * ratio / (1.0 - ratio)
    eta = np.where((ratio >= 1.0) | ~np.isfinite(eta), 1e4, eta)
    return np.clip(eta, 1.0, 1e4).astype(np.float32)


def split_residual_error(R: np.ndarray, codes: np.ndarray, cb: np.ndarray, U: np.ndarray):
    """Mean squared parallel and orthogonal quantization error (diagnostics and tests).

    Returns
    -------
    (float, float)
        ``mean ||e_par||^2`` and ``mean ||e_perp||^2`` with ``e = R - decode(codes)`` and the
        parallel direction given by the unit rows of ``U``.
    """
    E = R - unpack_decode(codes, cb)
    par = np.einsum("ij,ij->i", E, U)
    tot = np.einsum("ij,ij->i", E, E)
    return float(np.mean(par * par)), float(np.mean(tot - par * par))


def unpack_decode(codes: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Reconstruct float32 (n, M*w) vectors from uint8 (n, M) codes."""
    M, _, w = cb.shape
    return cb[np.arange(M)[None, :], codes.astype(np.int64)].reshape(codes.shape[0], M * w)


def pq_errors(R: np.ndarray, codes: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Quantization error ``||r - decode(code)||`` of every row (float32 (n,)).

    Parameters
    ----------
    R : float32 (n, M*w)
        Encoded vectors (zero-padded residuals).
    codes : uint8 (n, M)
    cb : float32 (M, 16, w)
    """
    E = R - unpack_decode(codes, cb)
    return np.sqrt(np.einsum("ij,ij->i", E, E, dtype=np.float64)).astype(np.float32)


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """Pack uint8 (n, M) 4-bit codes, ``n`` a multiple of 32, into blocks (n/32, M/2, 32).

    Byte ``[b, j, p]`` holds the codes of sub-spaces ``2j`` (low nibble) and ``2j+1`` (high
    nibble) of point ``32 b + p``.
    """
    n, M = codes.shape
    pairs = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(pairs.reshape(n // 32, 32, M // 2).transpose(0, 2, 1))


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 (n, M)."""
    nb, M2, _ = packed.shape
    pairs = packed.transpose(0, 2, 1).reshape(nb * 32, M2)
    out = np.empty((nb * 32, 2 * M2), dtype=np.uint8)
    out[:, 0::2] = pairs & 15
    out[:, 1::2] = pairs >> 4
    return out


@numba.njit(cache=True, nogil=True)
def _build_luts_rows(Q, cb, T, scale, base, lo, hi):
    # The table values are formed in float64: float32 products of two entries near 1e-20 would
    # underflow and those near the float32-safe limit would leave no room for the offsets, and
    # the scale is then chosen so that rounding can never push a 16-bit sum past 65535.
    # Eight queries or more go through _luts_across_subspaces (the same values, faster); a few
    # (the one-query kernels) would spend more on its set-up than they gain.
    if hi - lo >= 8:
        _luts_across_subspaces(Q, cb, T, scale, base, lo, hi)
        return
    M, k, w = cb.shape
    G = np.empty((M, k), dtype=np.float64)
    limit = 65535.0 - M  # each of the M rounded entries may add 1/2 unit
    for q in range(lo, hi):
        gmax = 0.0
        gsum = 0.0
        bsum = 0.0
        for s in range(M):
            mn = np.inf
            for j in range(k):
                acc = 0.0
                for t in range(w):
                    acc += np.float64(Q[q, s * w + t]) * np.float64(cb[s, j, t])
                G[s, j] = -acc
                if -acc < mn:
                    mn = -acc
            mx = 0.0
            for j in range(k):
                G[s, j] -= mn
                if G[s, j] > mx:
                    mx = G[s, j]
            bsum += mn
            gsum += mx
            if mx > gmax:
                gmax = mx
        a = 1.0
        if gmax > 0.0:
            a = 255.0 / gmax
            if gsum * a > limit:
                a = limit / gsum
        for s in range(M):
            for j in range(k):
                v = np.floor(G[s, j] * a + 0.5)
                if v > 255.0:
                    v = 255.0
                T[q, s, j] = np.uint8(v)
        # a > 0 and finite here (float64 cannot overflow on float32 inputs); a scale that
        # underflows float32 only makes every sum of this query score alike
        scale[q] = np.float32(1.0 / a)
        base[q] = np.float32(bsum)


@numba.njit(cache=True, nogil=True)
def _luts_across_subspaces(Q, cb, T, scale, base, lo, hi):
    # _build_luts_rows's values, each step running across the M sub-spaces (sub-space last in
    # the scratch arrays) so that it vectorises: every value is formed by the same operations
    # in the same order (products summed over t in order, minimum and maximum over j in order
    # with the same strict compares), only the loops are exchanged. The per-sub-space loops of
    # 16 codewords with a branch per compare took 1.2-1.4 us per glove-50 query and 2.7-3.2 us
    # per kdewall-128 one; this 0.8 and 1.2 us, with bit-identical tables.
    M, k, w = cb.shape
    cbt = np.empty((k, w, M), dtype=np.float64)
    for s in range(M):
        for j in range(k):
            for t in range(w):
                cbt[j, t, s] = np.float64(cb[s, j, t])
    qt = np.empty((w, M), dtype=np.float64)
    G = np.empty((k, M), dtype=np.float64)
    U = np.empty((k, M), dtype=np.uint8)
    mn = np.empty(M, dtype=np.float64)
    mx = np.empty(M, dtype=np.float64)
    limit = 65535.0 - M  # each of the M rounded entries may add 1/2 unit
    for q in range(lo, hi):
        for s in range(M):
            for t in range(w):
                qt[t, s] = np.float64(Q[q, s * w + t])
        for s in range(M):
            mn[s] = np.inf
            mx[s] = 0.0
        for j in range(k):
            g = G[j]
            for s in range(M):
                g[s] = 0.0
            for t in range(w):
                c = cbt[j, t]
                x = qt[t]
                for s in range(M):
                    g[s] += x[s] * c[s]
            for s in range(M):
                v = -g[s]
                g[s] = v
                mn[s] = v if v < mn[s] else mn[s]
        for j in range(k):
            g = G[j]
            for s in range(M):
                v = g[s] - mn[s]
                g[s] = v
                mx[s] = v if v > mx[s] else mx[s]
        gmax = 0.0
        gsum = 0.0
        bsum = 0.0
        for s in range(M):
            bsum += mn[s]
            gsum += mx[s]
            if mx[s] > gmax:
                gmax = mx[s]
        a = 1.0
        if gmax > 0.0:
            a = 255.0 / gmax
            if gsum * a > limit:
                a = limit / gsum
        for j in range(k):
            g = G[j]
            u = U[j]
            for s in range(M):
                u[s] = np.uint8(min(np.floor(g[s] * a + 0.5), 255.0))
        for s in range(M):
            for j in range(k):
                T[q, s, j] = U[j, s]
        scale[q] = np.float32(1.0 / a)
        base[q] = np.float32(bsum)


def build_luts(Q: np.ndarray, cb: np.ndarray, threads: int = 1):
    """Per-query 8-bit lookup tables of ``-<q_s, codeword>`` (read by ``lut16``).

    Parameters
    ----------
    Q : float32 (nq, d_pad)
    cb : float32 (M, 16, w)
    threads : int, default 1
        Worker threads, each building the tables of a contiguous range of the queries.

    Returns
    -------
    LookupTables
        ``(tables, scale, base)``; unpacks like a tuple.
    """
    nq = Q.shape[0]
    M = cb.shape[0]
    T = np.empty((nq, M, CODEWORDS), dtype=np.uint8)
    scale = np.empty(nq, dtype=np.float32)
    base = np.empty(nq, dtype=np.float32)
    run_split(lambda lo, hi: _build_luts_rows(Q, cb, T, scale, base, lo, hi), nq, threads, 32)
    return LookupTables(T, scale, base)


def int8_fit(R: np.ndarray) -> np.ndarray:
    """Per-dimension symmetric int8 multipliers ``127 / max |r_j|`` (1 for all-zero columns)."""
    amax = np.abs(R).max(axis=0)
    return np.where(amax > 0, 127.0 / np.maximum(amax, 1e-30), 1.0).astype(np.float32)


def int8_encode(R: np.ndarray, mult: np.ndarray) -> np.ndarray:
    """Symmetric int8 codes ``round(r_j * mult_j)`` clipped to [-127, 127]."""
    return np.clip(np.rint(R * mult[None, :]), -127, 127).astype(np.int8)


def int8_errors(R: np.ndarray, codes: np.ndarray, mult: np.ndarray) -> np.ndarray:
    """Quantization error ``||r - codes / mult||`` of every row (float32 (n,)).

    Clipping makes it large for residuals beyond the range the multipliers were fitted on.
    """
    E = R - codes.astype(np.float32) / mult[None, :]
    return np.sqrt(np.einsum("ij,ij->i", E, E, dtype=np.float64)).astype(np.float32)
