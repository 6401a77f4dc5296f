"""Recall at equal leaves for spill none / nearest / SOAR (the SOAR paper's central comparison).

Builds ``annlib.Partitioned`` three times on one data set (same seed, same leaves) and prints,
per number of probed leaves: the candidate recall (fraction of the true 10 nearest neighbours
stored in a probed leaf), the fraction of stored copies read, and recall@10 after re-ranking
``reorder`` candidates; plus build time and bytes per vector. Single-threaded.

Usage::

    python -m annlib.bench.partitioned_spill ../shared/data/glove-50-angular-200k.hdf5 [n_queries]
"""

from __future__ import annotations

import sys
import time

import numpy as np

import annlib


def _read(path, n_queries):
    import h5py

    with h5py.File(path, "r") as f:
        X = np.asarray(f["train"], dtype=np.float32)
        Q = np.asarray(f["test"], dtype=np.float32)[:n_queries]
        gt = np.asarray(f["neighbors"])[:n_queries, :10]
        metric = {"euclidean": "l2", "angular": "cosine"}[f.attrs["distance"]]
    return X, Q, gt, metric


def candidate_recall(index, Q, gt, leaves):
    """Fraction of true neighbours stored in the probed leaves, and copies read per query / n.

    Diagnostics only: reads the leaf table of the built index through its private state.
    """
    state = index._state()[1]
    C, start, pos = state["centres"], state["leaf_start"], np.asarray(state["entry_pos"])
    Qp = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-30) if index.metric == "cosine" else Q
    S = Qp @ C.T
    order = np.argsort(-S if index.metric != "l2" else (C * C).sum(1)[None] - 2 * S, axis=1)[:, :leaves]
    hit = read = 0
    for qi in range(len(Q)):
        seen = np.concatenate([pos[start[l] * 32:start[l + 1] * 32] for l in order[qi]])
        seen = seen[seen >= 0]
        read += len(seen)
        hit += np.isin(gt[qi], seen).sum()
    return hit / gt.size, read / len(Q) / len(index)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0]
    nq = int(argv[1]) if len(argv) > 1 else 1000
    X, Q, gt, metric = _read(path, nq)
    annlib.set_num_threads(1)
    print(f"command: python -m annlib.bench.partitioned_spill {' '.join(argv)}")
    print(f"n={len(X)} d={X.shape[1]} q={len(Q)} metric={metric}\n")
    print("| spill | build s | copies/vector | bytes/vector (without re-rank copy) | leaves | candidate recall | vectors read / n | recall@10 (reorder 100) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for spill in ("none", "nearest", "soar"):
        t = time.perf_counter()
        index = annlib.Partitioned.build(X, metric=metric, spill=spill)
        build = time.perf_counter() - t
        s = index.stats()
        for leaves in (4, 8, 16, 32, 64):
            cr, read = candidate_recall(index, Q, gt, leaves)
            ids = index.search(Q, 10, leaves=leaves, reorder=100).ids
            rec = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(ids, gt)])
            print(f"| {spill} | {build:.1f} | {1 + s['spill_fraction']:.2f} | {s['bytes_per_vector']:.0f} "
                  f"({s['bytes_per_vector_without_reorder']:.1f}) | {leaves} | {cr:.3f} | {read:.3f} | {rec:.3f} |")


if __name__ == "__main__":
    main()
