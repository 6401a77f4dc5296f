"""HNSW (+FINGER, or walking 8-bit codes) against hnswlib and pynndescent on one data set, timed
in alternating rounds.

For each method and search setting the script first measures recall@10 and (annlib only) the
exact distance evaluations and FINGER estimates per query, which do not depend on the load of
the machine. It then times every (method, setting) point once per round, in a new random order
each round, for ``--rounds`` rounds, and reports the median time per point: a load change hits
every method alike instead of whichever block happened to run at that moment. Times are thread
CPU time of at least 30 ms of repeated calls, so time spent descheduled by other jobs does not
count (cache and memory-bandwidth contention from them still does). QPS at recall
0.90 / 0.95 / 0.99 is read off each method's Pareto frontier (linear interpolation between
neighbouring points), as the main harness does.

Builds are cached in ``--cache`` (annlib's file format, hnswlib's ``save_index``), keyed by data
set and build parameters, so a change to the walk can be measured against the same graphs.

    taskset -c 0 python -m bench.hnsw_gap kdewall-sift-128-euclidean-100k --queries 500
        [--modes batch,single] [--rounds 5] [--methods annlib,sq8,hnswlib,pynndescent] [--out f.json]
        [--also annlib_before]

Method ``sq8`` is annlib built with ``walk="sq8"`` (the same graph: the build inserts on the
float32 vectors with the same seed), searched at ``rescore`` 2 (the default) and 1.5.

``--also NAME`` adds the annlib methods of another importable copy of the library (e.g. an
earlier commit extracted with ``git archive`` and renamed: the package directory and the
``register_family`` targets at the end of its ``api.py``, through which ``load`` finds the class),
so before and after are timed in the same rounds of one process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]

EFS = [10, 12, 14, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384]
EPSILONS = [0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.16, 0.2, 0.24, 0.3, 0.36]
LEVELS = (0.90, 0.95, 0.99)
K = 10
MIN_SPAN = 0.03  # seconds of CPU time per timed sample


def _load(name: str, data_dir: str, queries: int | None):
    import h5py

    with h5py.File(os.path.join(data_dir, name + ".hdf5"), "r") as f:
        X = np.ascontiguousarray(f["train"][:], dtype=np.float32)
        Q = np.ascontiguousarray(f["test"][:], dtype=np.float32)
        gt = np.asarray(f["neighbors"][:, :K], dtype=np.int64)
        metric = f.attrs.get("distance", "euclidean")
    if isinstance(metric, bytes):
        metric = metric.decode()
    if queries is not None and queries < Q.shape[0]:
        pick = np.sort(np.random.default_rng(0).choice(Q.shape[0], queries, replace=False))
        Q, gt = Q[pick], gt[pick]
    if metric == "angular":
        X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-30)
        Q /= np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-30)
    return X, Q, gt, ("cosine" if metric == "angular" else "l2")


def _recall(ids: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(ids, gt)]))


def _frontier_qps(points, level):
    """QPS at ``level`` on the Pareto frontier of (recall, qps) points (None if never reached)."""
    pts = sorted(points, key=lambda p: -p[0])
    front = []
    best = -1.0
    for rec, q in pts:  # recall descending: keep a point when it is faster than every better one
        if q > best:
            front.append((rec, q))
            best = q
    front.sort()
    for (r0, q0), (r1, q1) in zip(front, front[1:]):
        if r0 <= level <= r1:
            return q0 if r1 == r0 else q0 + (q1 - q0) * (level - r0) / (r1 - r0)
    if front and front[0][0] >= level:
        return front[0][1]
    return None


def _build_annlib(X, metric, M, finger, cache, key, lib=None, **extra):
    import annlib

    path = cache / f"{key}-annlib-M{M}-f{int(finger)}{''.join(f'-{k}{v}' for k, v in extra.items())}.annlib"
    if path.exists():
        index = (lib or annlib).load(str(path))
        if lib is not None and not type(index).__module__.startswith(lib.__name__ + "."):
            # load() finds the class through the family targets of api.register_family, which
            # name the package: an unrenamed copy would time this checkout's code twice
            raise SystemExit(f"--also {lib.__name__}: load() returned {type(index).__module__}."
                             f"{type(index).__name__}; rename the register_family targets in its "
                             f"api.py to {lib.__name__}.*")
        return index, None
    t = time.perf_counter()
    # method "annlib" is the float walk whatever the library's default walk (the cache key
    # names only what differs from it)
    walk = {"walk": "float"} if "walk" in (lib or annlib).HNSW.build_defaults else {}
    index = (lib or annlib).HNSW(metric=metric, M=M, ef_construction=200, finger=finger, default_recall=None,
                                 **{**walk, **extra}).build(X)
    built = time.perf_counter() - t
    index.save(str(path))
    return index, built


def _build_hnswlib(X, metric, M, cache, key):
    import hnswlib

    path = cache / f"{key}-hnswlib-M{M}.bin"
    index = hnswlib.Index(space="l2" if metric == "l2" else "ip", dim=X.shape[1])
    built = None
    if path.exists():
        index.load_index(str(path), max_elements=X.shape[0])
    else:
        t = time.perf_counter()
        index.init_index(max_elements=X.shape[0], M=M, ef_construction=200, random_seed=100)
        index.add_items(X, np.arange(X.shape[0]))
        built = time.perf_counter() - t
        index.save_index(str(path))
    index.set_num_threads(1)
    return index, built


def _points(args, X, Q, metric):
    """name -> (list of (label, batch fn, single fn, stats fn or None), bytes per vector)."""
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    key = args.dataset
    n = X.shape[0]
    out = {}
    methods = args.methods.split(",")
    libs = [("annlib", None)] if "annlib" in methods else []
    for name in args.also:
        libs.append((name, importlib.import_module(name)))
    for libname, lib in libs:
        for M in args.M:
            index, built = _build_annlib(X, metric, M, True, cache, key, lib)
            fp = index._graph.finger
            payload = 0 if fp is None else fp.codes[:index._graph.n].nbytes + fp.basis.nbytes + fp.table.nbytes
            plain_bytes = index.memory_bytes() - payload
            for finger in (False, True):
                pts = []
                for ef in EFS:
                    def batch(ef=ef, finger=finger, index=index):
                        return index.search(Q, K, ef=ef, finger=finger)[0]

                    def single(ef=ef, finger=finger, index=index):
                        return np.stack([index.search(q, K, ef=ef, finger=finger)[0][0] for q in Q])

                    pts.append((f"ef={ef}", batch, single, index))
                name = f"{libname} M={M} " + ("FINGER" if finger else "plain")
                out[name] = (pts, (plain_bytes + (payload if finger else 0)) / n, built)
    if "sq8" in methods:
        for M in args.M:
            index, built = _build_annlib(X, metric, M, False, cache, key, walk="sq8")
            for rescore in (2.0, 1.5):
                pts = []
                for ef in EFS:
                    def batch(ef=ef, rescore=rescore, index=index):
                        return index.search(Q, K, ef=ef, rescore=rescore)[0]

                    def single(ef=ef, rescore=rescore, index=index):
                        return np.stack([index.search(q, K, ef=ef, rescore=rescore)[0][0] for q in Q])

                    pts.append((f"ef={ef}", batch, single, index))
                out[f"annlib M={M} sq8 r{rescore:g}"] = (pts, index.memory_bytes() / n, built)
    if "hnswlib" in methods:
        for M in args.M:
            index, built = _build_hnswlib(X, metric, M, cache, key)
            pts = []
            for ef in EFS:
                def batch(ef=ef, index=index):
                    index.set_ef(ef)
                    return index.knn_query(Q, k=K, num_threads=1)[0]

                def single(ef=ef, index=index):
                    index.set_ef(ef)
                    return np.stack([index.knn_query(q, k=K)[0][0] for q in Q])

                pts.append((f"ef={ef}", batch, single, None))
            with_file = cache / f"{key}-hnswlib-M{M}.bin"
            out[f"hnswlib M={M}"] = (pts, os.path.getsize(with_file) / n, built)
    if "pynndescent" in methods:
        import pickle

        from pynndescent import NNDescent

        path = cache / f"{key}-pynndescent.pkl"
        built = None
        if path.exists():
            index = pickle.loads(path.read_bytes())
        else:
            t = time.perf_counter()
            index = NNDescent(X, metric="euclidean" if metric == "l2" else "dot", n_neighbors=30,
                              random_state=42, n_jobs=1)
            index.prepare()
            built = time.perf_counter() - t
            path.write_bytes(pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL))
        index.query(Q[:5], k=K)  # compile
        pts = []
        for eps in EPSILONS:
            def batch(eps=eps, index=index):
                return index.query(Q, k=K, epsilon=eps)[0]

            def single(eps=eps, index=index):
                return np.stack([index.query(q[None], k=K, epsilon=eps)[0][0] for q in Q])

            pts.append((f"eps={eps}", batch, single, None))
        out["pynndescent"] = (pts, len(pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL)) / n, built)
    return out


def main(argv=None) -> dict:
    """Run the comparison; prints a table and returns (and optionally writes) the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset")
    p.add_argument("--data-dir", default=os.environ.get("ANNLIB_DATA", "data"))
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--methods", default="annlib,sq8,hnswlib,pynndescent")
    p.add_argument("--M", type=lambda s: [int(v) for v in s.split(",")], default=[16, 32])
    p.add_argument("--modes", default="batch,single")
    p.add_argument("--also", action="append", default=[],
                   help="another importable copy of the library (e.g. an older commit installed under "
                        "another package name), measured on the same cached graphs in the same rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "hnsw_gap_cache"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import annlib

    X, Q, gt, metric = _load(args.dataset, args.data_dir, args.queries)
    methods = _points(args, X, Q, metric)
    annlib.config.set_num_threads(1)
    report = {"dataset": args.dataset, "n": X.shape[0], "d": X.shape[1], "queries": Q.shape[0],
              "load_start": os.getloadavg()[0], "methods": {}}
    # recall and evaluation counts (untimed), and a warm-up of every point
    rows = {}
    for name, (pts, bpv, built) in methods.items():
        for label, batch, single, index in pts:
            if index is not None:
                index.reset_search_stats()
            ids = batch()
            st = index.search_stats() if index is not None else {}
            rows[(name, label)] = {"recall": _recall(ids, gt),
                                   "exact": st.get("exact_per_query"), "estimates": st.get("estimated_per_query")}
    for mode in args.modes.split(","):
        times = {key: [] for key in rows}
        fns = [(name, label, batch if mode == "batch" else single)
               for name, (pts, _, _) in methods.items() for label, batch, single, _ in pts]
        rng = random.Random(0)
        loads = []
        for _ in range(args.rounds):
            rng.shuffle(fns)
            loads.append(os.getloadavg()[0])
            for name, label, fn in fns:
                # thread CPU time, repeated to >= MIN_SPAN: time spent descheduled by other
                # jobs on a loaded machine is not counted
                reps = 0
                t = time.thread_time()
                while True:
                    fn()
                    reps += 1
                    spent = time.thread_time() - t
                    if spent >= MIN_SPAN:
                        break
                times[(name, label)].append(spent / reps)
        for key, ts in times.items():
            rows[key][f"qps_{mode}"] = Q.shape[0] / float(np.median(ts))
        report[f"load_{mode}"] = [min(loads), max(loads)]
    for name, (pts, bpv, built) in methods.items():
        entry = {"bytes_per_vector": bpv, "build_s": built,
                 "points": {label: rows[(name, label)] for label, *_ in pts}}
        for mode in args.modes.split(","):
            pr = [(v["recall"], v[f"qps_{mode}"]) for v in entry["points"].values()]
            entry[f"at_{mode}"] = {str(lv): _frontier_qps(pr, lv) for lv in LEVELS}
        # exact evaluations at the first point reaching each recall level (annlib only)
        if next(iter(entry["points"].values()))["exact"] is not None:
            ev = {}
            for lv in LEVELS:
                hit = [v for v in entry["points"].values() if v["recall"] >= lv]
                ev[str(lv)] = None if not hit else (hit[0]["exact"], hit[0]["estimates"])
            entry["evals_at"] = ev
        report["methods"][name] = entry
    report["load_end"] = os.getloadavg()[0]
    _print(report, args.modes.split(","))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


def _print(report, modes):
    print(f"{report['dataset']} n={report['n']} d={report['d']} q={report['queries']} "
          f"load start {report['load_start']:.2f} end {report['load_end']:.2f} "
          + " ".join(f"{m} {report[f'load_{m}'][0]:.2f}-{report[f'load_{m}'][1]:.2f}" for m in modes))
    for mode in modes:
        print(f"-- {mode}: QPS at recall {', '.join(map(str, LEVELS))}")
        for name, e in report["methods"].items():
            vals = ["—" if v is None else f"{v:,.0f}" for v in e[f"at_{mode}"].values()]
            extra = ""
            if "evals_at" in e:
                extra = "  evals " + " ".join("—" if v is None else f"{v[0]:.0f}+{v[1]:.0f}e" for v in e["evals_at"].values())
            print(f"  {name:24s} {' | '.join(vals):30s} B/vec {e['bytes_per_vector']:,.0f}{extra}")


if __name__ == "__main__":
    main()
