"""Build time of annlib HNSW vs hnswlib with one thread and with every thread.

Usage: ``python bench/hnsw_build_time.py DATASET [M ...]`` (DATASET as for ``annlib-bench``).
Prints one line per (library, M, threads): wall-clock seconds of one build, after a small
warm-up build that absorbs JIT compilation. Wrap it in the benchmark lock like every timing run.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main(argv: list[str]) -> None:
    import hnswlib

    import annlib
    from annlib import datasets
    from annlib.bench.measures import canonical_metric

    name = argv[0]
    Ms = [int(m) for m in argv[1:]] or [16, 32]
    ds = datasets.load(name, progress=False)
    X = np.ascontiguousarray(ds.train, dtype=np.float32)
    metric = canonical_metric(ds.metric)
    if metric == "cosine":
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
    all_threads = annlib.config.max_threads()
    print(f"{name}: n={len(X)} d={X.shape[1]} metric={metric}")
    for M in Ms:
        for threads in sorted({1, all_threads}):
            annlib.HNSW(metric=metric, M=M).build(X[:2000], threads=threads)  # warm-up
            t = time.perf_counter()
            annlib.HNSW(metric=metric, M=M, finger=False, walk="float").build(X, threads=threads)
            plain = time.perf_counter() - t
            t = time.perf_counter()
            annlib.HNSW(metric=metric, M=M, finger=True).build(X, threads=threads)
            fing = time.perf_counter() - t
            h = hnswlib.Index(space="l2" if metric == "l2" else "ip", dim=X.shape[1])
            h.init_index(max_elements=len(X), M=M, ef_construction=200, random_seed=100)
            t = time.perf_counter()
            h.add_items(X, np.arange(len(X)), num_threads=threads)
            ref = time.perf_counter() - t
            print(f"M={M} threads={threads}: annlib plain {plain:.2f} s, annlib+FINGER {fing:.2f} s, "
                  f"hnswlib {ref:.2f} s, ratio plain/hnswlib {plain / ref:.2f}, "
                  f"FINGER/hnswlib {fing / ref:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
