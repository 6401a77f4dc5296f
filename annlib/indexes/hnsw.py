"""HNSW graph index, optionally accelerated by FINGER distance estimates on layer 0.

The family decides what is scored (levels, batches, which rows to repair, when a filter is so
selective that an exact scan is cheaper); :mod:`annlib.kernels.graph` and
:mod:`annlib.kernels.finger` do the walking and the arithmetic.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numba
import numpy as np

from .. import _validation as V
from ..api import Index
from ..kernels.blockwise import exact_search
from ..kernels.distances import sqnorms
from ..kernels.finger import cos_table, edge_payload, new_payload, pair_statistics, payload_width, sample_residuals
from ..kernels.graph import (bfs_order, insert_batch, link_reverse, relabel_rows, repair_deleted,
                             search_queries, search_serial)

__all__ = ["HNSW"]

_MAX_LEVEL = 30
_FINGER_SAMPLES = 50_000


def _progress_reporter(progress: Any, total: int):
    """A ``(done)`` callable for ``progress=`` (True: a tqdm bar; callable: called as (done, total))."""
    if callable(progress) and not isinstance(progress, (bool, np.bool_)):
        return (lambda done: progress(done, total)), (lambda: None)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="vec", desc="HNSW build")
        state = {"done": 0}

        def update(done):
            bar.update(done - state["done"])
            state["done"] = done

        return update, bar.close
    return (lambda done: None), (lambda: None)


class HNSW(Index):
    """Hierarchical navigable small-world graph (like hnswlib), with optional FINGER.

    Parameters
    ----------
    metric : {"l2", "cosine", "ip"}, default "l2"
        Cosine data are normalised once and searched by inner product.
    M : int, default 32
        Out-degree on layers >= 1; layer 0 keeps up to ``2 * M``. Range 2..256. Higher M gives
        better recall per visited node on hard, high-intrinsic-dimension data (GloVe), a larger
        index and a slower build. 32 was fastest with FINGER at recall 0.95 on GloVe-200k,
        kdewall-SIFT-100k and MNIST; 16 was faster on WordNet-MiniLM and on small sets
        (docs/benchmarks-hnsw.md).
    ef_construction : int, default 200
        Beam width while inserting (at least ``M`` is used). Range 1..4096.
    finger : bool, default True
        Build the FINGER payload (one global rank-``finger_rank`` basis of edge residuals, per
        edge a 64-bit sign code and two floats) so layer-0 searches skip exact distances whose
        estimate cannot enter the result set. Costs ``4 r + 16 * 2M`` bytes per vector.
    finger_rank : int, default 64
        Rank of the FINGER basis = bits per edge code; clipped to the dimension. Range 1..64.
    random_state : int, None or numpy Generator, default 0
        Seed of the level generator and of FINGER's sampling. Builds with the same seed give
        identical graphs for any number of threads.

    Search parameters
    -----------------
    ef : int, default 64
        Beam width on layer 0 (``max(ef, k)`` is used). Higher = better recall, slower.
    finger : bool, default True
        Use the FINGER filter when the index has it (False: plain exact walk on the same graph).

    Notes
    -----
    * Build inserts points in batches searched in parallel against the graph built so far, then
      adds reverse edges grouped by target node, so the graph does not depend on the thread
      count; a batch is at most 1/256 of the graph (1 point at a time for the first 256); recall at
      equal ef stays within 0.005 of one-at-a-time insertion (tested).
    * After a build, nodes are renumbered in breadth-first order of layer 0 so graph neighbours
      sit close in memory (faster walks on sets larger than the caches); positions and ids are
      unaffected (the permutation is kept and saved). Vectors added later are appended.
    * ``delete`` marks tombstones and immediately repairs the graph around them (each node that
      pointed to a deleted one re-selects among its live neighbours and theirs); deleted vectors
      stay in memory (positions are never reused). Rebuild to reclaim the space.
    * ``add`` inserts with the same algorithm; FINGER's basis and correction stay as fitted at
      build (new edges get codes on the old basis). Rebuild after large changes of distribution.
    * Scratch (visited sets) is pooled per index and reused by later searches: about 2 bytes per
      vector per concurrently searching thread.
    * :meth:`search_stats` reports exact distance evaluations and FINGER estimates per query.

    Examples
    --------
    >>> import numpy as np, annlib
    >>> X = np.random.default_rng(0).normal(size=(2000, 32)).astype("float32")
    >>> index = annlib.HNSW(M=16).build(X)
    >>> ids, dist = index.search(X[:3], k=5, ef=64)
    >>> ids[:, 0].tolist()
    [0, 1, 2]
    """

    family = "hnsw"
    build_defaults = {"M": 32, "ef_construction": 200, "finger": True, "finger_rank": 64,
                      "random_state": 0}
    search_defaults = {"ef": 64, "finger": True}
    supports_add = True
    supports_delete = True

    # A batch inserted in parallel is at most 1/_BATCH_DIV of the current graph, and at most
    # _MAX_BATCH points; 1 reproduces classic one-at-a-time insertion.
    _BATCH_DIV = 256
    _MAX_BATCH = 4096
    # Optimistic margin added to FINGER's estimated cosines: pruning only neighbours that stay
    # out even at a slightly smaller angle trades a few exact evaluations for recall.
    _FINGER_SLACK = 0.1
    _NO_MASK = np.zeros(0, np.bool_)

    def __init__(self, metric: str = "l2", **params: Any):
        super().__init__(metric=metric, **params)
        self._g: dict[str, Any] | None = None
        self._pool: dict[int, list] = {}
        self._stats_lock = threading.Lock()
        self._stats = [0, 0, 0]  # queries, exact evaluations, estimates
        self._rng: np.random.Generator | None = None

    # ------------------------------------------------------------------ parameters
    def _check_build_params(self, params):
        out = dict(params)
        out["M"] = V.check_int("M", params["M"], 2, 256)
        out["ef_construction"] = V.check_int("ef_construction", params["ef_construction"], 1, 4096)
        out["finger"] = V.check_bool("finger", params["finger"])
        out["finger_rank"] = V.check_int("finger_rank", params["finger_rank"], 1, 64)
        V.check_random_state(params["random_state"])
        return out

    def _check_search_params(self, params):
        return {"ef": V.check_int("ef", params["ef"], 1, 100_000),
                "finger": V.check_bool("finger", params["finger"])}

    @classmethod
    def _search_space(cls, n, dim):
        efs = [10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768]
        if n is not None and n < efs[-1]:
            efs = [e for e in efs if e < n] + [n]  # ef >= n already walks the whole graph
        return {"build": {"M": [16, 24, 32], "ef_construction": [200]},
                "search": {"ef": efs, "finger": [False, True]}}

    # ------------------------------------------------------------------ build / add
    def _build(self, X, progress):
        rs = self.params["random_state"]
        self._rng = V.check_random_state(rs if not isinstance(rs, np.random.Generator) else rs)
        M = self.params["M"]
        n, d = X.shape
        g = {
            "X": X, "n": 0, "rows": 0, "M": M,
            "levels": np.zeros(n, np.int32), "ustart": np.zeros(n, np.int64),
            "links0": np.zeros((n, 2 * M + 1), np.int32),
            "upper": np.zeros((max(1, n // max(1, M - 1)), M + 1), np.int32),
            "deleted": np.zeros(n, np.bool_), "n_deleted": 0,
            "entry": -1, "max_level": 0,
            "fB": np.zeros((0, d), np.float32), "fdm": None,
            "perm": None, "inv": None, "perm_ext": None,
        }
        self._set_empty_finger(g, n)
        self._g = g
        self._pool = {}
        self._insert(g, X, progress)
        self._reorder(g)
        if self.params["finger"]:
            self._fit_finger(g)

    def _add(self, X, progress):
        g = self._g
        # Work on grown copies so a failure leaves the index as it was; capacity grows by 1.5x
        # so repeated small adds stay amortised O(1) per vector.
        new = dict(g)
        self._ensure_capacity(new, g["n"] + X.shape[0])
        touched = self._insert(new, X, progress)
        if new["perm"] is not None:
            fresh = np.arange(g["n"], new["n"], dtype=np.int64)  # added nodes keep their positions
            self._set_order(new, np.concatenate([g["perm"], fresh]))
        if new["fB"].shape[0]:
            self._refresh_finger(new, np.arange(g["n"], new["n"]), touched)
        self._g = new
        self._pool = {}

    def _ensure_capacity(self, g, n_needed):
        cap = g["X"].shape[0]
        if n_needed <= cap and g["X"].flags.writeable:
            for key in ("X", "levels", "ustart", "links0", "deleted", "fcode"):
                g[key] = np.array(g[key], copy=True) if not g[key].flags.writeable else g[key]
            g["fpay"] = g["fcode"].view(np.float32)
            return
        new_cap = max(n_needed, int(cap * 1.5) + 16)

        def grow(a, fill=0):
            out = np.full((new_cap,) + a.shape[1:], fill, dtype=a.dtype)
            out[: g["n"]] = a[: g["n"]]
            return out

        for key in ("X", "levels", "ustart", "links0", "deleted"):
            g[key] = grow(g[key])
        if g["fB"].shape[0]:
            g["fcode"] = grow(g["fcode"])
            g["fpay"] = g["fcode"].view(np.float32)
        g["upper"] = np.array(g["upper"], copy=True)

    def _set_empty_finger(self, g, n):
        g["fcode"], g["fpay"] = new_payload(0, 2 * g["M"], 0)
        g["ftable"] = np.zeros(1, np.float32)

    def _draw_levels(self, m):
        mult = 1.0 / math.log(self.params["M"])
        u = 1.0 - self._rng.random(m)  # (0, 1]
        return np.minimum(np.floor(-np.log(u) * mult), _MAX_LEVEL).astype(np.int32)

    def _insert(self, g, X_new, progress):
        """Append ``X_new`` to the graph ``g``; returns the nodes whose rows gained edges."""
        M = g["M"]
        n0, m = g["n"], X_new.shape[0]
        n1 = n0 + m
        if g["X"].shape[0] < n1:
            self._ensure_capacity(g, n1)
        g["X"][n0:n1] = X_new
        levels = self._draw_levels(m)
        g["levels"][n0:n1] = levels
        starts = g["rows"] + np.concatenate([[0], np.cumsum(levels[:-1], dtype=np.int64)])
        g["ustart"][n0:n1] = starts
        rows_needed = g["rows"] + int(levels.sum())
        if g["upper"].shape[0] < rows_needed:
            up = np.zeros((max(rows_needed, int(g["upper"].shape[0] * 1.5) + 16), M + 1), np.int32)
            up[: g["rows"]] = g["upper"][: g["rows"]]
            g["upper"] = up
        g["upper"][g["rows"]:rows_needed] = 0
        g["links0"][n0:n1] = 0
        g["deleted"][n0:n1] = False
        g["rows"] = rows_needed
        g["n"] = n1
        touched = np.zeros(n1, np.bool_)
        report, close = _progress_reporter(progress, m)
        X, lv, us, l0, up = g["X"], g["levels"], g["ustart"], g["links0"], g["upper"]
        proxy = self._metric.proxy
        efc = max(self.params["ef_construction"], M)
        threads = max(1, numba.get_num_threads())
        visited = np.zeros((threads, n1), np.uint16)
        tags = np.zeros(threads, np.int64)
        pos = n0
        if g["entry"] < 0:
            g["entry"], g["max_level"] = n0, int(lv[n0])
            pos += 1
        try:
            while pos < n1:
                live = pos - g["n_deleted"]
                b = max(1, min(self._MAX_BATCH, live // self._BATCH_DIV, n1 - pos))
                nodes = np.arange(pos, pos + b, dtype=np.int64)
                chunks = min(threads, b)
                insert_batch(X, nodes, lv, us, l0, up, g["entry"], g["max_level"], M, efc, proxy,
                             visited[:chunks], tags[:chunks])
                top = int(lv[pos:pos + b].max())
                for level in range(min(top, g["max_level"]), -1, -1):
                    link_reverse(X, nodes, lv, us, l0, up, level, 2 * M if level == 0 else M,
                                 proxy, touched)
                if top > g["max_level"]:
                    first = pos + int(np.argmax(lv[pos:pos + b]))
                    g["entry"], g["max_level"] = first, int(lv[first])
                pos += b
                report(pos - n0)
            report(m)
        finally:
            close()
        return touched

    # ------------------------------------------------------------------ node order
    @staticmethod
    def _set_order(g, perm):
        """Record the node order: ``perm[node]`` = position, ``inv[position]`` = node."""
        if perm is None:
            g["perm"] = g["inv"] = g["perm_ext"] = None
            return
        perm = np.asarray(perm, np.int64)
        inv = np.empty_like(perm)
        inv[perm] = np.arange(perm.size, dtype=np.int64)
        # one trailing -1 so that kernel results padded with -1 map to -1 in one take
        g["perm"], g["inv"], g["perm_ext"] = perm, inv, np.append(perm, np.int64(-1))

    def _reorder(self, g):
        """Renumber the nodes of a fresh build in breadth-first order of layer 0.

        Neighbours then sit close together in memory, which cuts cache and TLB misses of the
        walk on sets larger than the caches. Positions (what the base class maps to ids) are
        unchanged: ``g["perm"]`` translates node numbers back to them.
        """
        n = g["n"]
        if n < 2:
            return
        order = bfs_order(g["links0"], n, g["entry"])
        self._set_order(g, order)
        inv = g["inv"]
        g["X"] = np.ascontiguousarray(g["X"][:n][order])  # a new array: the caller's is kept
        for key in ("levels", "ustart", "deleted"):
            g[key] = np.ascontiguousarray(g[key][:n][order])
        l0 = np.ascontiguousarray(g["links0"][:n][order])
        relabel_rows(l0, inv)
        g["links0"] = l0
        relabel_rows(g["upper"][: g["rows"]], inv)
        g["entry"] = int(inv[g["entry"]])

    def _to_nodes(self, positions):
        inv = self._g["inv"]
        return positions if inv is None else inv[positions]

    # ------------------------------------------------------------------ FINGER
    def _fit_finger(self, g):
        """Fit the global basis and the distribution-matching table, then every edge payload."""
        n, d = g["n"], g["X"].shape[1]
        X, l0 = g["X"][:n], g["links0"][:n]
        r = min(self.params["finger_rank"], d)
        rng = self._rng
        deg = l0[:, 0].astype(np.int64)
        live = np.flatnonzero((deg >= 1) & ~g["deleted"][:n])
        if live.size == 0:
            return
        nodes = live if live.size <= _FINGER_SAMPLES else np.sort(rng.choice(live, _FINGER_SAMPLES, replace=False))
        slots = (rng.random(nodes.size) * deg[nodes]).astype(np.int64)
        S = sample_residuals(X, l0, nodes, slots).astype(np.float64)
        # top-r right singular vectors of S = top-r eigenvectors of S^T S (d x d, cheap)
        w, V_ = np.linalg.eigh(S.T @ S)
        B = np.ascontiguousarray(V_[:, ::-1][:, :r].T, dtype=np.float32)
        g["fB"] = B
        P = np.ascontiguousarray(g["X"][:n] @ B.T, dtype=np.float32)
        g["fcode"], g["fpay"] = new_payload(g["X"].shape[0], 2 * g["M"], r)
        edge_payload(X, l0, P, np.arange(n, dtype=np.int64), g["fcode"], g["fpay"])
        g["fdm"] = self._fit_dm(g, r)
        g["ftable"] = cos_table(r, g["fdm"], self._FINGER_SLACK)

    def _fit_dm(self, g, r):
        """(mu, sigma, mu_hat, sigma_hat) of exact vs sign-estimated cosines of residual pairs
        at the same node (two distinct edges), as in the FINGER paper."""
        n = g["n"]
        deg = g["links0"][:n, 0].astype(np.int64)
        cand = np.flatnonzero((deg >= 2) & ~g["deleted"][:n])
        if cand.size == 0:
            return None
        rng = self._rng
        nodes = cand if cand.size <= _FINGER_SAMPLES else np.sort(rng.choice(cand, _FINGER_SAMPLES, replace=False))
        a = (rng.random(nodes.size) * deg[nodes]).astype(np.int64)
        b = (rng.random(nodes.size) * (deg[nodes] - 1)).astype(np.int64)
        b = b + (b >= a)
        cos, ham = pair_statistics(g["X"], g["links0"], g["fcode"], nodes, a, b)
        ok = np.isfinite(cos)
        if ok.sum() < 10:
            return None
        est = np.cos(np.pi * ham[ok] / r)
        return (float(cos[ok].mean()), float(cos[ok].std()), float(est.mean()), float(est.std()))

    def _refresh_finger(self, g, new_nodes, touched):
        """Payload of new nodes and of every node whose layer-0 row changed (basis kept)."""
        n = g["n"]
        r = g["fB"].shape[0]
        off = 4 * 2 * g["M"]
        lo = int(new_nodes[0]) if len(new_nodes) else n
        P = np.empty((n, r), np.float32)
        P[:lo] = g["fpay"][:lo, off:off + r]
        P[lo:] = g["X"][lo:n] @ g["fB"].T
        rows = np.union1d(np.asarray(new_nodes, np.int64), np.flatnonzero(touched[:n]))
        edge_payload(g["X"], g["links0"], P, rows.astype(np.int64), g["fcode"], g["fpay"])

    # ------------------------------------------------------------------ delete
    def _live_count(self):
        return self._g["n"] - self._g["n_deleted"] if self._g is not None else 0

    def _delete(self, positions):
        g = dict(self._g)
        pos = np.unique(self._to_nodes(np.asarray(positions, np.int64)))
        pos = pos[~g["deleted"][pos]]
        if pos.size == 0:
            return
        n, M = g["n"], g["M"]
        for key in ("deleted", "links0", "upper", "fcode"):
            g[key] = np.array(g[key], copy=True)  # copy-then-swap: a failure changes nothing
        g["fpay"] = g["fcode"].view(np.float32)
        deleted = g["deleted"]
        deleted[pos] = True
        touched = np.zeros(n, np.bool_)
        top = int(g["levels"][pos].max())
        for level in range(top, -1, -1):
            repair_deleted(g["X"], deleted[:n], g["levels"], g["ustart"], g["links0"], g["upper"],
                           level, 2 * M if level == 0 else M, self._metric.proxy, touched)
        g["links0"][pos, 0] = 0
        for p in pos:
            lv = int(g["levels"][p])
            if lv:
                g["upper"][g["ustart"][p]:g["ustart"][p] + lv, 0] = 0
        g["n_deleted"] = int(deleted[:n].sum())
        if deleted[g["entry"]]:
            live = np.flatnonzero(~deleted[:n])
            if live.size:
                best = live[np.argmax(g["levels"][live])]
                g["entry"], g["max_level"] = int(best), int(g["levels"][best])
            else:
                g["entry"], g["max_level"] = -1, 0
        if g["fB"].shape[0]:
            self._refresh_finger(g, np.zeros(0, np.int64), touched)
        self._g = g

    # ------------------------------------------------------------------ search
    def _take_scratch(self, chunks, n):
        pool = self._pool.setdefault(chunks, [])
        try:
            visited, tags = pool.pop()
            if visited.shape[1] >= n:
                return visited, tags
        except IndexError:
            pass
        return np.zeros((chunks, n), np.uint16), np.zeros(chunks, np.int64)

    def _search(self, Q, k, mask, ef, finger):
        g = self._g
        perm = g["perm_ext"]
        if perm is None:
            return self._search_nodes(Q, k, mask, ef, finger)
        if mask is not None:
            mask = mask[g["perm"]]  # positions -> node numbers
        out_d, out_i = self._search_nodes(Q, k, mask, ef, finger)
        return out_d, perm[out_i]

    def _search_nodes(self, Q, k, mask, ef, finger):
        """:meth:`_search` in node numbers (mask indexed by node, results are nodes)."""
        g = self._g
        n = g["n"]
        nq = Q.shape[0]
        ef = max(ef, k)
        deleted = g["deleted"][:n] if g["n_deleted"] else self._NO_MASK
        if mask is not None or g["n_deleted"]:
            if mask is None:
                allowed, n_allowed = None, n - g["n_deleted"]
            else:
                allowed = mask & ~g["deleted"][:n] if g["n_deleted"] else mask
                n_allowed = int(np.count_nonzero(allowed))
            # a walk needs ~ef*n/n_allowed visits to fill its beam; scan instead when cheaper
            if n_allowed * n_allowed <= 3 * ef * n:
                rows = np.flatnonzero(~g["deleted"][:n] if allowed is None else allowed)
                return self._exact_subset(Q, k, rows)
        if mask is None:
            mask = self._NO_MASK
        if g["entry"] < 0:
            return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
        use_finger = finger and g["fB"].shape[0] > 0
        out_d = np.empty((nq, k), np.float32)
        out_i = np.empty((nq, k), np.int64)
        counts = np.empty((nq, 2), np.int64)
        # one query never needs the thread count (asking numba for it costs ~5 us per call)
        chunks = 1 if nq == 1 else min(numba.get_num_threads(), nq)
        visited, tags = self._take_scratch(chunks, n)
        try:
            kernel = search_serial if chunks == 1 else search_queries
            kernel(Q, g["X"], g["links0"], g["upper"], g["ustart"], g["entry"], g["max_level"], ef, k,
                   self._metric.proxy, mask, deleted, visited, tags, g["fB"], g["fcode"], g["fpay"],
                   g["ftable"], use_finger, out_d, out_i, counts)
        finally:
            self._pool[chunks].append((visited, tags))
        tot = counts[0] if nq == 1 else counts.sum(axis=0)
        with self._stats_lock:
            self._stats[0] += nq
            self._stats[1] += int(tot[0])
            self._stats[2] += int(tot[1])
        return out_d, out_i

    def _exact_subset(self, Q, k, rows):
        g = self._g
        nq = Q.shape[0]
        if rows.size == 0:
            return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
        Xs = np.ascontiguousarray(g["X"][rows])
        kk = min(k, rows.size)
        d, i = exact_search(Q, Xs, sqnorms(Xs), kk, self._metric.proxy)
        out_d = np.full((nq, k), np.inf, np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        out_d[:, :kk] = d
        out_i[:, :kk] = np.where(i >= 0, rows[np.maximum(i, 0)], -1)
        return out_d, out_i

    def search_stats(self) -> dict[str, float]:
        """Distance work of the searches since build (or :meth:`reset_search_stats`).

        Returns
        -------
        dict
            ``queries``; ``exact_per_query``: exact distance evaluations per query (all layers);
            ``estimated_per_query``: FINGER estimates per query (0 without FINGER).
        """
        with self._stats_lock:
            q, ex, est = self._stats
        return {"queries": q, "exact_per_query": ex / q if q else 0.0,
                "estimated_per_query": est / q if q else 0.0}

    def reset_search_stats(self) -> None:
        """Zero the counters of :meth:`search_stats`."""
        with self._stats_lock:
            self._stats = [0, 0, 0]

    # ------------------------------------------------------------------ persistence
    def _state(self):
        g = self._g
        n = g["n"]
        meta = {"entry": int(g["entry"]), "max_level": int(g["max_level"]), "n": n,
                "rows": int(g["rows"]), "n_deleted": int(g["n_deleted"]),
                "finger_dm": None if g["fdm"] is None else list(g["fdm"])}
        arrays = {"vectors": g["X"][:n], "levels": g["levels"][:n], "ustart": g["ustart"][:n],
                  "links0": g["links0"][:n], "upper": g["upper"][: max(1, g["rows"])],
                  "deleted": g["deleted"][:n]}
        if g["fB"].shape[0]:
            arrays.update({"finger_basis": g["fB"], "finger_payload": g["fcode"][:n],
                           "finger_table": g["ftable"]})
        if g["perm"] is not None:
            arrays["node_positions"] = g["perm"]  # rows of every array above are node numbers
        return meta, arrays

    def _restore(self, meta, arrays):
        def own(a):
            # a read-only memory map becomes a copy-on-write one: same pages, and the kernels
            # see writable arrays (one compiled version for loaded and built indexes)
            if isinstance(a, np.memmap) and not a.flags.writeable:
                return np.memmap(a.filename, dtype=a.dtype, mode="c", offset=a.offset, shape=a.shape)
            return a

        M = self.params["M"]
        n = int(meta["n"])
        X = own(arrays["vectors"])
        g = {"X": X, "n": n, "rows": int(meta["rows"]), "M": M,
             "levels": own(arrays["levels"]), "ustart": own(arrays["ustart"]),
             "links0": own(arrays["links0"]), "upper": own(arrays["upper"]),
             "deleted": own(arrays["deleted"]), "n_deleted": int(meta["n_deleted"]),
             "entry": int(meta["entry"]), "max_level": int(meta["max_level"]),
             "fB": np.zeros((0, X.shape[1]), np.float32),
             "fdm": None if meta.get("finger_dm") is None else tuple(meta["finger_dm"])}
        if X.ndim != 2 or g["links0"].shape != (n, 2 * M + 1) or g["levels"].shape != (n,):
            raise ValueError("graph arrays do not match the vectors")
        self._set_empty_finger(g, n)
        perm = arrays.get("node_positions")
        if perm is not None and (perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n))):
            raise ValueError("node order is not a permutation of the positions")
        self._set_order(g, None if perm is None else np.array(perm))
        if "finger_basis" in arrays:
            fB, codes = own(arrays["finger_basis"]), own(arrays["finger_payload"])
            if codes.dtype != np.uint64 or codes.shape != (n, payload_width(2 * M, fB.shape[0])):
                raise ValueError("FINGER payload does not match the graph")
            g.update({"fB": fB, "fcode": codes, "fpay": codes.view(np.float32),
                      "ftable": own(arrays["finger_table"])})
        self._g = g
        self._rng = V.check_random_state(None)
        self._pool = {}
