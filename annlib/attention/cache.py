"""``KVCache``: a decoding KV cache whose attention reads only the keys a selector retrieves.

Per query and head the attended set is ``S = sink ∪ window ∪ retrieved``: the first ``sink``
tokens and the last ``window`` tokens always, plus the keys with the largest ``<q, k>`` among the
rest, chosen by a selector (:mod:`annlib.attention.selectors`) until ``budget`` keys are attended.
The softmax is renormalised over ``S`` (ALGORITHMS §6.1). Query head ``h`` reads KV head
``h // (query_heads // kv_heads)`` (grouped-query attention); each query head selects its own
keys from its KV head's structure.

Decoding: :meth:`KVCache.append` adds tokens at once; they are in the window, then in an exact
tail scored at every call, and are merged into the selector structures every ``merge_every``
tokens, so nothing is rebuilt per token.

Concurrency: :meth:`attend` calls run together; :meth:`append` (and the first build of a
selector's structure) runs alone, so an ``attend`` sees the cache wholly before or after an append.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _validation as V
from .._locks import ReadWriteLock
from .. import config
from ..kernels.attention import attend_selected
from .quality import AttentionQuality, measure_quality
from .reference import default_scale
from .selectors import HeadStructure, Selector, make_selector

__all__ = ["KVCache", "AttentionResult"]


@dataclass
class AttentionResult:
    """What :meth:`KVCache.attend` computed, with ``details=True``.

    Attributes
    ----------
    output : float32 (query_heads, m, dv)
        The attention outputs (``(query_heads, dv)`` for 2-D queries).
    selected : int64 (query_heads, m, width)
        Attended key positions per query, -1 padded (sink, window, then retrieved keys).
    counts : int64 (query_heads, m)
        Keys attended per query.
    log_normalizer : float64 (query_heads, m)
        ``log sum exp(score)`` over the attended keys (to merge with other parts exactly).
    estimated_mass : float64 (query_heads, m) or None
        With ``mass=``, the estimated share of the full softmax mass the selection carries.
    quality : AttentionQuality or None
        With ``quality=True``, the measures against full attention and exact top-k.
    """

    output: np.ndarray
    selected: np.ndarray
    counts: np.ndarray
    log_normalizer: np.ndarray
    estimated_mass: np.ndarray | None = None
    quality: AttentionQuality | None = None


class KVCache:
    """Keys and values of a decoding model, per KV head, with top-k attention over them.

    Parameters
    ----------
    keys : array-like (kv_heads, n, d)
        Cached keys (post position encoding, as the model attends to them); copied.
    values : array-like (kv_heads, n, dv)
        Cached values; copied.
    sink : int, default 4
        First tokens always attended.
    window : int, default 256
        Most recent tokens always attended.
    selector : str, default "exact"
        Selector used when :meth:`attend` names none: ``"exact"``, ``"approx_topk"``, ``"lut"``,
        ``"pages"`` or ``"index"`` (:data:`annlib.attention.selectors.SELECTORS`).
    merge_every : int, default 512
        Tokens that have left the window gather in an exact tail; at this many they are merged
        into the built selector structures.
    scale : float, optional
        Score multiplier; default ``1 / sqrt(d)``.
    random_state : int, default 0
        Seeds codebook training, index builds and the mass estimate's sample.

    Raises
    ------
    TypeError, ValueError
        Bad shapes, dtypes, NaN/inf, keys and values of different (heads, n), bad parameters.

    Examples
    --------
    >>> cache = KVCache(keys, values)                         # doctest: +SKIP
    >>> out = cache.attend(q, budget=0.02, selector="lut")    # doctest: +SKIP
    >>> cache.append(k_new, v_new)                            # doctest: +SKIP
    """

    def __init__(self, keys, values, *, sink: int = 4, window: int = 256, selector: str = "exact",
                 merge_every: int = 512, scale: float | None = None, random_state: int = 0) -> None:
        K, _ = V.as_heads(keys, "keys")
        Vv, _ = V.as_heads(values, "values")
        V.check_kv_pair(K, Vv)
        self.sink = V.check_int("sink", sink, 0)
        self.window = V.check_int("window", window, 0)
        self.default_selector = V.check_choice("selector", selector, ("exact", "approx_topk", "lut", "pages", "index"))
        self.merge_every = V.check_int("merge_every", merge_every, 1)
        self.scale = default_scale(K.shape[2]) if scale is None else V.check_float("scale", scale, 0.0, low_open=True)
        self.random_state = V.resolve_seed(random_state)
        self._n = K.shape[1]
        self._keys = K.copy() if np.may_share_memory(K, keys) else K
        self._values = Vv.copy() if np.may_share_memory(Vv, values) else Vv
        # selector name and parameters -> (Selector, one structure per KV head or None)
        self._selectors: dict[tuple, tuple[Selector, list[HeadStructure | None]]] = {}
        self._rw = ReadWriteLock()

    # ------------------------------------------------------------------ shape
    def __len__(self) -> int:
        return self._n

    @property
    def kv_heads(self) -> int:
        """Number of KV heads."""
        return self._keys.shape[0]

    @property
    def dim(self) -> int:
        """Key (and query) dimension per head."""
        return self._keys.shape[2]

    @property
    def value_dim(self) -> int:
        """Value dimension per head."""
        return self._values.shape[2]

    @property
    def keys(self) -> np.ndarray:
        """A copy of the cached keys (kv_heads, n, d)."""
        with self._rw.read():
            return self._keys[:, :self._n].copy()

    @property
    def values(self) -> np.ndarray:
        """A copy of the cached values (kv_heads, n, dv)."""
        with self._rw.read():
            return self._values[:, :self._n].copy()

    def memory_bytes(self) -> int:
        """Bytes of the cached keys and values plus every built selector structure."""
        with self._rw.read():
            total = self._n * self.kv_heads * 4 * (self.dim + self.value_dim)
            for _, structures in self._selectors.values():
                total += sum(s.nbytes() for s in structures if s is not None)
            return total

    def bytes_per_token(self, selector: str | None = None, selector_params: dict | None = None) -> float:
        """Bytes per cached token and head that a selector's structure adds (0 for none).

        Float keys and values take ``4 * (d + dv)`` bytes per token and head besides.
        """
        sel, structures = self._selector(selector, selector_params, build=False)
        return sel.bytes_per_token(self.dim, structures or [])

    # ------------------------------------------------------------------ regions
    def _regions(self, n: int) -> tuple[int, int]:
        """``(sink_end, window_start)``: rows ``[sink_end, window_start)`` are retrieved."""
        sink_end = min(self.sink, n)
        return sink_end, max(sink_end, n - self.window)

    def _kept(self, n: int) -> np.ndarray:
        sink_end, win = self._regions(n)
        return np.concatenate([np.arange(sink_end), np.arange(win, n)]).astype(np.int64)

    # ------------------------------------------------------------------ selectors
    def _selector(self, name, params, *, build: bool):
        name = self.default_selector if name is None else name
        params = V.check_param_dict("selector_params", params)
        key = (name, tuple(sorted((k, repr(v)) for k, v in params.items())))
        entry = self._selectors.get(key)
        if entry is None:
            sel = make_selector(name, params)
            entry = (sel, [None] * self.kv_heads if sel.structured else None)
        sel, structures = entry
        if build and sel.structured and any(s is None for s in structures):
            with self._rw.write():
                entry = self._selectors.get(key, entry)
                sel, structures = entry
                sink_end, win = self._regions(self._n)
                for h in range(self.kv_heads):
                    if structures[h] is None:
                        structures[h] = sel.build(self._keys[h], sink_end, win, self.random_state + h)
                self._selectors[key] = entry
        return sel, structures

    def prepare(self, selector: str | None = None, selector_params: dict | None = None) -> "KVCache":
        """Build a selector's per-head structures now (else the first :meth:`attend` does).

        Raises
        ------
        ValueError
            Unknown selector or parameters.
        """
        self._selector(selector, selector_params, build=True)
        return self

    # ------------------------------------------------------------------ append
    def append(self, keys, values) -> "KVCache":
        """Add tokens at the end of the cache; they are attended by the next call.

        Parameters
        ----------
        keys : array-like (kv_heads, t, d) or (kv_heads, d)
        values : array-like (kv_heads, t, dv) or (kv_heads, dv)

        Raises
        ------
        TypeError, ValueError, DimensionMismatchError
            Bad shapes or values; nothing is stored then.
        """
        K, _ = V.as_heads(keys, "keys", allow_2d=True)
        Vv, _ = V.as_heads(values, "values", allow_2d=True)
        V.check_kv_pair(K, Vv)
        V.check_head_shape("keys", K.shape, self.kv_heads, self.dim, "key")
        V.check_head_shape("values", Vv.shape, self.kv_heads, self.value_dim, "value")
        t = K.shape[1]
        with self._rw.write():
            n = self._n
            if n + t > self._keys.shape[1]:
                cap = max(n + t, 2 * self._keys.shape[1])
                grown_k = np.empty((self.kv_heads, cap, self.dim), dtype=np.float32)
                grown_v = np.empty((self.kv_heads, cap, self.value_dim), dtype=np.float32)
                grown_k[:, :n] = self._keys[:, :n]
                grown_v[:, :n] = self._values[:, :n]
                self._keys, self._values = grown_k, grown_v
            self._keys[:, n:n + t] = K
            self._values[:, n:n + t] = Vv
            self._n = n + t
            _, win = self._regions(self._n)
            for sel, structures in self._selectors.values():
                for h, s in enumerate(structures or []):
                    if s is not None and win - s.covered >= self.merge_every:
                        s.extend(self._keys[h], win)
        return self

    # ------------------------------------------------------------------ attend
    def attend(self, q, budget: Any = None, *, selector: str | None = None, selector_params: dict | None = None,
               mass: float | None = None, max_budget: Any = None, details: bool = False, quality: bool = False,
               threads: int | None = None):
        """Attention of ``q`` over the sink, the window and the keys a selector retrieves.

        Parameters
        ----------
        q : array-like (query_heads, m, d) or (query_heads, d)
            Decoding queries; ``query_heads`` a multiple of the KV heads.
        budget : int or float, optional
            Keys attended per query and head, sink and window included (they are always kept, so
            fewer than ``sink + window`` attends just those); a float in (0, 1] is a fraction of
            the cache. Default ``max(2048, 2 %)`` of the cache, at most all of it. ``budget >= n``
            is full attention.
        selector : str, optional
            Key selector (default the cache's): ``"exact"``, ``"approx_topk"``, ``"lut"``,
            ``"pages"``, ``"index"``.
        selector_params : dict, optional
            The selector's parameters (see :mod:`annlib.attention.selectors`).
        mass : float in (0, 1), optional
            Adaptive budget instead of ``budget``: 0.5 % of the retrievable keys are selected
            first; where the estimated share of the softmax mass they carry is below ``mass``,
            one selection at ``max_budget`` is made and its shortest best-first prefix that
            reaches ``mass`` is attended (all of it when none does). The share outside a
            selection is estimated from exact scores of a fixed random sample of the other keys.
        max_budget : int or float, optional
            Cap of the adaptive budget (default 10 % of the cache plus sink and window).
        details : bool, default False
            Return an :class:`AttentionResult` instead of the output array.
        quality : bool, default False
            Also measure against full attention and exact top-k (implies ``details``; reads the
            whole cache, for evaluation only).
        threads : int, optional
            Threads for this call.

        Returns
        -------
        float32 (query_heads, m, dv) (or (query_heads, dv) for 2-D ``q``), or AttentionResult.

        Raises
        ------
        TypeError, ValueError, DimensionMismatchError
            Bad queries, budgets or parameters.
        """
        Q, was_2d = V.as_heads(q, "q", allow_2d=True)
        V.check_query_heads(Q.shape[0], self.kv_heads, Q.shape[2], self.dim)
        V.check_bool("details", details)
        V.check_bool("quality", quality)
        threads = V.check_threads(threads)
        if mass is not None:
            if budget is not None:
                raise V.mass_with_fixed_budget()
            mass = V.check_float("mass", mass, 0.0, 1.0, low_open=True, high_open=True)
        sel, structures = self._selector(selector, selector_params, build=True)
        with self._rw.read(), config.threads(threads):
            n = self._n
            if mass is None:
                total = self._default_budget(n) if budget is None else V.check_budget(budget, n)
                cap = None
            else:
                cap = self._default_cap(n) if max_budget is None else V.check_budget(max_budget, n)
            qh, m, _ = Q.shape
            group = qh // self.kv_heads
            width_parts, outs, lse, est = [], [], [], []
            for h in range(self.kv_heads):
                Qg = np.ascontiguousarray(Q[h * group:(h + 1) * group].reshape(group * m, self.dim))
                K = self._keys[h, :n]
                Vh = self._values[h, :n]
                s = structures[h] if structures is not None else None
                if mass is None:
                    chosen = self._choose(sel, s, Qg, K, n, total)
                    o, mx, sm = attend_selected(Qg, K, Vh, chosen, self.scale, threads=threads or 1)
                else:
                    chosen, o, mx, sm, e = self._choose_by_mass(sel, s, Qg, K, Vh, n, mass, cap, threads or 1)
                    est.append(e.reshape(group, m))
                width_parts.append(chosen.reshape(group, m, -1))
                outs.append(o.reshape(group, m, -1))
                with np.errstate(divide="ignore"):
                    lse.append((mx + np.log(sm)).reshape(group, m))
            width = max(p.shape[2] for p in width_parts)
            selected = np.full((qh, m, width), -1, dtype=np.int64)
            for h, p in enumerate(width_parts):
                selected[h * group:(h + 1) * group, :, :p.shape[2]] = p
            output = np.concatenate(outs)
            if not (details or quality):
                return output[:, 0] if was_2d else output
            result = AttentionResult(output, selected, (selected >= 0).sum(axis=2), np.concatenate(lse),
                                     np.concatenate(est) if est else None)
            if quality:
                result.quality = measure_quality(Q, self._keys[:, :n], self._values[:, :n], selected, output,
                                                 self._kept(n), self.scale)
        if was_2d:
            result.output = result.output[:, 0]
        return result

    def _default_budget(self, n: int) -> int:
        return min(n, max(2048, math.ceil(0.02 * n)))

    def _default_cap(self, n: int) -> int:
        sink_end, win = self._regions(n)
        return min(n, (n - (win - sink_end)) + math.ceil(0.10 * n))

    def _choose(self, sel: Selector, structure, Qg, K, n, total) -> np.ndarray:
        """Attended positions per query (nq, kept + retrieved), -1 padded."""
        sink_end, win = self._regions(n)
        kept = self._kept(n)
        r = total - kept.shape[0]
        nq = Qg.shape[0]
        if r >= win - sink_end:
            return np.ascontiguousarray(np.broadcast_to(np.arange(n, dtype=np.int64), (nq, n)))
        base = np.broadcast_to(kept, (nq, kept.shape[0]))
        if r <= 0:
            return np.ascontiguousarray(base)
        _, picked = sel.select(Qg, K, sink_end, win, r, structure)
        picked = np.sort(picked, axis=1)  # memory order: the attention pass reads rows in turn
        return np.ascontiguousarray(np.concatenate([base, picked], axis=1))

    def _choose_by_mass(self, sel, structure, Qg, K, Vh, n, target, cap, threads):
        """Adaptive selection: a small budget first; rows that miss the target get one selection
        at the cap, of which the shortest best-first prefix reaching the target is attended."""
        sink_end, win = self._regions(n)
        kept_pos = self._kept(n)
        kept = kept_pos.shape[0]
        region = win - sink_end
        nq = Qg.shape[0]
        rng = np.random.default_rng([self.random_state, n])
        sample = np.sort(rng.choice(region, min(256, region), replace=False)) + sink_end if region else \
            np.zeros(0, np.int64)
        sample_scores = (Qg @ K[sample].T).astype(np.float64) * self.scale if sample.size else \
            np.zeros((nq, 0))
        first = min(cap, kept + max(32, math.ceil(0.005 * region)))
        chosen = self._choose(sel, structure, Qg, K, n, first)
        out, mx, sm = attend_selected(Qg, K, Vh, chosen, self.scale, threads=threads)
        est = _estimated_mass(chosen, mx, sm, sample, sample_scores, sink_end, win, n)
        pending = np.flatnonzero((est < target) & (first < cap) & (chosen.shape[1] < n))
        if pending.size == 0:
            return chosen, out, mx, sm, est
        Qp = np.ascontiguousarray(Qg[pending])
        r_cap = min(region, cap - kept)
        proxies, picked = sel.select(Qp, K, sink_end, win, r_cap, structure)  # best first
        scores = np.where(picked >= 0, -proxies.astype(np.float64) * self.scale, -np.inf)
        kept_scores = (Qp @ K[kept_pos].T).astype(np.float64) * self.scale if kept else np.zeros((Qp.shape[0], 0))
        top = np.maximum(scores[:, 0], kept_scores.max(axis=1, initial=-np.inf))
        prefix = np.exp(kept_scores - top[:, None]).sum(axis=1)[:, None] + np.cumsum(np.exp(scores - top[:, None]), axis=1)
        # the mass beyond the cap selection, estimated from the sample as above
        beyond = _estimated_mass(np.concatenate([np.broadcast_to(kept_pos, (Qp.shape[0], kept)), picked], axis=1),
                                 top, prefix[:, -1], sample, sample_scores[pending], sink_end, win, n)
        rest = prefix[:, -1] * (1.0 / np.maximum(beyond, 1e-300) - 1.0)
        share = prefix / (prefix[:, -1:] + rest[:, None])
        reach = share >= target
        take = np.where(reach.any(axis=1), reach.argmax(axis=1) + 1, r_cap)
        width = kept + int(take.max())
        grown = np.full((Qp.shape[0], width), -1, dtype=np.int64)
        grown[:, :kept] = kept_pos
        for j, t in enumerate(take):
            grown[j, kept:kept + t] = np.sort(picked[j, :t])
        o2, mx2, sm2 = attend_selected(Qp, K, Vh, grown, self.scale, threads=threads)
        width = max(chosen.shape[1], width)
        merged = np.full((nq, width), -1, dtype=np.int64)
        merged[:, :chosen.shape[1]] = chosen
        merged[pending] = -1
        merged[pending, :grown.shape[1]] = grown
        out[pending], mx[pending], sm[pending] = o2, mx2, sm2
        est[pending] = share[np.arange(Qp.shape[0]), take - 1]
        return merged, out, mx, sm, est


def _estimated_mass(chosen, mx, sm, sample, sample_scores, sink_end, win, n):
    """Share of the softmax mass inside each row's selection, the rest estimated from a sample.

    The unselected part of the retrievable rows holds ``unselected * mean(exp(s - max))`` over
    the sampled rows that are not selected (exact scores of a uniform sample: unbiased).
    """
    nq = chosen.shape[0]
    if sample.size == 0:
        return np.ones(nq)
    member = np.zeros((nq, n), dtype=bool)
    ok = chosen >= 0
    member[np.nonzero(ok)[0], chosen[ok]] = True
    in_sel = member[:, sample]
    unselected = (win - sink_end) - ((chosen >= sink_end) & (chosen < win)).sum(axis=1)
    weights = np.exp(sample_scores - mx[:, None])
    weights[in_sel] = 0.0
    outside = (~in_sel).sum(axis=1)
    rest = unselected * weights.sum(axis=1) / np.maximum(outside, 1)
    return np.where((unselected > 0) & (outside > 0), sm / (sm + rest), 1.0)
