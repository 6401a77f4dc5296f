"""Attention as retrieval: top-k KV-cache attention on the library's kernels.

>>> from annlib.attention import KVCache, full_attention        # doctest: +SKIP
>>> cache = KVCache(keys, values)                                 # (kv_heads, n, d) each
>>> out = cache.attend(q, budget=0.02, selector="lut")          # q: (query_heads, m, d)
>>> ref = full_attention(q, keys, values)                        # the reference

Selectors (:mod:`annlib.attention.selectors`): ``"exact"``, ``"approx_topk"``, ``"lut"``,
``"pages"``, ``"index"``. Partial results over disjoint parts of a cache merge exactly with
:func:`combine`. The JAX path for accelerators is :mod:`annlib.accel.attention`. See
docs/attention.md.
"""

from .cache import AttentionResult, KVCache
from .quality import AttentionQuality, measure_quality
from .reference import Partial, combine, default_scale, full_attention, partial_attention
from .selectors import SELECTORS, make_selector

__all__ = [
    "KVCache", "AttentionResult", "AttentionQuality", "measure_quality",
    "full_attention", "partial_attention", "combine", "Partial", "default_scale",
    "SELECTORS", "make_selector",
]
