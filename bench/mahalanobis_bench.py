"""Figures for MahalanobisSketch that the recall/QPS harness cannot make.

* estimate error vs sketch size ``m`` (table + plot), and the ``m`` needed for eps = 0.1 at n = 100k;
* query time of ``estimate`` / ``search`` against exact Mahalanobis distances computed the best way
  a user could (points pre-transformed by the factor, one matmul per query batch; faiss
  ``IndexFlatL2`` on the transformed points for k-NN) and the naive way ``(q-x)^T M (q-x)``;
* update cost: rank-1 ``update_metric`` (amortised over a stream, deferred sweeps included) vs
  re-transforming every point, ``update_point`` vs rebuild;
* the (eps, delta) guarantee measured: fraction of estimates within ``1 +- eps`` at every
  documented setting, after metric and point updates and with updates pending, for the sketch
  sized for exactly ``delta`` (before) and with the default headroom (after), and the estimate's
  time against the exact distances at both sizes, in one run (``--parts guarantee``);
* the same guarantee at the default size over several builds (``--parts builds --builds 8``):
  the mean fraction the bound promises and each build's scatter around it.

Single-threaded (numba and BLAS), best of ``--repeats`` after a warm-up. Run from the repository
root, under the machine's benchmark lock::

    python -m annlib.bench.mahalanobis_bench --out results/mahalanobis

The metric is a random PSD matrix ``A A^T / d + 0.05 I`` (seed 0) over the data set's points.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import annlib
from annlib.kernels.jl import HEADROOM, pair_failure, sketch_size

SETS = {384: "wordnet-minilm-384-angular", 784: "mnist-784-euclidean-10k"}
# (eps, delta, votes) of every sketch size docs/mahalanobis.md lists
GUARANTEE_SETTINGS = [(0.1, 0.05, 3), (0.1, 0.05, 1), (0.1, 0.05, 5), (0.1, 0.05 / 100_000, 3)]


def read(data_dir: Path, name: str, n_queries: int):
    import h5py

    with h5py.File(data_dir / f"{name}.hdf5", "r") as f:
        X = np.asarray(f["train"], dtype=np.float32)
        Q = np.asarray(f["test"], dtype=np.float32)[:n_queries]
    return X, Q


def random_psd(d: int, seed: int = 0) -> np.ndarray:
    A = np.random.default_rng(seed).normal(size=(d, d)) / np.sqrt(d)
    return A @ A.T + 0.05 * np.eye(d)


def best(fn, repeats: int) -> float:
    fn()  # warm-up (JIT compile, caches)
    out = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- error vs m
def error_vs_m(data_dir: Path, out: Path, sizes, n_queries: int) -> list[dict]:
    X, Q = read(data_dir, SETS[784], n_queries)
    M = random_psd(X.shape[1])
    rows = []
    for votes in (1, 3):
        for m in sizes:
            index = annlib.MahalanobisSketch(M=M, m=m, votes=votes, random_state=0).build(X)
            exact = index.exact_distances(Q) if not rows else exact
            ratio = index.estimate(Q).astype(np.float64) / exact
            rel = np.abs(ratio - 1.0)
            rows.append({
                "votes": votes, "m": m, "dims_per_query": votes * m,
                "within_0.1": float(np.mean(rel <= 0.1)), "predicted_within_0.1": 1 - pair_failure(m, 0.1, votes),
                "p05": float(np.quantile(ratio, 0.05)), "p50": float(np.median(ratio)),
                "p95": float(np.quantile(ratio, 0.95)), "rel_p95": float(np.quantile(rel, 0.95)),
            })
            print(rows[-1], flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for votes, style in ((1, "o-"), (3, "s--")):
            sub = [r for r in rows if r["votes"] == votes]
            ms = [r["m"] for r in sub]
            axes[0].plot(ms, [r["rel_p95"] for r in sub], style, label=f"votes={votes}")
            axes[1].fill_between(ms, [r["p05"] for r in sub], [r["p95"] for r in sub], alpha=0.25)
            axes[1].plot(ms, [r["p50"] for r in sub], style, label=f"votes={votes} (median, 5-95%)")
        axes[0].axhline(0.1, color="grey", lw=0.8)
        axes[0].set(xscale="log", xlabel="m (rows per copy)", ylabel="95th pct of |est/exact - 1|",
                    title="MNIST-784, random PSD M")
        axes[1].axhline(1.0, color="grey", lw=0.8)
        axes[1].set(xscale="log", xlabel="m (rows per copy)", ylabel="est / exact")
        for ax in axes:
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(m) for m in sizes])
            ax.minorticks_off()
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "mahalanobis-error-vs-m.png", dpi=110)
    except ImportError:
        print("matplotlib missing: no plot")
    return rows


def m_at_100k(data_dir: Path, n_queries: int) -> dict:
    """The m rule at n = 100k, checked on 100k real SIFT descriptors."""
    X, Q = read(data_dir, "kdewall-sift-128-euclidean-100k", n_queries)
    index = annlib.MahalanobisSketch(M=random_psd(X.shape[1], 1), random_state=0).build(X)
    rel = np.abs(index.estimate(Q).astype(np.float64) / index.exact_distances(Q) - 1.0)
    return {
        "n": len(X), "m_votes1_per_estimate": sketch_size(0.1, 0.05, 1),
        "m_votes3_per_estimate": sketch_size(0.1, 0.05, 3),
        "m_votes1_all_n_at_once": sketch_size(0.1, 0.05 / len(X), 1),
        "m_votes3_all_n_at_once": sketch_size(0.1, 0.05 / len(X), 3),
        "measured_within_0.1_votes3": float(np.mean(rel <= 0.1)),
        "measured_worst_per_query_within_0.1": float(np.min(np.mean(rel <= 0.1, axis=1))),
    }


# ----------------------------------------------------------------------------- query time
def query_times(data_dir: Path, d: int, n_queries: int, single: int, repeats: int) -> list[dict]:
    import faiss

    faiss.omp_set_num_threads(1)  # single-threaded like everything else here
    X, Q = read(data_dir, SETS[d], n_queries)
    M = random_psd(d)
    rows = []
    index = None
    for votes, reorder in ((1, 100), (1, 500), (3, 100), (3, 500)):
        if index is None or index.params["votes"] != votes:
            index = annlib.MahalanobisSketch(M=M, votes=votes, random_state=0).build(X)
            U = index.U.astype(np.float32)
            Y = X @ U.T
            ysq = np.einsum("ij,ij->i", Y, Y)
            flat = faiss.IndexFlatL2(U.shape[0])
            flat.add(Y)
            # ground truth: exact k-NN on the transformed points; float32 distances of size ~1e3
            # carry ~1e-4 relative error, hence the relative tolerance below
            kth = np.sqrt(np.maximum(flat.search(Q @ U.T, 10)[0][:, 9], 0.0))

            def exact_all(Qb):  # pre-transformed: one matmul per batch
                Z = Qb @ U.T
                D = np.einsum("ij,ij->i", Z, Z)[:, None] - 2.0 * (Z @ Y.T) + ysq
                return np.sqrt(np.maximum(D, 0.0, out=D), out=D)

            def exact_knn(Qb):
                return flat.search(Qb @ U.T, 10)

            def naive(Qb):  # (q-x)^T M (q-x), as written
                M32 = M.astype(np.float32)
                return [np.sqrt(np.einsum("nd,nd->n", (q - X) @ M32, q - X)) for q in Qb]

            t_exact = best(lambda: exact_all(Q), repeats)
            t_knn = best(lambda: exact_knn(Q), repeats)
            t_naive = best(lambda: naive(Q[:3]), 1) / 3 * len(Q)
            t_exact1 = best(lambda: [exact_all(Q[i:i + 1]) for i in range(single)], repeats) / single
            t_knn1 = best(lambda: [exact_knn(Q[i:i + 1]) for i in range(single)], repeats) / single
            t_est = best(lambda: index.estimate(Q), repeats)
            t_est1 = best(lambda: [index.estimate(Q[i]) for i in range(single)], repeats) / single
        t_search = best(lambda: index.search(Q, 10, reorder=reorder), repeats)
        t_search1 = best(lambda: [index.search(Q[i], 10, reorder=reorder) for i in range(single)], repeats) / single
        _, dist = index.search(Q, 10, reorder=reorder)  # returned distances are exact (float64)
        recall = float(np.mean(dist <= kth[:, None] * (1 + 1e-5) + 1e-3))
        rows.append({
            "d": d, "n": len(X), "votes": votes, "m": index.sketch_size, "reorder": reorder,
            "batch_exact_all_s": t_exact, "batch_estimate_s": t_est,
            "batch_estimate_speedup": t_exact / t_est,
            "batch_exact_knn_s": t_knn, "batch_search_s": t_search, "batch_search_speedup": t_knn / t_search,
            "batch_naive_s": t_naive, "estimate_vs_naive": t_naive / t_est,
            "single_exact_all_ms": 1e3 * t_exact1, "single_estimate_ms": 1e3 * t_est1,
            "single_estimate_speedup": t_exact1 / t_est1,
            "single_exact_knn_ms": 1e3 * t_knn1, "single_search_ms": 1e3 * t_search1,
            "single_search_speedup": t_knn1 / t_search1, "recall@10": recall,
        })
        print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- updates
def update_costs(data_dir: Path, repeats: int, stream: int = 27) -> list[dict]:
    """Rank-1 ``update_metric`` over a stream of updates (amortised: deferred calls and the
    sweeps they trigger), against re-transforming every point; ``update_point`` against a rebuild."""
    X, Q = read(data_dir, SETS[784], 1000)
    M = random_psd(X.shape[1])
    g = np.random.default_rng(1)
    rows = []
    for copies, deferred in ((8, 8), (16, 0), (16, 8), (16, 16)):
        index = annlib.MahalanobisSketch(M=M, copies=copies, deferred=deferred, random_state=0).build(X)
        index.update_metric(g.normal(size=X.shape[1]) * 1e-3)  # warm-up (JIT), then a full cycle
        while index._st.pending:
            index.update_metric(g.normal(size=X.shape[1]) * 1e-3)
        calls = []
        for _ in range(stream):
            u = g.normal(size=X.shape[1]) * 1e-3
            t0 = time.perf_counter()
            index.update_metric(u)
            calls.append(time.perf_counter() - t0)
        calls = np.array(calls)
        U = index.U.astype(np.float32)
        t_transform = best(lambda: X @ U.T, repeats)
        x = X[0] + 1.0
        t_point = best(lambda: index.update_point(0, x), repeats)
        params = dict(copies=copies, deferred=deferred, m=index.sketch_size, random_state=0)
        t_build = best(lambda: annlib.MahalanobisSketch(U=index.U, **params).build(X), 1)
        # query cost with the maximum number of updates pending, against none pending
        while index._st.pending < deferred:
            index.update_metric(g.normal(size=X.shape[1]) * 1e-3)
        t_q_pending = best(lambda: index.estimate(Q), repeats)
        fresh = annlib.MahalanobisSketch(U=index.U, **params).build(X)
        t_q_clean = best(lambda: fresh.estimate(Q), repeats)
        rows.append({
            "copies": copies, "deferred": deferred, "m": index.sketch_size, "n": len(X), "d": X.shape[1],
            "stream": stream, "update_metric_rank1_amortised_ms": 1e3 * calls.mean(),
            "deferred_call_median_ms": 1e3 * float(np.median(calls)), "slowest_call_ms": 1e3 * calls.max(),
            "retransform_ms": 1e3 * t_transform, "metric_ratio": t_transform / calls.mean(),
            "update_point_ms": 1e3 * t_point, "rebuild_ms": 1e3 * t_build, "point_ratio": t_build / t_point,
            "estimate_all_pending_ms": 1e3 * t_q_pending, "estimate_none_pending_ms": 1e3 * t_q_clean,
        })
        print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- guarantee
def _after_updates(index, X, how: str, g) -> None:
    """Apply the update sequence ``how`` to ``index`` (``deferred`` = 8)."""
    d = X.shape[1]
    scale = float(np.sqrt(np.trace(index.M) / d))  # updates of the metric's own size
    if how in ("metric, 3 pending", "metric, swept"):
        for _ in range(3 if how == "metric, 3 pending" else 9):
            index.update_metric(g.normal(size=d) * scale)
    elif how == "points moved, 2 pending":
        index.update_metric(g.normal(size=(2, d)) * scale)
        ids = np.arange(0, len(X), 2)
        index.update_point(ids, X[ids[::-1]] + g.normal(size=(ids.size, d)).astype(np.float32))


def guarantee(data_dir: Path, n_queries: int, repeats: int, n_max: int = 20_000) -> list[dict]:
    """Fraction within eps per documented setting (before: m for exactly delta; after: the
    default headroom), and estimate time against the exact distances at both sizes."""
    rows = []
    for name in (SETS[784], SETS[384]):
        X, Q = read(data_dir, name, n_queries)
        X = X[:n_max]
        M = random_psd(X.shape[1])
        U = None
        for eps, delta, votes in GUARANTEE_SETTINGS:
            hows = ["none", "metric, 3 pending", "metric, swept", "points moved, 2 pending"]
            if delta < 1e-3:
                hows = ["none"]
            for how in hows:
                row = {"data": name, "n": len(X), "queries": len(Q), "eps": eps, "delta": delta,
                       "votes": votes, "copies": 16 if delta >= 1e-3 else 4, "updates": how}
                for label, headroom in (("before", 1.0), ("after", HEADROOM)):
                    m = sketch_size(eps, delta, votes, headroom=headroom)
                    # m = 604 with 16 copies would take 0.8 GB at n = 20k: 4 copies (the law of one
                    # estimate does not depend on the number stored)
                    copies = 16 if delta >= 1e-3 else 4
                    index = annlib.MahalanobisSketch(M=M, m=m, votes=votes, eps=eps, delta=delta, copies=copies,
                                                     random_state=0).build(X)
                    _after_updates(index, X, how, np.random.default_rng(1))
                    ratio = index.estimate(Q).astype(np.float64) / index.exact_distances(Q)
                    within = np.abs(ratio - 1.0) <= eps
                    per_query = within.mean(axis=1)
                    row[f"m_{label}"] = m
                    row[f"within_{label}"] = float(within.mean())
                    row[f"predicted_{label}"] = 1.0 - pair_failure(m, eps, votes)
                    row[f"se_{label}"] = float(per_query.std(ddof=1) / np.sqrt(len(Q)))
                    row[f"worst_query_{label}"] = float(per_query.min())
                    if how == "none" and delta >= 1e-3:
                        if U is None:
                            U = index.U.astype(np.float32)
                            Y = X @ U.T  # the points transformed once (not timed)
                            ysq = np.einsum("ij,ij->i", Y, Y)

                            def exact_all(Qb):  # one GEMM of the transformed queries and points
                                Z = Qb @ U.T
                                D = np.einsum("ij,ij->i", Z, Z)[:, None] - 2.0 * (Z @ Y.T) + ysq
                                return np.sqrt(np.maximum(D, 0.0, out=D), out=D)

                            t_exact = best(lambda: exact_all(Q), repeats)
                            row["exact_s"] = t_exact
                        row["exact_s"] = t_exact
                        row[f"estimate_{label}_s"] = t_est = best(lambda: index.estimate(Q), repeats)
                        row[f"speedup_{label}"] = t_exact / t_est
                rows.append(row)
                print(row, flush=True)
    return rows


def guarantee_over_builds(data_dir: Path, n_queries: int, builds: int, n_max: int = 20_000) -> list[dict]:
    """Fraction within eps per documented setting at the default size, over ``builds`` builds.

    The guarantee is a probability over the sketch's random draw, so one build's fraction is a
    single draw of it (its estimates share 16 copies); the mean over builds (each with its own
    ``random_state`` and update sequence) is what the bound promises, and the lowest build shows
    the scatter a user can meet. At delta / 100k (4 copies, no updates) the misses are counted
    per build over 5 x ``builds`` builds: a handful per build, clustered in a query whose
    copies all err the same way. No timing: the machine's load does not matter here.
    """
    rows = []
    for name in (SETS[784], SETS[384]):
        X, Q = read(data_dir, name, n_queries)
        X = X[:n_max]
        M = random_psd(X.shape[1])
        for eps, delta, votes in GUARANTEE_SETTINGS:
            small = delta < 1e-3
            hows = ["none"] if small else ["none", "metric, 3 pending", "metric, swept", "points moved, 2 pending"]
            for how in hows:
                fractions, misses, queries_missed = [], [], []
                for b in range(5 * builds if small else builds):
                    index = annlib.MahalanobisSketch(M=M, votes=votes, eps=eps, delta=delta, copies=4 if small else 16,
                                                     random_state=b).build(X)
                    _after_updates(index, X, how, np.random.default_rng(1000 + b))
                    ratio = index.estimate(Q).astype(np.float64) / index.exact_distances(Q)
                    within = np.abs(ratio - 1.0) <= eps
                    fractions.append(float(within.mean()))
                    misses.append(int(within.size - np.count_nonzero(within)))
                    queries_missed.append(int(np.count_nonzero(~within.all(axis=1))))
                f = np.array(fractions)
                estimates = len(Q) * len(X)
                fail = pair_failure(index.sketch_size, eps, votes)
                rows.append({"data": name, "n": len(X), "queries": len(Q), "eps": eps, "delta": delta,
                             "votes": votes, "copies": 4 if small else 16, "m": index.sketch_size, "updates": how,
                             "builds": len(f), "mean": float(f.mean()),
                             "se_between_builds": float(f.std(ddof=1) / np.sqrt(len(f))),
                             "lowest": float(f.min()), "highest": float(f.max()),
                             "builds_below": int(np.sum(f < 1.0 - delta)), "predicted": 1.0 - fail,
                             "misses_per_build": misses, "queries_with_a_miss_per_build": queries_missed,
                             "mean_misses": float(np.mean(misses)),
                             "expected_misses": fail * estimates, "allowed_misses": delta * estimates})
                print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data", type=Path)
    ap.add_argument("--out", default="results/mahalanobis", type=Path)
    ap.add_argument("--queries", type=int, default=1000, help="batch size of the timed query runs")
    ap.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="error,m100k,time,update,guarantee",
                    help="also: builds (the guarantee over --builds builds, not in the default run)")
    ap.add_argument("--builds", type=int, default=8, help="builds per setting of the 'builds' part")
    args = ap.parse_args(argv)
    annlib.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    result = {}
    if "error" in parts:
        result["error_vs_m"] = error_vs_m(args.data_dir, args.out, [16, 32, 48, 64, 87, 128, 192, 256, 384], 200)
    if "m100k" in parts:
        result["m_at_100k"] = m_at_100k(args.data_dir, 100)
        print(result["m_at_100k"], flush=True)
    if "time" in parts:
        result["query_time"] = [r for d in (384, 784) for r in query_times(
            args.data_dir, d, args.queries, args.single, args.repeats)]
    if "update" in parts:
        result["updates"] = update_costs(args.data_dir, args.repeats)
    if "guarantee" in parts:
        result["guarantee"] = guarantee(args.data_dir, args.queries, args.repeats)
    if "builds" in parts:
        result["guarantee_over_builds"] = guarantee_over_builds(args.data_dir, args.queries, args.builds)
    (args.out / "mahalanobis.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
