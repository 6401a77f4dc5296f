"""Partitioned with float32 against int8 re-ranking (build parameter ``rerank``), one data set.

Builds ``annlib.Partitioned`` twice with the same seed (identical leaves and codes; the second
also holds the int8 rows), then for every ``(leaves, reorder)`` of the grid times both indexes in
alternating rounds (float32, int8, float32, int8, ...; best time of each), in batch (all queries
in one call) and one query per call, so a load change on a shared machine hits both alike.
Prints the QPS read off each frontier at recall@10 0.90 / 0.95 / 0.99 (:mod:`.pareto`), the
int8/float32 ratio, bytes per vector, and the per-point table. Single-threaded.

``--stage LEAVES`` also times the re-ranking stage alone (diagnostics, through the index's
private state): the candidates of a batch scan at ``LEAVES`` probed leaves re-ranked by
:func:`annlib.kernels.fastscan.rerank` and :func:`annlib.kernels.rerank_int8.rerank_int8` in
alternating rounds, per ``reorder``.

Usage::

    python -m annlib.bench.partitioned_int8 <file.hdf5> [--rounds 3] [--stage 24] [--out results/int8-<set>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import annlib

from .measures import recall_at_k, true_kth_distances
from .pareto import RECALL_LEVELS, frontier, qps_at_recall

LEAVES = (2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192)
REORDER = (20, 40, 70, 100, 160, 250)
MODES = ("float32", "int8")
K = 10


def _read(path):
    import h5py

    with h5py.File(path, "r") as f:
        X = np.asarray(f["train"], dtype=np.float32)
        Q = np.asarray(f["test"], dtype=np.float32)
        kth = true_kth_distances(K, distances=np.asarray(f["distances"]))
        metric = {"euclidean": "l2", "angular": "cosine"}[f.attrs["distance"]]
    return X, Q, kth, metric


def _batch(index, Q, leaves, reorder):
    t = time.perf_counter()
    ids = index.search(Q, K, leaves=leaves, reorder=reorder).ids
    return time.perf_counter() - t, ids


def _single(index, Q, leaves, reorder):
    ids = np.empty((Q.shape[0], K), dtype=np.int64)
    search = index.search
    t = time.perf_counter()
    for i in range(Q.shape[0]):
        ids[i] = search(Q[i], K, leaves=leaves, reorder=reorder).ids
    return time.perf_counter() - t, ids


def stage_times(index, Q, leaves, rounds):
    """Microseconds per query of the re-ranking stage alone, float32 and int8, per ``reorder``."""
    from annlib.kernels import fastscan, rerank_int8
    from annlib.kernels.quantization import build_luts, pad_columns

    st = index._st
    Qp = np.ascontiguousarray(index._metric.prepare(Q), dtype=np.float32)
    S = Qp @ st.centres.T
    D = st.centre_sqnorms[None, :] - 2.0 * S if st.centre_sqnorms.shape[0] else -S
    _, leaf_ids = fastscan.select_leaves(D, leaves)
    probes = fastscan.Probes(leaf_ids, np.ascontiguousarray(-np.take_along_axis(S, leaf_ids, axis=1),
                                                            dtype=np.float32))
    tables = build_luts(pad_columns(Qp, st.padded_dim), st.codebooks)
    proxy = index._metric.proxy
    out = {}
    for reorder in REORDER:
        _, cand = fastscan.scan_pq(tables, probes, st.packed, np.zeros(0, dtype=bool), reorder, st.num_vectors)
        runs = {"float32": lambda: fastscan.rerank(Qp, st.vectors, cand, K, proxy),
                "int8": lambda: rerank_int8.rerank_int8(Qp, st.rerank_rows, st.vectors, cand, K, proxy)}
        best = {m: float("inf") for m in MODES}
        for _ in range(max(rounds, 5)):
            for mode in MODES:
                t = time.perf_counter()
                runs[mode]()
                best[mode] = min(best[mode], time.perf_counter() - t)
        out[reorder] = {m: 1e6 * best[m] / Q.shape[0] for m in MODES}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per grid point (best kept)")
    p.add_argument("--out", default=None, help="write every point as JSON here")
    p.add_argument("--stage", type=int, default=None, metavar="LEAVES",
                   help="also time the re-ranking stage alone at this many probed leaves")
    p.add_argument("--no-grid", action="store_true", help="skip the (leaves, reorder) sweep (with --stage)")
    args = p.parse_args(argv)
    X, Q, kth, metric = _read(args.path)
    name = os.path.splitext(os.path.basename(args.path))[0]
    annlib.set_num_threads(1)
    indexes, info = {}, {}
    for mode in MODES:
        t = time.perf_counter()
        indexes[mode] = annlib.Partitioned.build(X, metric=metric, rerank=mode, default_recall=None)
        info[mode] = {"build_s": time.perf_counter() - t, "bytes_per_vector": indexes[mode].stats()["bytes_per_vector"]}
    L = indexes["int8"].stats()["num_leaves"]
    # compile and warm both paths before timing
    for mode in MODES:
        _batch(indexes[mode], Q[:8], 8, 100)
        _single(indexes[mode], Q[:8], 8, 100)
    points = []
    for leaves in [v for v in LEAVES if v <= L and not args.no_grid]:
        for reorder in REORDER:
            row = {"leaves": leaves, "reorder": reorder}
            for kind, run in (("batch", _batch), ("single", _single)):
                best = {m: float("inf") for m in MODES}
                for _ in range(args.rounds):
                    for mode in MODES:
                        sec, ids = run(indexes[mode], Q, leaves, reorder)
                        best[mode] = min(best[mode], sec)
                        row[f"recall_{mode}"] = recall_at_k(ids, X, Q, kth, metric, K)
                for mode in MODES:
                    row[f"qps_{kind}_{mode}"] = Q.shape[0] / best[mode]
            points.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for kind in ("batch", "single"):
        for mode in MODES:
            front = frontier([(r[f"recall_{mode}"], r[f"qps_{kind}_{mode}"]) for r in points])
            summary[f"{kind}_{mode}"] = [qps_at_recall(front, lv) if front else None for lv in RECALL_LEVELS]
    print(f"\n{name}: n={X.shape[0]} d={X.shape[1]} q={Q.shape[0]} metric={metric} leaves built={L}")
    print("bytes per vector: " + ", ".join(f"{m} {info[m]['bytes_per_vector']:.1f}" for m in MODES))
    print("| mode | re-ranking | QPS@" + " / ".join(f"{lv:.2f}" for lv in RECALL_LEVELS) + " | int8 / float32 |")
    print("|---|---|---|---|")
    for kind in ("batch", "single"):
        f32, i8 = summary[f"{kind}_float32"], summary[f"{kind}_int8"]
        ratios = " / ".join("-" if a is None or b is None else f"{b / a:.2f}" for a, b in zip(f32, i8))
        for mode, vals in (("float32", f32), ("int8", i8)):
            cells = " / ".join("-" if v is None else f"{v:,.0f}" for v in vals)
            print(f"| {kind} | {mode} | {cells} | {ratios if mode == 'int8' else ''} |")
    stage = None
    if args.stage:
        stage = stage_times(indexes["int8"], Q, args.stage, args.rounds)
        print(f"\nre-ranking stage alone, {args.stage} leaves, us per query (float32 / int8 = ratio):")
        for reorder, t in stage.items():
            print(f"  reorder {reorder}: {t['float32']:.1f} / {t['int8']:.1f} = {t['float32'] / t['int8']:.2f}x")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"dataset": name, "info": info, "points": points, "summary": summary, "stage": stage}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
