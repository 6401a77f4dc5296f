"""Partitioned quantization index: k-means leaves, SOAR spilling, anisotropic 4-bit PQ, re-ranking.

The ScaNN recipe (ALGORITHMS §2): a query scores the leaf centres, probes the best ``leaves`` of
them, scores every member of those leaves from 4-bit product-quantization codes of its residual
(``x - centre``) with 8-bit lookup tables, keeps the best ``reorder`` candidates, removes the
duplicates that spilled copies create, and re-scores the survivors exactly with the stored
float32 vectors.

All metrics are scored as inner products: ``-<q, x> = -<q, c> - <q, r>`` with the centre term
computed once per probed leaf; squared L2 adds the exact per-point term ``||x||^2 / 2``, which ranks
like ``||q - x||^2`` for a fixed query. Points are assigned to leaves by squared L2, queries rank
leaves by the search metric (ScaNN's asymmetry, ALGORITHMS §2.2).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _validation as V
from ..api import Index
from ..kernels import fastscan
from ..kernels.blockwise import exact_search
from ..kernels.cluster import assign_nearest, kmeans
from ..kernels.distances import sqnorms
from ..kernels.quantization import (
    build_luts, encode_anisotropic, encode_nearest, int8_encode, int8_fit, pack_codes,
    pad_columns, pad_dim, parallel_cost_multiplier, train_codebooks, unpack_codes,
)
from ..kernels.soar import soar_assign
from ..metrics import PROXY_L2SQ

__all__ = ["Partitioned"]

SPILL_MODES = ("soar", "nearest", "none")
QUANTIZERS = ("pq4", "int8")
ENCODE_CHUNK = 65536  # points encoded per step (bounds the residual buffer)
PQ_SAMPLE = 65536  # residuals used to train the PQ codebooks
PQ_ITERS = 12
ANISO_ROUNDS = 10
EXACT_FILTER_FACTOR = 4  # filters allowing <= factor * reorder points are searched exactly
QUERY_CHUNK = 4096  # queries per pass (bounds the query x centre score matrix)
FEW_QUERIES = 4  # up to this many queries run the fused one-call kernel (no BLAS, no numpy steps)


def _progress_fn(progress):
    """A ``(done, total)`` callable for ``progress`` (True: a tqdm bar), or None."""
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        bar = tqdm(total=100, desc="Partitioned build", leave=False)

        def update(done, total):
            bar.n = int(100 * done / max(total, 1))
            bar.refresh()
            if done >= total:
                bar.close()

        return update
    if callable(progress):
        return progress
    return None


class Partitioned(Index):
    """Partitioned quantization index (k-means leaves + SOAR + anisotropic 4-bit PQ + re-ranking).

    Parameters
    ----------
    metric : {"l2", "cosine", "ip"}, default "l2"
    num_leaves : int or None, default None
        k-means leaves; None means ``round(2 sqrt(n))`` (ScaNN's choice: on glove-50-angular-200k
        it reads 25 % fewer points than ``sqrt(n)`` leaves at the same recall). More leaves:
        smaller leaves, cheaper probes, more centre scoring per query and a longer build. Must be
        ``<= n``.
    spill : {"soar", "nearest", "none"}, default "soar"
        Extra leaf assignments per point: SOAR's orthogonality-amplified choice, the plain
        next-nearest centres, or none. Spilling grows the codes (not the float vectors) and lets
        a query reach the same recall with fewer leaves.
    soar_lambda : float, default 1.0
        SOAR's lambda >= 0 (weight of the residual-parallel term). With the default
        ``soar_exclude_primary=False``, 0 spills nothing.
    spills : int, default 1
        Spilled copies per point at most (1-4).
    soar_exclude_primary : bool, default False
        True: the primary leaf never competes, so every point gets ``spills`` copies (with
        ``soar_lambda=0`` exactly the next-nearest centres). False: ScaNN's rule, a point spills
        only to leaves whose loss beats its primary's.
    quantizer : {"pq4", "int8"}, default "pq4"
        How residuals are scored before re-ranking: 4-bit product quantization with 8-bit
        lookup tables (``dims_per_block`` dimensions per 4-bit code, i.e. ``d / (2 w)`` bytes per
        point), or symmetric int8 per dimension (``d`` bytes per point, more accurate, slower).
    dims_per_block : int, default 2
        Dimensions per PQ sub-space (1-8). 2 is ScaNN's choice; 4 halves codes and scan time at
        some loss of accuracy (more re-ranking needed).
    anisotropic_threshold : float, "auto" or None, default "auto"
        Score-aware PQ encoding threshold T (ALGORITHMS §2.4), relative to the median vector norm
        (so it is absolute for cosine). "auto" means 0.2 for "cosine"/"ip" and plain PQ for "l2";
        None means plain PQ. Ignored by the int8 quantizer.
    spherical : bool or None, default None
        Unit-norm centres (spherical k-means); None means True for "cosine".
    training_sample : int, default 100000
        Points used to train the k-means centres (at least ``num_leaves``).
    kmeans_iters : int, default 10
        Lloyd rounds.
    random_state : int, Generator or None, default 0
        Seed of every random choice; one seed and one thread give identical indexes.

    Search parameters
    -----------------
    leaves : int or None, default None
        Leaves probed per query (1..num_leaves); None means ``ceil(num_leaves / 20)``. The main
        recall/speed knob.
    reorder : int, default 100
        Candidates re-scored exactly (at least ``k`` are used). More: higher recall, slower.

    Notes
    -----
    Supports ``add`` (new points are assigned and spilled with the existing centres and
    codebooks; the packed layout is rebuilt, O(n)), ``filter=`` (a filter allowing at most
    ``4 * reorder`` points is answered exactly), ids, save/load with mmap. Memory per point:
    ``d / (2 w)`` code bytes per stored copy (plus 4 bytes for its position and, for "l2", 4
    for its norm term), and ``4 d`` bytes for the re-ranking vectors.

    Examples
    --------
    >>> import numpy as np, annlib
    >>> X = np.random.default_rng(0).normal(size=(5000, 32)).astype("float32")
    >>> index = annlib.Partitioned(metric="l2", num_leaves=50).build(X)
    >>> ids, dist = index.search(X[:2], k=5, leaves=10, reorder=100)
    >>> ids[:, 0].tolist()
    [0, 1]
    """

    family = "partitioned"
    supports_add = True
    build_defaults = {
        "num_leaves": None, "spill": "soar", "soar_lambda": 1.0, "spills": 1,
        "soar_exclude_primary": False, "quantizer": "pq4", "dims_per_block": 2,
        "anisotropic_threshold": "auto", "spherical": None, "training_sample": 100_000,
        "kmeans_iters": 10, "random_state": 0,
    }
    search_defaults = {"leaves": None, "reorder": 100}

    def __init__(self, metric: str = "l2", **params: Any):
        super().__init__(metric=metric, **params)
        self._a: dict[str, np.ndarray] = {}
        self._meta: dict[str, Any] = {}

    # ----------------------------------------------------------------- parameters
    def _check_build_params(self, p):
        p = dict(p)
        if p["num_leaves"] is not None:
            p["num_leaves"] = V.check_int("num_leaves", p["num_leaves"], 1)
        V.check_choice("spill", p["spill"], SPILL_MODES)
        p["soar_lambda"] = V.check_float("soar_lambda", p["soar_lambda"], 0.0)
        p["spills"] = V.check_int("spills", p["spills"], 1, 4)
        p["soar_exclude_primary"] = V.check_bool("soar_exclude_primary", p["soar_exclude_primary"])
        V.check_choice("quantizer", p["quantizer"], QUANTIZERS)
        p["dims_per_block"] = V.check_int("dims_per_block", p["dims_per_block"], 1, 8)
        t = p["anisotropic_threshold"]
        if t is not None and t != "auto":
            p["anisotropic_threshold"] = V.check_float("anisotropic_threshold", t, 0.0, 1.0, high_open=True)
        if p["spherical"] is not None:
            p["spherical"] = V.check_bool("spherical", p["spherical"])
        p["training_sample"] = V.check_int("training_sample", p["training_sample"], 1)
        p["kmeans_iters"] = V.check_int("kmeans_iters", p["kmeans_iters"], 1, 1000)
        V.check_random_state(p["random_state"])
        if isinstance(p["random_state"], np.random.Generator):
            raise TypeError("random_state of Partitioned must be an int seed or None (it is stored with the index)")
        return p

    def _check_build_data(self, n):
        if self.params["num_leaves"] is not None and self.params["num_leaves"] > n:
            raise ValueError(f"num_leaves={self.params['num_leaves']} is larger than the number of vectors ({n})")

    def _check_search_params(self, p):
        p = dict(p)
        if p["leaves"] is not None:
            p["leaves"] = V.check_int("leaves", p["leaves"], 1)
        p["reorder"] = V.check_int("reorder", p["reorder"], 1)
        return p

    def _threshold(self) -> float | None:
        t = self.params["anisotropic_threshold"]
        if t == "auto":
            return None if self._metric.proxy == PROXY_L2SQ else 0.2
        return t

    # ----------------------------------------------------------------- build
    def _build(self, X, progress):
        p = self.params
        report = _progress_fn(progress)
        rng = np.random.default_rng(p["random_state"])
        n, d = X.shape
        L = p["num_leaves"] or _default_leaves(n)
        spherical = p["spherical"] if p["spherical"] is not None else self.metric == "cosine"
        m = min(n, max(p["training_sample"], L))
        sample = X if m == n else X[np.sort(rng.choice(n, m, replace=False))]
        stage = (lambda done, total: report(done, 3 * total)) if report else None
        C = kmeans(np.ascontiguousarray(sample), L, iters=p["kmeans_iters"], rng=rng,
                   spherical=spherical, progress=stage)
        leaf, pos = self._assign(X, C, np.arange(n, dtype=np.int64))
        meta = {"num_leaves": L, "d_pad": d, "scale_threshold": None}
        a: dict[str, np.ndarray] = {"centres": C, "vectors": X}
        if p["quantizer"] == "pq4":
            w = p["dims_per_block"]
            d_pad = pad_dim(d, w)
            prim = leaf[: n]  # primary entries come first
            rows = np.arange(n) if n <= PQ_SAMPLE else np.sort(rng.choice(n, PQ_SAMPLE, replace=False))
            R = pad_columns(X[rows] - C[prim[rows]], d_pad)
            a["codebooks"] = train_codebooks(R, w, iters=PQ_ITERS, rng=rng)
            meta["d_pad"] = d_pad
            t = self._threshold()
            if t is not None:
                meta["scale_threshold"] = float(t * np.median(np.sqrt(sqnorms(X))))
        else:
            a["int8_mult"] = int8_fit(X - C[leaf[:n]])
        self._meta, self._a = meta, a
        codes = self._encode(X, C, leaf, pos, report)
        self._a.update(self._layout(leaf, pos, codes, X))
        if report:
            report(1, 1)

    def _assign(self, X, C, positions):
        """(leaf, position) of every stored copy: primaries first, then spilled copies."""
        p = self.params
        prim, _ = assign_nearest(X, C)
        leaf, pos = [prim.astype(np.int64)], [positions]
        if p["spill"] != "none" and C.shape[0] > 1:
            soar = p["spill"] == "soar"
            sec = soar_assign(X, C, prim, p["soar_lambda"] if soar else 0.0, spills=p["spills"],
                              exclude_primary=p["soar_exclude_primary"] if soar else True)
            for s in range(sec.shape[1]):
                ok = sec[:, s] >= 0
                leaf.append(sec[ok, s].astype(np.int64))
                pos.append(positions[ok])
        return np.concatenate(leaf), np.concatenate(pos)

    def _encode(self, X, C, leaf, pos, report):
        """Codes of every stored copy against its own leaf centre (ALGORITHMS §2.3, item 5)."""
        a, meta = self._a, self._meta
        base = int(pos.min()) if pos.size else 0
        E = leaf.shape[0]
        if "codebooks" in a:
            cb = a["codebooks"]
            out = np.empty((E, cb.shape[0]), dtype=np.uint8)
        else:
            out = np.empty((E, X.shape[1]), dtype=np.int8)
        for s in range(0, E, ENCODE_CHUNK):
            lf, ps = leaf[s:s + ENCODE_CHUNK], pos[s:s + ENCODE_CHUNK] - base
            R = X[ps] - C[lf]
            if "codebooks" not in a:
                out[s:s + len(lf)] = int8_encode(R, a["int8_mult"])
                continue
            R = pad_columns(R, meta["d_pad"])
            if meta["scale_threshold"] is None:
                out[s:s + len(lf)] = encode_nearest(R, cb)
            else:
                Xo = X[ps]
                nrm = np.einsum("ij,ij->i", Xo, Xo)
                eta = parallel_cost_multiplier(meta["scale_threshold"], nrm, X.shape[1])
                U = pad_columns(Xo / np.maximum(np.sqrt(nrm), 1e-30)[:, None], meta["d_pad"])
                out[s:s + len(lf)] = encode_anisotropic(R, U, cb, eta, ANISO_ROUNDS)
            if report:
                report(2 * E + s + len(lf), 3 * E)
        return out

    def _layout(self, leaf, pos, codes, X):
        """Sort copies by leaf, pad each leaf to whole 32-point blocks, pack the codes."""
        L = self._meta["num_leaves"]
        B = fastscan.POINT_BLOCK
        order = np.argsort(leaf, kind="stable")
        leaf, pos, codes = leaf[order], pos[order], codes[order]
        counts = np.bincount(leaf, minlength=L)
        blocks = (counts + B - 1) // B
        leaf_start = np.zeros(L + 1, dtype=np.int64)
        np.cumsum(blocks, out=leaf_start[1:])
        slot = leaf_start[leaf] * B + (np.arange(len(leaf)) - np.repeat(np.cumsum(counts) - counts, counts))
        E_pad = int(leaf_start[-1]) * B
        entry_pos = np.full(E_pad, -1, dtype=np.int32)
        entry_pos[slot] = pos
        full = np.zeros((E_pad, codes.shape[1]), dtype=codes.dtype)
        full[slot] = codes
        out = {"leaf_start": leaf_start, "entry_pos": entry_pos}
        out["codes"] = pack_codes(full) if "codebooks" in self._a else full
        if self._metric.proxy == PROXY_L2SQ:
            pt = np.zeros(E_pad, dtype=np.float32)
            pt[slot] = 0.5 * sqnorms(X)[pos]
            out["point_term"] = pt
            out["point_term_block_min"] = fastscan.block_min(pt)
        return out

    # ----------------------------------------------------------------- add
    def _add(self, X, progress):
        a = self._a
        report = _progress_fn(progress)
        n0 = a["vectors"].shape[0]
        C = a["centres"]
        leaf_new, pos_new = self._assign(X, C, np.arange(n0, n0 + X.shape[0], dtype=np.int64))
        codes_new = self._encode(X, C, leaf_new, pos_new, report)
        leaf_old, pos_old, codes_old = self._entries()
        allX = np.concatenate([a["vectors"], X])
        # build the new state completely before swapping it in
        layout = self._layout(np.concatenate([leaf_old, leaf_new]), np.concatenate([pos_old, pos_new]),
                              np.concatenate([codes_old, codes_new]), allX)
        self._a = {**a, **layout, "vectors": allX}

    def _entries(self):
        """The stored copies back in (leaf, position, codes) form (unpadded)."""
        a = self._a
        B = fastscan.POINT_BLOCK
        blocks = np.diff(a["leaf_start"])
        leaf = np.repeat(np.arange(len(blocks), dtype=np.int64), blocks * B)
        ok = np.asarray(a["entry_pos"]) >= 0
        codes = unpack_codes(np.asarray(a["codes"])) if "codebooks" in a else np.asarray(a["codes"])
        return leaf[ok], np.asarray(a["entry_pos"])[ok].astype(np.int64), codes[ok]

    # ----------------------------------------------------------------- search
    def _search(self, Q, k, mask, leaves=None, reorder=100):
        L = self._meta["num_leaves"]
        t = min(L, leaves if leaves is not None else max(1, math.ceil(L / 20)))
        n_cand = max(reorder, k)
        if mask is not None and int(mask.sum()) <= EXACT_FILTER_FACTOR * n_cand:
            return self._search_allowed(Q, k, mask)
        if Q.shape[0] <= QUERY_CHUNK:
            return self._search_chunk(Q, k, mask, t, n_cand)
        parts = [self._search_chunk(Q[s:s + QUERY_CHUNK], k, mask, t, n_cand)
                 for s in range(0, Q.shape[0], QUERY_CHUNK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _centre_norms(self):
        """Squared centre norms (cached; the centres never change after the build)."""
        C = self._a["centres"]
        if getattr(self, "_cn_for", None) is not C:
            self._cn = np.ascontiguousarray(np.einsum("ij,ij->i", C, C), dtype=np.float32)
            self._cn_for = C
        return self._cn

    def _search_chunk(self, Q, k, mask, t, n_cand):
        a = self._a
        threads = _threads()
        pt = a.get("point_term", np.zeros(0, dtype=np.float32))
        mask_arr = np.zeros(0, dtype=np.bool_) if mask is None else mask
        l2 = self._metric.proxy == PROXY_L2SQ
        if "codebooks" in a and Q.shape[0] <= FEW_QUERIES:
            cn = self._centre_norms() if l2 else np.zeros(0, dtype=np.float32)
            return fastscan.search_pq_few(
                Q, a["centres"], cn, t, a["codebooks"], a["leaf_start"], a["codes"], a["entry_pos"],
                pt, a.get("point_term_block_min", np.zeros(0, dtype=np.float32)), mask_arr, n_cand,
                a["vectors"], k, self._metric.proxy)
        S = Q @ a["centres"].T
        if l2:
            D = self._centre_norms()[None, :] - 2.0 * S
        else:
            D = -S
        _, leaf_ids = fastscan.select_leaves(D, t, threads=threads)
        leaf_bias = -np.take_along_axis(S, leaf_ids, axis=1).astype(np.float32)
        if "codebooks" in a:
            T, scale, base = build_luts(pad_columns(Q, self._meta["d_pad"]), a["codebooks"], threads)
            _, cand = fastscan.scan_pq(T, scale, base, leaf_ids, leaf_bias, a["leaf_start"], a["codes"],
                                       a["entry_pos"], pt, mask_arr, n_cand, threads=threads,
                                       pt_block_min=a.get("point_term_block_min"),
                                       n_points=a["vectors"].shape[0])
        else:
            Qs = np.ascontiguousarray(Q / a["int8_mult"][None, :], dtype=np.float32)
            _, cand = fastscan.scan_int8(Qs, leaf_ids, leaf_bias, a["leaf_start"], a["codes"],
                                         a["entry_pos"], pt, mask_arr, n_cand, threads=threads)
        return fastscan.rerank(Q, a["vectors"], cand, k, self._metric.proxy, threads=threads)

    def _search_allowed(self, Q, k, mask):
        """Exact search over the few allowed points of a restrictive filter."""
        X = self._a["vectors"]
        allowed = np.flatnonzero(mask)
        if allowed.size == 0:
            return np.full((Q.shape[0], k), np.inf, np.float32), np.full((Q.shape[0], k), -1, np.int64)
        sub = np.ascontiguousarray(X[allowed])
        kk = min(k, allowed.size)
        d, i = exact_search(Q, sub, sqnorms(sub), kk, self._metric.proxy)
        out_d = np.full((Q.shape[0], k), np.inf, np.float32)
        out_i = np.full((Q.shape[0], k), -1, np.int64)
        out_d[:, :kk] = d
        out_i[:, :kk] = np.where(i >= 0, allowed[np.maximum(i, 0)], -1)
        return out_d, out_i

    # ----------------------------------------------------------------- persistence and sizes
    def _state(self):
        return dict(self._meta), dict(self._a)

    def _restore(self, meta, arrays):
        need = {"centres", "vectors", "leaf_start", "entry_pos", "codes"}
        need |= {"codebooks"} if self.params["quantizer"] == "pq4" else {"int8_mult"}
        if self._metric.proxy == PROXY_L2SQ:
            need.add("point_term")
        missing = need - set(arrays)
        if missing:
            raise ValueError(f"missing arrays {sorted(missing)}")
        L = int(meta["num_leaves"])
        if arrays["centres"].shape[0] != L or arrays["leaf_start"].shape != (L + 1,):
            raise ValueError("centres and leaf table do not match")
        if arrays["entry_pos"].shape[0] != int(arrays["leaf_start"][-1]) * fastscan.POINT_BLOCK:
            raise ValueError("entry table does not match the leaf table")
        self._meta = {"num_leaves": L, "d_pad": int(meta["d_pad"]),
                      "scale_threshold": meta.get("scale_threshold")}
        self._a = dict(arrays)
        if "point_term" in self._a and "point_term_block_min" not in self._a:
            self._a["point_term_block_min"] = fastscan.block_min(np.asarray(self._a["point_term"]))

    def stats(self) -> dict[str, float]:
        """Sizes of the built index: leaves, stored copies, spill fraction, bytes per vector.

        Returns
        -------
        dict
            ``num_leaves``, ``copies`` (stored code entries), ``spill_fraction`` (spilled copies
            per vector), ``bytes_per_vector`` (everything) and ``bytes_per_vector_without_reorder``
            (without the float32 re-ranking vectors).
        """
        self._require_built()
        n = self._a["vectors"].shape[0]
        copies = int((np.asarray(self._a["entry_pos"]) >= 0).sum())
        total = self.memory_bytes()
        return {"num_leaves": self._meta["num_leaves"], "copies": copies,
                "spill_fraction": copies / n - 1.0, "bytes_per_vector": total / n,
                "bytes_per_vector_without_reorder": (total - self._a["vectors"].nbytes) / n}

    @classmethod
    def _search_space(cls, n, dim):
        L = _default_leaves(n) if n else 1000
        leaves = [v for v in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256) if v <= L] or [1]
        build = {"num_leaves": [L]} if n else {}
        return {"build": build, "search": {"leaves": leaves, "reorder": [20, 40, 70, 100, 160, 250]}}


def _default_leaves(n: int) -> int:
    """Default leaf count, ``round(2 sqrt(n))`` clipped to ``[1, n]``."""
    return max(1, min(n, int(round(2.0 * math.sqrt(n)))))


def _threads() -> int:
    import numba

    return int(numba.get_num_threads())
