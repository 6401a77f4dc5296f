"""Partitioned with and without the anisotropic re-fit of leaf centres (build parameter ``avq``).

Builds ``annlib.Partitioned`` once per ``avq`` value (same seed, leaves and everything else) and
prints two tables, single-threaded:

1. per number of probed leaves: the candidate recall (fraction of the true 10 nearest neighbours
   stored in a probed leaf), the stored copies read per query as a fraction of ``n``, and
   recall@10 after re-ranking 40 and 100 candidates; plus build time and copies per vector.
   These do not depend on the machine's load.
2. batch QPS at recall@10 = 0.90 / 0.95 / 0.99 (interpolated on each build's Pareto frontier, as
   ``annlib-bench`` does), with the builds timed in alternation: every round times each build's
   whole grid once, and each point keeps its best round, so a change of load during the run
   weighs on every build alike; and the median over the grid of the QPS ratio at equal
   ``leaves`` and ``reorder`` (the search's own speed).

Usage::

    python -m annlib.bench.partitioned_avq ../shared/data/glove-50-angular-200k.hdf5 [--queries N]
        [--avq none,1.6,2.5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import annlib

from .pareto import RECALL_LEVELS, frontier, qps_at_recall

LEAVES = (4, 8, 16, 32, 64)
GRID_LEAVES = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
GRID_REORDER = (40, 70, 100, 160, 250)


def _read(path, n_queries):
    import h5py

    with h5py.File(path, "r") as f:
        X = np.asarray(f["train"], dtype=np.float32)
        Q = np.asarray(f["test"], dtype=np.float32)
        gt = np.asarray(f["neighbors"])[:, :10]
        metric = {"euclidean": "l2", "angular": "cosine"}[f.attrs["distance"]]
    if n_queries is not None and n_queries < len(Q):
        Q, gt = Q[:n_queries], gt[:n_queries]
    return X, Q, gt, metric


def candidate_recall(index, Q, gt, leaves):
    """Fraction of true neighbours stored in the probed leaves, and copies read per query / n.

    Diagnostics only: reads the leaf table of the built index from its saved state.
    """
    arrays = index._state()[1]
    C, offsets = arrays["centres"], arrays["leaf_block_offsets"]
    pos = np.asarray(arrays["entry_positions"])
    Qp = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-30) if index.metric == "cosine" else Q
    order = np.argsort(-(Qp @ C.T), axis=1)[:, :leaves]  # leaves ranked by inner product
    hit = read = 0
    for qi in range(len(Q)):
        seen = np.concatenate([pos[offsets[leaf] * 32:offsets[leaf + 1] * 32] for leaf in order[qi]])
        seen = seen[seen >= 0]
        read += len(seen)
        hit += np.isin(gt[qi], seen).sum()
    return hit / gt.size, read / len(Q) / len(index)


def _recall(index, Q, gt, leaves, reorder):
    ids = index.search(Q, 10, leaves=leaves, reorder=reorder).ids
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(ids, gt)]))


def _label(avq):
    return "off" if avq is None else f"{avq:g}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m annlib.bench.partitioned_avq", description=__doc__.split("\n")[0])
    p.add_argument("path")
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--avq", default="none,1.6,2.5", help="comma-separated values; none = off")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    values = [None if v.strip().lower() == "none" else float(v) for v in args.avq.split(",")]
    X, Q, gt, metric = _read(args.path, args.queries)
    if metric == "l2":
        p.error("the re-fit applies to inner-product scores: give an angular data set")
    annlib.set_num_threads(1)
    name = os.path.basename(args.path)
    print(f"command: python -m annlib.bench.partitioned_avq {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"{name}: n={len(X)} d={X.shape[1]} q={len(Q)} metric={metric}; load average at start "
          f"{os.getloadavg()[0]:.2f}\n")
    # a first build on a slice loads (or compiles) the kernels, so no timed build pays for it
    annlib.Partitioned.build(X[:2000], metric=metric, default_recall=None).search(Q[:2], 10)
    built = {}
    print("| avq | build s | copies/vector | leaves | candidate recall | copies read / n | recall@10 reorder 40 | reorder 100 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for avq in values:
        t = time.perf_counter()
        index = annlib.Partitioned.build(X, metric=metric, avq=avq, default_recall=None)
        build = time.perf_counter() - t
        built[avq] = index
        copies = 1 + index.stats()["spill_fraction"]
        for leaves in LEAVES:
            cr, read = candidate_recall(index, Q, gt, leaves)
            print(f"| {_label(avq)} | {build:.1f} | {copies:.3f} | {leaves} | {cr:.4f} | {read:.4f} | "
                  f"{_recall(index, Q, gt, leaves, 40):.4f} | {_recall(index, Q, gt, leaves, 100):.4f} |", flush=True)
    grid = [(t, r) for t in GRID_LEAVES for r in GRID_REORDER]
    recall = {avq: {pt: _recall(built[avq], Q, gt, *pt) for pt in grid} for avq in values}
    best = {avq: dict.fromkeys(grid, 0.0) for avq in values}
    for _ in range(args.rounds):
        for avq in values:
            index = built[avq]
            for pt in grid:
                index.search(Q[:10], 10, leaves=pt[0], reorder=pt[1])  # warm the caches for this point
                t = time.perf_counter()
                index.search(Q, 10, leaves=pt[0], reorder=pt[1])
                best[avq][pt] = max(best[avq][pt], len(Q) / (time.perf_counter() - t))
    print(f"\nbatch QPS, best of {args.rounds} alternating rounds; load average at end {os.getloadavg()[0]:.2f}\n")
    ref = values[0]
    levels = " / ".join(f"{v:.2f}" for v in RECALL_LEVELS)
    print(f"| avq | QPS@{levels} | ÷ avq={_label(ref)} | median ÷ at equal leaves and reorder |")
    print("|---|---:|---:|---:|")
    at = {}
    for avq in values:
        front = frontier([(recall[avq][pt], best[avq][pt]) for pt in grid])
        at[avq] = [qps_at_recall(front, level) for level in RECALL_LEVELS]
    for avq in values:
        qps = " / ".join("—" if q is None else f"{q:,.0f}" for q in at[avq])
        ratio = " / ".join("—" if q is None or r is None else f"{q / r:.2f}" for q, r in zip(at[avq], at[ref]))
        # the same search parameters read about as many copies with every build: this ratio is
        # the speed of the search itself, apart from what the re-fit does to recall
        same = float(np.median([best[avq][pt] / best[ref][pt] for pt in grid]))
        print(f"| {_label(avq)} | {qps} | {ratio} | {same:.2f} |")


if __name__ == "__main__":
    main()
