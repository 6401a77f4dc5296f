"""recall@10 of every family at its untuned defaults: ``Index.build(X, method=f).search(Q, 10)``.

What a user gets without naming a search parameter, measured on a data set's test queries
(which the build never sees). HNSW and Partitioned tune their defaults at the end of ``build``
(``default_recall=0.92``, queries made from the data); the other families keep fixed defaults.
Also ``Index.build(X)`` (``auto``, target 0.95). Single-threaded; prints a Markdown table headed
by the command and the load average.

    python -m annlib.bench.default_recall --dataset glove-50-angular-200k
    python -m annlib.bench.default_recall --dataset synthetic:clusters:10000:64:200

``synthetic:gaussian:N:D`` is N i.i.d. standard normal vectors of dimension D plus 1,000 fresh
queries; ``synthetic:clusters:N:D:C`` draws them around C Gaussian centres (spread 3, unit
noise). Seed 0, euclidean.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

__all__ = ["main"]

FAMILIES = ("bruteforce", "hnsw", "partitioned", "tpuknn", "mahalanobis", "auto")


class _Synthetic:
    """A generated data set with the fields ``Workload.from_dataset`` reads."""

    def __init__(self, spec: str):
        import numpy as np

        parts = spec.split(":")
        kind, n, d = parts[1], int(parts[2]), int(parts[3])
        g = np.random.default_rng(0)
        if kind == "gaussian":
            draw = lambda m: g.standard_normal((m, d))
        elif kind == "clusters":
            centres = g.standard_normal((int(parts[4]), d)) * 3
            draw = lambda m: centres[g.integers(0, len(centres), m)] + g.standard_normal((m, d))
        else:
            raise ValueError(f"unknown synthetic kind {kind!r}; use gaussian or clusters")
        self.name = spec.replace(":", "-")
        self.train = draw(n).astype(np.float32)
        self.test = draw(1000).astype(np.float32)
        self.metric = "euclidean"
        d2 = ((self.test ** 2).sum(1)[:, None] - 2 * self.test @ self.train.T + (self.train ** 2).sum(1)[None])
        self.neighbors = np.argsort(d2, axis=1)[:, :100]
        self.distances = None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m annlib.bench.default_recall",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args(argv)
    import annlib
    from annlib.datasets import load

    from .measures import best_time, qps
    from .runner import Workload

    annlib.set_num_threads(1)
    ds = _Synthetic(args.dataset) if args.dataset.startswith("synthetic:") else load(args.dataset)
    work = Workload.from_dataset(ds, k=args.k, queries=args.queries)
    command = shlex.join(["python -m annlib.bench.default_recall", *argv])
    load_before = os.getloadavg()[0]
    rows = []
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        method = {} if family == "auto" else {"method": family}
        t0 = time.perf_counter()
        try:
            index = annlib.Index.build(work.train, metric=work.metric, threads=1, **method)
        except ValueError as exc:  # a family without this metric (MahalanobisSketch and cosine)
            rows.append((family, {"not built": str(exc).split(";")[0]}, float("nan"), float("nan"), 0.0))
            print(f"{family}: {exc}", flush=True)
            continue
        build_s = time.perf_counter() - t0
        if hasattr(index, "warmup"):
            index.warmup()
        ids, _ = index.search(work.queries, work.k)
        recall = work.recall(ids)
        seconds, _, _ = best_time(lambda: index.search(work.queries, work.k), min_reps=3, min_seconds=0.3)
        tuning = getattr(index, "tuning", None) or {}
        params = tuning.get("params") or index.default_search_params
        rows.append((family if family != "auto" else f"auto → {index.family}", params, recall,
                     qps(len(work.queries), seconds), build_s))
        print(f"{rows[-1][0]}: recall {recall:.4f} with {params}, build {build_s:.1f} s", flush=True)
    load_after = os.getloadavg()[0]
    print(f"\n`{command}` — {ds.name} (n={len(work.train):,}, d={work.train.shape[1]}, "
          f"{len(work.queries):,} test queries); load average {load_before:.2f} before, {load_after:.2f} after\n")
    print("| family | default search parameters | recall@10 | batch QPS | build s (incl. self-tune) |")
    print("|---|---|---:|---:|---:|")
    for name, params, recall, q, build_s in rows:
        shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "—"
        print(f"| {name} | {shown} | {recall:.4f} | {q:,.0f} | {build_s:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
