"""Top-k KV-cache attention in JAX for a batch of heads: TPU-KNN's approximate top-k, then the
softmax over the selected keys (ALGORITHMS §6.1), one jitted program per shape.

Same semantics as :meth:`annlib.attention.KVCache.attend` with ``selector="approx_topk"``: per
query the first ``sink`` and last ``window`` tokens are always attended, and the ``budget`` minus
those is filled with the keys of largest ``<q, k>`` among the rest, found by the bin-wise
reduction with the bin count of ``jax.lax.approx_max_k`` (:func:`annlib.accel.binning.num_bins`),
or by ``approx_max_k`` itself on TPU, where it is fused with the matmul. Query head ``h`` reads KV
head ``h // (query_heads // kv_heads)``.

Everything is a static-shape array program (no host round trip between selection and softmax),
so it runs unchanged on CPU, GPU and TPU.
"""

from __future__ import annotations

import math
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _validation as V
from .binning import num_bins
from .sharding import backend_platform

__all__ = ["attend", "full_attention", "approx_max_k"]


def approx_max_k(scores, k: int, recall_target: float, mode: str):
    """Approximate ``k`` largest of the last axis: (values, positions), best first.

    ``mode`` ``"bins"``: position ``j`` is in bin ``j mod L``; the best of each bin, then the exact
    top-``k`` of the ``L`` winners. ``"native"``: ``lax.approx_max_k``. ``"exact"``: ``lax.top_k``.
    """
    n = scores.shape[-1]
    if mode == "native":
        return lax.approx_max_k(scores, k, recall_target=recall_target)
    if mode == "exact":
        return lax.top_k(scores, k)
    bins = num_bins(n, k, recall_target)
    chunks = -(-n // bins)
    pad = chunks * bins - n
    lead = scores.shape[:-1]
    padded = jnp.pad(scores, [(0, 0)] * len(lead) + [(0, pad)], constant_values=-jnp.inf)
    folded = padded.reshape(*lead, chunks, bins)
    best = folded.max(axis=-2)
    vals, b = lax.top_k(best, k)
    # recover the winning chunk only for the k kept bins: cheaper than an arg-max over all scores
    cand = jnp.take_along_axis(folded, jnp.broadcast_to(b[..., None, :], (*lead, chunks, k)), axis=-1)
    chunk = jnp.argmax(cand, axis=-2)
    return vals, chunk * bins + b


def _group(q, kv_heads):
    qh, m, d = q.shape
    return q.reshape(kv_heads, (qh // kv_heads) * m, d)


@lru_cache(maxsize=None)
def _program(n: int, budget: int, sink: int, window: int, recall_target: float, scale: float, mode: str):
    sink_end = min(sink, n)
    win = max(sink_end, n - window)
    kept = sink_end + (n - win)
    r = budget - kept

    def run(q, keys, values):
        qh, m, _ = q.shape
        kvh = keys.shape[0]
        qg = _group(q, kvh)
        S = jnp.einsum("hqd,hnd->hqn", qg, keys, preferred_element_type=jnp.float32) * scale
        if r >= win - sink_end:  # the budget covers everything: full attention
            w = jax.nn.softmax(S, axis=-1)
            out = jnp.einsum("hqn,hnv->hqv", w, values, preferred_element_type=jnp.float32)
            return out.reshape(qh, m, -1)
        logits = jnp.concatenate([S[..., :sink_end], S[..., win:]], axis=-1)
        kept_pos = jnp.concatenate([jnp.arange(sink_end), jnp.arange(win, n)])
        kept_v = jnp.concatenate([values[:, :sink_end], values[:, win:]], axis=1)  # (h, kept, dv)
        w_all = logits
        if r > 0:
            vals, pos = approx_max_k(S[..., sink_end:win], r, recall_target, mode)
            w_all = jnp.concatenate([logits, vals], axis=-1)
        w = jax.nn.softmax(w_all, axis=-1)
        out = jnp.einsum("hqs,hsv->hqv", w[..., :kept_pos.shape[0]], kept_v, preferred_element_type=jnp.float32)
        if r > 0:
            picked = jax.vmap(lambda v, p: v[p])(values, pos + sink_end)  # (h, q, r, dv)
            out = out + jnp.einsum("hqr,hqrv->hqv", w[..., kept_pos.shape[0]:], picked,
                                   preferred_element_type=jnp.float32)
        return out.reshape(qh, m, -1)

    return jax.jit(run)


def attend(q, keys, values, *, budget, recall_target: float = 0.95, sink: int = 4, window: int = 256,
           scale: float | None = None, mode: str | None = None):
    """Top-k attention of a batch of heads on JAX arrays.

    Parameters
    ----------
    q : array (query_heads, m, d)
        Queries (jax or numpy); ``query_heads`` a multiple of the KV heads.
    keys : array (kv_heads, n, d)
    values : array (kv_heads, n, dv)
    budget : int or float
        Keys attended per query and head, sink and window included; a float in (0, 1] is a
        fraction of ``n``.
    recall_target : float, default 0.95
        Expected recall of the approximate top-k (1.0 is exact).
    sink, window : int, default 4 and 256
        Tokens always attended at the start and the end.
    scale : float, optional
        Default ``1 / sqrt(d)``.
    mode : {"bins", "native", "exact"}, optional
        Top-k reduction; default ``"native"`` on TPU, else ``"bins"`` (``"exact"`` when the bins
        would keep every key).

    Returns
    -------
    jax array float32 (query_heads, m, dv)

    Raises
    ------
    TypeError, ValueError, DimensionMismatchError
        Shapes that do not fit, a bad budget or target. Entries are not checked for NaN here:
        that would copy device arrays back to the host (:class:`annlib.attention.KVCache` checks).
    """
    if len(getattr(q, "shape", ())) != 3 or len(getattr(keys, "shape", ())) != 3 \
            or len(getattr(values, "shape", ())) != 3:
        for name, a in (("q", q), ("keys", keys), ("values", values)):
            V.as_heads(a, name)
    qh, m, d = q.shape
    kvh, n, dk = keys.shape
    V.check_kv_pair(keys, values)
    V.check_query_heads(qh, kvh, d, dk)
    total = V.check_budget(budget, n)
    recall_target = V.check_float("recall_target", recall_target, 0.0, 1.0, low_open=True)
    sink = V.check_int("sink", sink, 0)
    window = V.check_int("window", window, 0)
    s = 1.0 / math.sqrt(d) if scale is None else V.check_float("scale", scale, 0.0, low_open=True)
    sink_end = min(sink, n)
    region = max(sink_end, n - window) - sink_end
    r = max(0, min(region, total - (n - region)))
    if mode is None:
        if r == 0 or num_bins(region, r, recall_target) >= region:
            mode = "exact"
        else:
            mode = "native" if backend_platform() == "tpu" else "bins"
    else:
        mode = V.check_choice("mode", mode, ("bins", "native", "exact"))
    return _program(n, int(total), sink, window, float(recall_target), float(s), mode)(
        jnp.asarray(q, jnp.float32), jnp.asarray(keys), jnp.asarray(values))


@lru_cache(maxsize=None)
def _full_program(scale: float):
    def run(q, keys, values):
        qh, m, _ = q.shape
        qg = _group(q, keys.shape[0])
        S = jnp.einsum("hqd,hnd->hqn", qg, keys, preferred_element_type=jnp.float32) * scale
        out = jnp.einsum("hqn,hnv->hqv", jax.nn.softmax(S, axis=-1), values, preferred_element_type=jnp.float32)
        return out.reshape(qh, m, -1)

    return jax.jit(run)


def full_attention(q, keys, values, *, scale: float | None = None):
    """Full softmax attention in JAX (the reference the benchmark times against).

    Parameters and errors as :func:`attend` (without the selection parameters).
    """
    qh, m, d = q.shape
    kvh, n, dk = keys.shape
    V.check_query_heads(qh, kvh, d, dk)
    s = 1.0 / math.sqrt(d) if scale is None else V.check_float("scale", scale, 0.0, low_open=True)
    return _full_program(float(s))(jnp.asarray(q, jnp.float32), jnp.asarray(keys), jnp.asarray(values))
