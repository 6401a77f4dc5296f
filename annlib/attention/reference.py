"""Full attention (the reference every selector is measured against) and partial results.

``full_attention`` reads every cached key and value; ``partial_attention`` does the same over one
part of the cache and keeps the running maximum and exp-sum, so that parts computed separately
(shards, devices, a retrieved set and a recent window) combine exactly with :func:`combine`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from .. import _validation as V
from ..kernels.attention import merge_partials

__all__ = ["full_attention", "partial_attention", "combine", "Partial", "default_scale"]

# Rows of keys scored per block: bounds the score matrix at (queries x block) whatever n is.
_BLOCK = 16384


class Partial(NamedTuple):
    """Attention over one part of the keys, in a form that merges exactly.

    Attributes
    ----------
    output : float32 (query_heads, m, dv)
        Softmax-weighted value average over the part.
    max : float64 (query_heads, m)
        Largest scaled score in the part (``-inf`` for an empty part).
    sum : float64 (query_heads, m)
        ``sum exp(score - max)`` over the part.
    """

    output: np.ndarray
    max: np.ndarray
    sum: np.ndarray

    @property
    def log_normalizer(self) -> np.ndarray:
        """``log sum exp(score)`` over the part (``-inf`` when empty)."""
        with np.errstate(divide="ignore"):
            return self.max + np.log(self.sum)


def default_scale(d: int) -> float:
    """The standard ``1 / sqrt(d)`` score scale."""
    return 1.0 / float(np.sqrt(d))


def _prepare(q, keys, values, scale):
    Q, was_2d = V.as_heads(q, "q", allow_2d=True)
    K, _ = V.as_heads(keys, "keys")
    Vv, _ = V.as_heads(values, "values")
    V.check_kv_pair(K, Vv)
    V.check_query_heads(Q.shape[0], K.shape[0], Q.shape[2], K.shape[2])
    s = default_scale(K.shape[2]) if scale is None else V.check_float("scale", scale, 0.0, low_open=True)
    return Q, K, Vv, s, was_2d


def _partial(Q, K, Vv, s) -> Partial:
    kvh, n, _ = K.shape
    qh, m, _ = Q.shape
    group = qh // kvh
    out = np.empty((qh, m, Vv.shape[2]), dtype=np.float32)
    mx = np.empty((qh, m), dtype=np.float64)
    sm = np.empty((qh, m), dtype=np.float64)
    for h in range(kvh):
        Qg = Q[h * group:(h + 1) * group].reshape(group * m, -1).astype(np.float64)
        run_m = np.full(group * m, -np.inf)
        run_l = np.zeros(group * m)
        acc = np.zeros((group * m, Vv.shape[2]))
        # blocks merged on the fly (the same log-sum-exp rule as combine) keep memory bounded
        for lo in range(0, n, _BLOCK):
            S = (Qg @ K[h, lo:lo + _BLOCK].T.astype(np.float64)) * s
            bm = S.max(axis=1)
            new_m = np.maximum(run_m, bm)
            W = np.exp(S - new_m[:, None])
            shrink = np.exp(run_m - new_m)
            run_l = run_l * shrink + W.sum(axis=1)
            acc = acc * shrink[:, None] + W @ Vv[h, lo:lo + _BLOCK].astype(np.float64)
            run_m = new_m
        out[h * group:(h + 1) * group] = (acc / run_l[:, None]).reshape(group, m, -1)
        mx[h * group:(h + 1) * group] = run_m.reshape(group, m)
        sm[h * group:(h + 1) * group] = run_l.reshape(group, m)
    return Partial(out, mx, sm)


def full_attention(q, keys, values, *, scale: float | None = None) -> np.ndarray:
    """Softmax attention of every query over every cached key (the reference).

    Parameters
    ----------
    q : array-like (query_heads, m, d) or (query_heads, d)
        Queries; ``query_heads`` a multiple of the KV heads (query head ``h`` reads KV head
        ``h // (query_heads // kv_heads)``).
    keys : array-like (kv_heads, n, d)
    values : array-like (kv_heads, n, dv)
    scale : float, optional
        Score multiplier; default ``1 / sqrt(d)``.

    Returns
    -------
    float32 (query_heads, m, dv), or (query_heads, dv) for 2-D ``q``.
        Computed in float64 and rounded once.

    Raises
    ------
    TypeError, ValueError, DimensionMismatchError
        Bad shapes, dtypes, NaN/inf, or heads that do not group.
    """
    Q, K, Vv, s, was_2d = _prepare(q, keys, values, scale)
    out = _partial(Q, K, Vv, s).output
    return out[:, 0] if was_2d else out


def partial_attention(q, keys, values, *, scale: float | None = None) -> Partial:
    """Attention over one part of a cache, keeping what an exact merge needs.

    Parameters and errors as :func:`full_attention`; ``q`` must be 3-D.

    Returns
    -------
    Partial
        ``(output, max, sum)``; :func:`combine` merges several into the attention over their union.
    """
    Q, K, Vv, s, _ = _prepare(q, keys, values, scale)
    return _partial(Q, K, Vv, s)


def combine(parts: Sequence[Partial]) -> Partial:
    """Merge attention over disjoint parts of a cache by the log-sum-exp rule (exact).

    Parameters
    ----------
    parts : sequence of Partial
        Results over disjoint key sets for the same queries.

    Returns
    -------
    Partial
        The attention over the union of the parts.

    Raises
    ------
    ValueError
        No parts, or parts whose shapes differ.
    """
    parts = list(parts)
    V.check_partials([p.output.shape for p in parts])
    out, mx, sm = merge_partials([p.output for p in parts], [p.max for p in parts], [p.sum for p in parts])
    return Partial(out, mx, sm)
