"""Thread scaling of every annlib family: build and batch search with 1 and with 2 threads.

Usage::

    python -m annlib.bench.threads_bench --dataset glove-50-angular-200k --train 100000 --rounds 5

For each family the build and a batch search (all kept queries in one call, k = 10, fixed search
parameters chosen for recall 0.9-0.95) are timed with each thread count in alternating rounds
(1, 2, 1, 2, ...), so a change of the machine's load hits both counts; each figure is the median
over the rounds, and the ratio is the 1-thread median over the 2-thread median (the speed-up). A
search round is the best of ``--search-reps`` calls on the index that round built. The process's
CPU time (every thread) is recorded too: its ratio between the thread counts stays near 1 when the
work is split without extra work or spinning, whatever the machine's load, while the wall-clock
speed-up needs free cores. Before the
rounds, a small build and search at every thread count compile the kernels (not timed).
Recall@10 is reported per thread count (the ann-benchmarks definition, :mod:`.measures`), and the
1-minute load average before and after every family.

MahalanobisSketch is measured on the data set's vectors under a random positive-definite metric
``A A^T / d + 0.05 I`` (seed 0, as :mod:`.mahalanobis_bench`), its ground truth exact under that
metric. The other families use the data set's metric.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["FAMILIES", "main", "build_parser", "measure_family"]

# Per family: (build parameters, search parameters). Search parameters are fixed, chosen for
# recall@10 of 0.9-0.95 on glove-50-angular (100k-200k training vectors); the table reports the
# recall actually reached.
FAMILIES = {
    "bruteforce": ({}, {}),
    "hnsw": ({"M": 16, "ef_construction": 100, "random_state": 0}, {"ef": 80}),
    "partitioned": ({"random_state": 0}, {"leaves": 20, "reorder": 60}),
    "tpuknn": ({"recall_target": 0.9}, {}),
    "mahalanobis": ({"random_state": 0}, {"reorder": 40}),
}


def _load_average() -> float | None:
    from .environment import load_average

    la = load_average()
    return None if la is None else la[0]


def _workload(name: str, n_train: int | None, n_queries: int, k: int, seed: int):
    """(train, queries, metric) of the data set, kept rows as asked, plus the Mahalanobis set."""
    from annlib import datasets

    from .measures import canonical_metric

    ds = datasets.load(name, progress=False)
    X = np.ascontiguousarray(ds.train, dtype=np.float32)
    Q = np.ascontiguousarray(ds.test, dtype=np.float32)
    if n_train is not None and n_train < len(X):
        X = np.ascontiguousarray(X[np.sort(np.random.default_rng(seed).choice(len(X), n_train, replace=False))])
    if n_queries < len(Q):
        Q = np.ascontiguousarray(Q[np.sort(np.random.default_rng(seed + 1).choice(len(Q), n_queries, replace=False))])
    return ds.name, X, Q, canonical_metric(ds.metric)


class _Truth:
    """Exact k-th distances of the queries, for recall (computed once per vector set)."""

    def __init__(self, X, Q, metric, k):
        from annlib.datasets.groundtruth import exact_neighbors

        _, dist = exact_neighbors(X, Q, metric, k)
        self.X, self.Q, self.metric, self.k = X, Q, metric, k
        self.kth = dist[:, k - 1]

    def recall(self, ids) -> float:
        from .measures import recall_at_k

        return recall_at_k(ids, self.X, self.Q, self.kth, self.metric, self.k)


def _mahalanobis_set(X, Q):
    """(M, transformed X, transformed Q): the metric and the vectors its ground truth uses."""
    d = X.shape[1]
    A = np.random.default_rng(0).normal(size=(d, d))
    M = A @ A.T / d + 0.05 * np.eye(d)
    U = np.linalg.cholesky(M).T  # M = U^T U: (q - x)^T M (q - x) = ||U (q - x)||^2
    return M, np.ascontiguousarray(X @ U.T, dtype=np.float32), np.ascontiguousarray(Q @ U.T, dtype=np.float32)


def _make(family: str, metric: str, build: dict, M=None):
    import annlib

    if family == "mahalanobis":
        return annlib.MahalanobisSketch(M=M, **build)
    cls = {"bruteforce": annlib.BruteForce, "hnsw": annlib.HNSW, "partitioned": annlib.Partitioned,
           "tpuknn": annlib.TPUKNN}[family]
    return cls(metric=metric, **build)


def measure_family(family, X, Q, metric, truth, *, threads=(1, 2), rounds=5, search_reps=3, k=10,
                   build=None, search=None, M=None, log=print) -> dict:
    """Build and batch-search times of one family at each thread count, in alternating rounds.

    Returns
    -------
    dict
        ``build_s`` / ``search_s`` / ``recall``: per thread count, the list of per-round figures;
        ``load``: 1-minute load average before and after.
    """
    b0, s0 = FAMILIES[family]
    build = dict(b0 if build is None else build)
    search = dict(s0 if search is None else search)
    out = {"family": family, "build_params": build, "search_params": search, "threads": list(threads),
           "build_s": {t: [] for t in threads}, "search_s": {t: [] for t in threads},
           "build_cpu_s": {t: [] for t in threads}, "search_cpu_s": {t: [] for t in threads},
           "recall": {t: [] for t in threads}, "load_before": _load_average()}
    # warm-up: compile every kernel either thread count uses (small data, not timed)
    small = X[: min(len(X), 5000)]
    for t in threads:
        idx = _make(family, metric, build, M).build(small, threads=t)
        idx.search(Q, k, threads=t, **search)
    for r in range(rounds):
        for t in threads:
            start, cpu = time.perf_counter(), time.process_time()
            idx = _make(family, metric, build, M).build(X, threads=t)
            out["build_s"][t].append(time.perf_counter() - start)
            out["build_cpu_s"][t].append(time.process_time() - cpu)
            best, best_cpu = float("inf"), 0.0
            for _ in range(search_reps):
                start, cpu = time.perf_counter(), time.process_time()
                res = idx.search(Q, k, threads=t, **search)
                if time.perf_counter() - start < best:
                    best, best_cpu = time.perf_counter() - start, time.process_time() - cpu
            out["search_s"][t].append(best)
            out["search_cpu_s"][t].append(best_cpu)
            out["recall"][t].append(truth.recall(np.asarray(res.ids)))
            del idx
        log(f"  {family} round {r + 1}: " + ", ".join(
            f"{t} thr build {out['build_s'][t][-1]:.2f} s search {out['search_s'][t][-1] * 1e3:.1f} ms"
            for t in threads) + f"  (load {_load_average()})", flush=True)
    out["load_after"] = _load_average()
    return out


def _row(res, q) -> str:
    t1, t2 = res["threads"][0], res["threads"][-1]
    b1, b2 = (statistics.median(res["build_s"][t]) for t in (t1, t2))
    s1, s2 = (statistics.median(res["search_s"][t]) for t in (t1, t2))
    r1, r2 = (statistics.median(res["recall"][t]) for t in (t1, t2))
    cb1, cb2 = (statistics.median(res["build_cpu_s"][t]) for t in (t1, t2))
    cs1, cs2 = (statistics.median(res["search_cpu_s"][t]) for t in (t1, t2))
    return (f"| {res['family']} | {b1:.2f} | {b2:.2f} | **{b1 / b2:.2f}×** | {q / s1:,.0f} | {q / s2:,.0f} | "
            f"**{s1 / s2:.2f}×** | {cb2 / cb1:.2f} / {cs2 / cs1:.2f} | {r1:.4f} / {r2:.4f} | "
            f"{res['load_before']} → {res['load_after']} |")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="python -m annlib.bench.threads_bench",
                                description="Build and batch-search time of each annlib family with 1 and 2 "
                                            "threads, alternating rounds, medians.")
    p.add_argument("--dataset", default="glove-50-angular-200k")
    p.add_argument("--train", type=int, default=None, help="keep this many training vectors (seeded)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--threads", default="1,2", help="thread counts, alternated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--search-reps", type=int, default=3)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write every per-round figure to this JSON file")
    return p


def main(argv=None) -> int:
    """Run the measurement and print the table."""
    args = build_parser().parse_args(argv)
    threads = tuple(int(t) for t in args.threads.split(","))
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families: {unknown}; known: {list(FAMILIES)}")
    command = "python -m annlib.bench.threads_bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    name, X, Q, metric = _workload(args.dataset, args.train, args.queries, args.k, args.seed)
    print(f"{command}\n{name}: n={len(X):,} d={X.shape[1]} q={len(Q):,} metric={metric}, k={args.k}, "
          f"threads {threads}, {args.rounds} rounds; load {_load_average()}", flush=True)
    truth = _Truth(X, Q, metric, args.k)
    results = []
    for family in families:
        if family == "mahalanobis":
            M, Xm, Qm = _mahalanobis_set(X, Q)
            res = measure_family(family, X, Q, metric, _Truth(Xm, Qm, "l2", args.k), threads=threads,
                                 rounds=args.rounds, search_reps=args.search_reps, k=args.k, M=M)
        else:
            res = measure_family(family, X, Q, metric, truth, threads=threads, rounds=args.rounds,
                                 search_reps=args.search_reps, k=args.k)
        results.append(res)
    t1, t2 = threads[0], threads[-1]
    print(f"\n| family | build s, {t1} thr | build s, {t2} thr | build speed-up | QPS {t1} thr | QPS {t2} thr | "
          f"search speed-up | CPU s {t2} thr ÷ {t1} thr (build / search) | recall@{args.k} ({t1} / {t2} thr) | "
          "load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        print(_row(res, len(Q)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": command, "dataset": name, "n": len(X), "q": len(Q),
                                              "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
