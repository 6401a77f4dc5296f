"""Partitioned against ScaNN in batch near recall 0.90 / 0.95 / 0.99, every point timed in
alternating rounds.

``annlib-bench`` times each grid point once: on a shared machine a point that happened to run
during a burst of other work moves the frontier, and glove's batch ratio at 0.95 came out
anywhere from 0.92x to 1.40x in runs of the same code. Here both libraries are built once
(Partitioned with its defaults, ScaNN as the harness's adapter builds it), recall@10 of each
``leaves:reorder`` point is measured once (ann-benchmarks' tie-tolerant recall, as the harness),
then every point is timed once per round (batch search of all queries, best of 3 calls), the
order of the points reversed every other round, and each point's QPS is the median over the
rounds. QPS at each recall level is read off each library's Pareto frontier of those points
(:mod:`.pareto`, as the harness does), so the points given must bracket the levels.
Single-threaded.

Usage::

    taskset -c 1 python -m bench.partitioned_frontier <file.hdf5> [--partitioned 12:60,24:85,56:160]
        [--scann 32:70,48:100,128:160] [--rounds 7] [--out results/partitioned-frontier-<set>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

__all__ = ["main"]

K = 10
# glove-50-200k's points around recall 0.90 / 0.95 / 0.99 (round 7), for each library
DEFAULT_PARTITIONED = ("12:60,14:60,16:50,16:60,20:85,24:70,24:85,24:100,32:70,32:85,48:160,56:130,56:160,"
                       "64:160,64:200,80:160")
DEFAULT_SCANN = "24:85,32:70,32:85,40:85,48:85,48:100,56:85,56:100,64:85,96:200,128:130,128:160,128:200,192:160,192:200"


def _points(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in part.split(":")) for part in text.split(",")]


def _searches(train, queries, metric, partitioned, scann):
    """(library, leaves, reorder) -> a function returning the ids of one batch search."""
    import annlib

    from .adapters import Scann

    annlib.set_num_threads(1)
    index = annlib.Partitioned.build(train, metric=metric, default_recall=None)
    baseline = Scann(threads=1)
    baseline.fit(train, metric)

    def ours(leaves, reorder):
        return index.search(queries, K, leaves=leaves, reorder=reorder).ids

    def theirs(leaves, reorder):
        baseline.set_query_arguments(leaves_to_search=leaves, reorder=reorder)
        return baseline.batch_query(queries, K)

    out = {("partitioned", l, r): (lambda l=l, r=r: ours(l, r)) for l, r in partitioned}
    out.update({("scann", l, r): (lambda l=l, r=r: theirs(l, r)) for l, r in scann})
    return out


def _best_of_3(fn) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="ann-benchmarks HDF5 file")
    p.add_argument("--partitioned", default=DEFAULT_PARTITIONED, help="Partitioned leaves:reorder points")
    p.add_argument("--scann", default=DEFAULT_SCANN, help="ScaNN leaves_to_search:reorder points")
    p.add_argument("--rounds", type=int, default=7, help="timing rounds (each point once per round)")
    p.add_argument("--out", default=None, help="write recall and every round's QPS as JSON here")
    args = p.parse_args(argv)

    import h5py

    from .measures import recall_at_k
    from .pareto import RECALL_LEVELS, frontier, qps_at_recall

    with h5py.File(args.path, "r") as f:
        train = np.asarray(f["train"], dtype=np.float32)
        queries = np.asarray(f["test"], dtype=np.float32)
        kth = np.asarray(f["distances"], dtype=np.float64)[:, K - 1]
        metric = {"euclidean": "l2", "angular": "cosine"}[f.attrs["distance"]]
    load_before = os.getloadavg()[0]
    searches = _searches(train, queries, metric, _points(args.partitioned), _points(args.scann))
    recall = {key: recall_at_k(np.asarray(fn(), dtype=np.int64), train, queries, kth, metric, K)
              for key, fn in searches.items()}  # also the warm-up (compilation, first touches)
    keys = list(searches)
    qps = {key: [] for key in keys}
    for r in range(args.rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            qps[key].append(len(queries) / _best_of_3(searches[key]))
    load_after = os.getloadavg()[0]

    median = {key: statistics.median(v) for key, v in qps.items()}
    for key in keys:
        print(f"{key[0]:12s} {key[1]:4d}:{key[2]:<4d} recall {recall[key]:.4f}  QPS {median[key]:9,.0f} "
              f"(rounds {min(qps[key]):,.0f}-{max(qps[key]):,.0f})")
    at = {}
    for lib in ("partitioned", "scann"):
        front = frontier([(recall[k], median[k]) for k in keys if k[0] == lib])
        at[lib] = [qps_at_recall(front, level) for level in RECALL_LEVELS]
    print(f"\n{args.rounds} rounds, load average {load_before:.2f} -> {load_after:.2f}")
    for i, level in enumerate(RECALL_LEVELS):
        ours, theirs = at["partitioned"][i], at["scann"][i]
        ratio = f"{ours / theirs:.2f}" if ours and theirs else "-"
        print(f"recall {level:.2f}: Partitioned {ours or float('nan'):9,.0f}  ScaNN {theirs or float('nan'):9,.0f}  "
              f"ratio {ratio}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"path": args.path, "rounds": args.rounds, "load": [load_before, load_after],
                       "points": [{"library": k[0], "leaves": k[1], "reorder": k[2], "recall": recall[k],
                                   "qps_rounds": qps[k]} for k in keys],
                       "qps_at": {lib: dict(zip(map(str, RECALL_LEVELS), v)) for lib, v in at.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
