"""How keys are chosen for attention: one selector per method, all on the library's kernels.

A selector answers "which ``count`` keys of rows ``[lo, hi)`` have the largest ``<q, k>``?" for a
batch of queries of one KV head. It is maximum inner product search (keys have varying norms),
scored with the kernels' negative-inner-product proxy. Every selector returns exact proxies of
the keys it picks, so its picks merge with the exact tail of recently appended keys.

* ``"exact"``: blocked scoring fused with a running top-k (:func:`kernels.blockwise.exact_search`).
* ``"approx_topk"``: all scores, then TPU-KNN's bin-wise reduction with a recall target
  (:func:`kernels.binning.binned_topk`, the bin count of ``jax.lax.approx_max_k``).
* ``"lut"``: keys as 4-bit PQ codes scored with 16-entry lookup tables (or int8 codes), the
  best ``overretrieve * count`` re-scored exactly (HiRE): the partitioned pipeline with one leaf.
* ``"pages"``: Quest's element-wise key minimum and maximum per page of ``page`` tokens; the page
  bound ranks pages by an inner-product search, the tokens of the best pages (``overretrieve *
  count`` of them) are re-scored exactly.
* ``"index"``: an annlib index (Partitioned or HNSW, inner product) over the keys.

Structured selectors (``lut``, ``pages``, ``index``) keep per-head state covering rows
``[start, covered)``; :meth:`HeadStructure.extend` brings in rows that left the recent window, so
decoding never rebuilds. ``exact`` and ``approx_topk`` need no state.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _validation as V
from ..api import Index
from ..kernels.binning import binned_topk, num_bins
from ..kernels.blockwise import exact_search
from ..kernels.distances import NEG_IP, rows_proxy
from ..kernels.fastscan import PackedLeaves, Probes, scan_int8, scan_pq, select_all_pq
from ..kernels.attention import page_bound_vectors
from ..kernels.topk import merge_topk, rescore_union_ip, topk_rows
from ..kernels.quantization import (build_luts, encode_nearest, int8_encode, int8_fit, pack_codes, pad_columns,
                                    pad_dim, train_codebooks)

__all__ = ["SELECTORS", "make_selector", "Selector", "HeadStructure"]

_EMPTY_F32 = np.zeros(0, dtype=np.float32)
_NO_MASK = np.zeros(0, dtype=np.bool_)
# Candidates per query from which one histogram selection over all codes beats the scan's
# running buffer (measured on 128K 64-d keys: equal near 700, the buffer 2.3x slower at 4200).
_SELECT_ALL_FROM = 512


def _pad_width(proxies: np.ndarray, positions: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Widen results to ``count`` columns with (+inf, -1) when fewer keys were available."""
    have = positions.shape[1]
    if have >= count:
        return proxies[:, :count], positions[:, :count]
    nq = positions.shape[0]
    d = np.full((nq, count), np.inf, dtype=np.float32)
    i = np.full((nq, count), -1, dtype=np.int64)
    d[:, :have] = proxies
    i[:, :have] = positions
    return d, i


def exact_topk(Q: np.ndarray, K: np.ndarray, lo: int, hi: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``count`` rows of ``K[lo:hi]`` by inner product: (proxies, positions)."""
    if hi <= lo or count <= 0:
        return np.zeros((Q.shape[0], 0), np.float32), np.zeros((Q.shape[0], 0), np.int64)
    take = min(count, hi - lo)
    d, i = exact_search(Q, K[lo:hi], _EMPTY_F32, take, NEG_IP, exact_distances=False)
    i += lo
    return d, i


class HeadStructure:
    """Per-KV-head state of a structured selector, covering key rows ``[start, covered)``."""

    start: int
    covered: int

    def extend(self, K: np.ndarray, stop: int) -> None:  # pragma: no cover - interface
        """Bring rows ``[covered, stop)`` of ``K`` into the structure."""
        raise NotImplementedError

    def candidates(self, Q: np.ndarray, K: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Best ``count`` covered rows per query: (exact proxies, positions), (+inf, -1) padded."""
        raise NotImplementedError  # pragma: no cover - interface

    def nbytes(self) -> int:  # pragma: no cover - interface
        """Bytes held beyond the float keys."""
        raise NotImplementedError


class Selector:
    """A key-selection method; structured ones build a :class:`HeadStructure` per KV head.

    Parameters
    ----------
    **params
        The method's parameters (see :data:`SELECTORS` and each subclass).
    """

    name = ""
    structured = False
    defaults: dict[str, Any] = {}

    def __init__(self, **params: Any) -> None:
        V.check_params(params, self.defaults, f"selector {self.name!r}")
        self.params = self._check({**self.defaults, **params})

    def _check(self, p: dict[str, Any]) -> dict[str, Any]:
        return p

    def build(self, K: np.ndarray, start: int, stop: int, seed: int) -> HeadStructure:
        """A structure over rows ``[start, stop)`` of one head's keys (structured selectors)."""
        raise NotImplementedError  # pragma: no cover - only structured selectors are built

    def select(self, Q: np.ndarray, K: np.ndarray, lo: int, hi: int, count: int,
               structure: HeadStructure | None) -> tuple[np.ndarray, np.ndarray]:
        """Best ``count`` rows of ``[lo, hi)`` per query: (exact proxies ascending, positions).

        For structured selectors ``structure`` covers ``[lo, covered)``; rows ``[covered, hi)``
        (appended since the last merge) are scored exactly and merged.
        """
        if not self.structured:
            return self._select_range(Q, K, lo, hi, count)
        covered = min(structure.covered, hi)
        d_s, i_s = structure.candidates(Q, K, min(count, covered - lo)) if covered > lo else \
            (np.zeros((Q.shape[0], 0), np.float32), np.zeros((Q.shape[0], 0), np.int64))
        if covered >= hi:
            return d_s, i_s
        d_t, i_t = exact_topk(Q, K, covered, hi, count)
        return merge_topk(d_s, i_s, d_t, i_t, min(count, hi - lo))

    def _select_range(self, Q, K, lo, hi, count):
        raise NotImplementedError  # pragma: no cover - overridden

    def bytes_per_token(self, d: int, structures: list) -> float:
        """Bytes per cached token the selection structure adds to the float keys and values."""
        return 0.0


class ExactSelector(Selector):
    """Exact top-k by inner product (blocked scoring + running top-k). No parameters."""

    name = "exact"

    def _select_range(self, Q, K, lo, hi, count):
        return exact_topk(Q, K, lo, hi, count)


class ApproxTopkSelector(Selector):
    """All scores, then TPU-KNN's bin-wise approximate top-k.

    Parameters
    ----------
    recall_target : float, default 0.95
        Expected recall of the reduction (sets the number of bins as XLA does); 1.0 is exact.
    """

    name = "approx_topk"
    defaults = {"recall_target": 0.95}

    def _check(self, p):
        p["recall_target"] = V.check_float("recall_target", p["recall_target"], 0.0, 1.0, low_open=True)
        return p

    def _select_range(self, Q, K, lo, hi, count):
        if hi <= lo:
            return exact_topk(Q, K, lo, hi, count)
        n = hi - lo
        take = min(count, n)
        S = Q @ K[lo:hi].T
        np.negative(S, out=S)
        bins = num_bins(n, take, self.params["recall_target"])
        d, i = binned_topk(S, take, bins)
        i[i >= 0] += lo
        return d, i


class _PageStructure(HeadStructure):
    def __init__(self, page: int, overretrieve: float, start: int, d: int):
        self.page = page
        self.overretrieve = overretrieve
        self.start = start
        self.covered = start
        self.bounds = np.zeros((0, 2 * d), dtype=np.float32)  # [max, min] per page

    def extend(self, K, stop):
        if stop <= self.covered:
            return
        # a partial last page has valid bounds over the tokens it holds; it is recomputed here
        first = (self.covered - self.start) // self.page
        rows = K[self.start + first * self.page:stop]
        pages = -(-rows.shape[0] // self.page)
        pad = pages * self.page - rows.shape[0]
        hi = np.concatenate([rows, np.full((pad, rows.shape[1]), -np.inf, np.float32)])
        lo = np.concatenate([rows, np.full((pad, rows.shape[1]), np.inf, np.float32)])
        new = np.concatenate([hi.reshape(pages, self.page, -1).max(axis=1),
                              lo.reshape(pages, self.page, -1).min(axis=1)], axis=1).astype(np.float32)
        self.bounds = np.ascontiguousarray(np.concatenate([self.bounds[:first], new]))
        self.covered = stop

    def page_scores(self, Q):
        """Quest's upper bound of ``<q, k>`` over each page (float32 (nq, pages))."""
        return page_bound_vectors(Q) @ self.bounds.T

    def candidates(self, Q, K, count):
        n_pages = self.bounds.shape[0]
        want = min(n_pages, max(1, math.ceil(self.overretrieve * count / self.page)))
        # one matrix product scores every page for all queries (the bounds are read once)
        neg = self.page_scores(Q)
        np.negative(neg, out=neg)
        _, pages = topk_rows(neg, want)
        offs = np.arange(self.page, dtype=np.int64)
        cand = (self.start + pages[:, :, None] * self.page + offs).reshape(Q.shape[0], -1)
        cand[(np.repeat(pages < 0, self.page, axis=1)) | (cand >= self.covered)] = -1
        return rescore_union_ip(Q, K, cand, count)

    def nbytes(self):
        return int(self.bounds.nbytes)


class PageSelector(Selector):
    """Quest: per-page key minimum/maximum, best pages by their score bound, exact re-score.

    Parameters
    ----------
    page : int, default 16
        Tokens per page.
    overretrieve : float, default 4.0
        Tokens of the best pages read per selected key (``>= 1``); Quest attends whole pages
        (``overretrieve = 1``); more pages re-scored give the exact top keys among them (on real
        keys at 8K, 1 % budget: key recall 0.33 at 2, 0.48 at 4, 0.65 at 8).
    """

    name = "pages"
    structured = True
    defaults = {"page": 16, "overretrieve": 4.0}

    def _check(self, p):
        p["page"] = V.check_int("page", p["page"], 1)
        p["overretrieve"] = V.check_float("overretrieve", p["overretrieve"], 1.0)
        return p

    def build(self, K, start, stop, seed):
        s = _PageStructure(self.params["page"], self.params["overretrieve"], start, K.shape[1])
        s.extend(K, stop)
        return s

    def bytes_per_token(self, d, structures):
        return 2.0 * 4 * d / self.params["page"]


class _LutStructure(HeadStructure):
    def __init__(self, codes_kind, overretrieve, start, K, stop, seed, train_rows):
        self.kind = codes_kind
        self.overretrieve = overretrieve
        self.start = start
        self.covered = start
        self.d = K.shape[1]
        rng = np.random.default_rng(seed)
        R = K[start:stop]
        if R.shape[0] > train_rows:
            R = R[np.sort(rng.choice(R.shape[0], train_rows, replace=False))]
        if codes_kind == "pq4":
            self.w = 2
            self.d_pad = pad_dim(self.d, self.w)
            self.codebooks = train_codebooks(pad_columns(R, self.d_pad), self.w, iters=10, rng=rng)
            self.codes = np.zeros((0, self.codebooks.shape[0]), dtype=np.uint8)
        else:
            self.mult = int8_fit(R) if R.shape[0] else np.ones(self.d, np.float32)
            self.codes = np.zeros((0, self.d), dtype=np.int8)
        self.leaves = None
        self.extend(K, stop)

    def extend(self, K, stop):
        if stop <= self.covered:
            return
        new = K[self.covered:stop]
        if self.kind == "pq4":
            enc = encode_nearest(pad_columns(new, self.d_pad), self.codebooks)
        else:
            enc = int8_encode(new, self.mult)
        self.codes = np.concatenate([self.codes, enc])
        self.covered = stop
        self._pack()

    def _pack(self):
        n = self.codes.shape[0]
        nb = -(-n // 32)
        pos = np.full(nb * 32, -1, dtype=np.int32)
        pos[:n] = np.arange(self.start, self.start + n, dtype=np.int32)
        padded = np.zeros((nb * 32, self.codes.shape[1]), dtype=self.codes.dtype)
        padded[:n] = self.codes
        codes = pack_codes(padded) if self.kind == "pq4" else padded
        self.leaves = PackedLeaves(np.array([0, nb], dtype=np.int64), codes, pos, _EMPTY_F32, _EMPTY_F32)

    def candidates(self, Q, K, count):
        nq = Q.shape[0]
        n_cand = min(self.covered - self.start, max(count, math.ceil(self.overretrieve * count)))
        probes = Probes(np.zeros((nq, 1), np.int64), np.zeros((nq, 1), np.float32))
        if self.kind == "pq4":
            tables = build_luts(pad_columns(Q, self.d_pad), self.codebooks)
            if n_cand >= _SELECT_ALL_FROM:
                cand = select_all_pq(tables, self.leaves, n_cand)
            else:
                _, cand = scan_pq(tables, probes, self.leaves, _NO_MASK, n_cand, self.covered)
        else:
            Qs = np.ascontiguousarray(Q / self.mult[None, :], dtype=np.float32)
            _, cand = scan_int8(Qs, probes, self.leaves, _NO_MASK, n_cand, self.covered)
        # the group's queries re-score the union of their candidates: each row read once
        return rescore_union_ip(Q, K, cand, count)

    def nbytes(self):
        extra = self.codebooks.nbytes if self.kind == "pq4" else self.mult.nbytes
        return int(self.leaves.codes.nbytes + self.leaves.entry_positions.nbytes + extra)


class LutSelector(Selector):
    """HiRE: quantized keys scored approximately, the best ``overretrieve * count`` re-scored.

    Parameters
    ----------
    codes : {"pq4", "int8"}, default "pq4"
        4-bit product quantization (two dimensions per code, ``d / 4`` bytes per key, scored with
        16-entry lookup tables) or int8 scalar codes (``d`` bytes per key).
    overretrieve : float, default 4.0
        Approximate candidates per selected key (``>= 1``).
    train_rows : int, default 65536
        Keys sampled to train the codebooks (or int8 ranges); later keys reuse them.
    """

    name = "lut"
    structured = True
    defaults = {"codes": "pq4", "overretrieve": 4.0, "train_rows": 65536}

    def _check(self, p):
        p["codes"] = V.check_choice("codes", p["codes"], ("pq4", "int8"))
        p["overretrieve"] = V.check_float("overretrieve", p["overretrieve"], 1.0)
        p["train_rows"] = V.check_int("train_rows", p["train_rows"], 16)
        return p

    def build(self, K, start, stop, seed):
        return _LutStructure(self.params["codes"], self.params["overretrieve"], start, K, stop, seed,
                             self.params["train_rows"])

    def bytes_per_token(self, d, structures):
        return pad_dim(d, 2) / 4.0 if self.params["codes"] == "pq4" else float(d)


class _IndexStructure(HeadStructure):
    def __init__(self, method, build_params, search_params, overretrieve, probe, start, K, stop, seed):
        self.method = method
        self.build_params = build_params
        self.search_params = search_params
        self.overretrieve = overretrieve
        self.probe = probe  # (leaf_fraction, points_per_key) for Partitioned's leaves
        self.start = start
        self.covered = start
        self.seed = seed
        self.index = None
        self.extend(K, stop)

    def extend(self, K, stop):
        if stop <= self.covered:
            return
        rows = K[self.covered:stop]
        ids = np.arange(self.covered, stop, dtype=np.int64)
        if self.index is None:
            params = {"random_state": self.seed, **self.build_params}
            self.index = Index.build(rows, method=self.method, metric="ip", ids=ids, **params)
            # the family's default leaf count is round(2 sqrt(n)), fixed at build
            self.num_leaves = self.build_params.get("num_leaves") or max(1, round(2.0 * math.sqrt(rows.shape[0])))
        else:
            self.index.add(rows, ids=ids)
        self.covered = stop

    def candidates(self, Q, K, count):
        take = min(count, len(self.index))
        params = dict(self.search_params)
        want = max(take, math.ceil(self.overretrieve * take))
        if self.method == "hnsw":
            params["ef"] = max(int(params.get("ef", 0)), want)
        elif self.method == "partitioned":
            params["reorder"] = max(int(params.get("reorder", 0)), want)
            if "leaves" not in params:
                # leaves holding about points_per_key points per selected key, at least a share
                share = max(self.probe[0], self.probe[1] * take / len(self.index))
                params["leaves"] = max(1, math.ceil(min(1.0, share) * self.num_leaves))
        ids, _ = self.index.search(Q, k=take, **params)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        d = rows_proxy(Q, K, ids, NEG_IP)
        d[ids < 0] = np.inf
        return d, ids

    def nbytes(self):
        return int(self.index.memory_bytes())


class IndexSelector(Selector):
    """An annlib index over the keys (inner product): RetrievalAttention's CPU-side retrieval.

    Parameters
    ----------
    method : {"partitioned", "hnsw"}, default "partitioned"
    overretrieve : float, default 2.0
        Exact re-ranking slots (Partitioned ``reorder``) or beam width (HNSW ``ef``) per selected
        key, at least.
    build_params : dict, optional
        The family's build parameters (default: its own, without self-tuning).
    search_params : dict, optional
        The family's search parameters.
    leaf_fraction : float, default 0.1
        Partitioned, when ``search_params`` names no ``leaves``: the least share of the leaves
        probed.
    points_per_key : float, default 8
        Partitioned, likewise: probe leaves holding about this many keys per selected key (the
        queries are not drawn from the keys' distribution, so a key's leaf ranks lower for them
        than a vector's leaf does for its own kind of query).
    """

    name = "index"
    structured = True
    defaults = {"method": "partitioned", "overretrieve": 2.0, "build_params": None, "search_params": None,
                "leaf_fraction": 0.1, "points_per_key": 8.0}

    def _check(self, p):
        p["method"] = V.check_choice("method", p["method"], ("partitioned", "hnsw"))
        p["overretrieve"] = V.check_float("overretrieve", p["overretrieve"], 1.0)
        p["build_params"] = {"default_recall": None, **V.check_param_dict("build_params", p["build_params"])}
        p["search_params"] = V.check_param_dict("search_params", p["search_params"])
        p["leaf_fraction"] = V.check_float("leaf_fraction", p["leaf_fraction"], 0.0, 1.0, low_open=True)
        p["points_per_key"] = V.check_float("points_per_key", p["points_per_key"], 0.0)
        return p

    def build(self, K, start, stop, seed):
        p = self.params
        return _IndexStructure(p["method"], p["build_params"], p["search_params"], p["overretrieve"],
                               (p["leaf_fraction"], p["points_per_key"]), start, K, stop, seed)

    def bytes_per_token(self, d, structures):
        built = [s for s in structures if s is not None and s.index is not None]
        n = sum(len(s.index) for s in built)
        return sum(s.nbytes() for s in built) / n if n else 0.0


SELECTORS: dict[str, type[Selector]] = {
    cls.name: cls for cls in (ExactSelector, ApproxTopkSelector, LutSelector, PageSelector, IndexSelector)
}


def make_selector(name: Any, params: dict[str, Any] | None = None) -> Selector:
    """The selector called ``name`` with ``params``.

    Raises
    ------
    ValueError
        Unknown name or parameter, or a parameter out of range.
    """
    V.check_choice("selector", name, SELECTORS)
    return SELECTORS[name](**(params or {}))
