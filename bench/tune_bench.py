"""Tuned points against the grid search they replace (issue: auto-tuning).

For each annlib family (and ``auto``) on one data set, single-threaded:

1. build the family once and ``annlib.tune`` it for each target on queries made from the
   training vectors only, as ``Index.build`` self-tunes (``bench/tuned_build.py``: HNSW holds
   1,000 vectors out of the build, tunes on them, then adds them; Partitioned searches 1,000
   indexed vectors leave-one-out); the test queries are never seen by the tuner;
2. grid search: every setting of ``search_space()`` measured on the data set's test queries
   (recall@k as ann-benchmarks computes it, batch QPS as the best of several runs), timed whole;
3. each tuned point measured on the test queries, and timed in turn with the three best grid
   points meeting the target (the grid's first-pass maximum is biased upwards by noise);
4. ``auto``: ``Index.build(train, target_recall=t)`` measured the same way, against the best
   family's grid frontier at the target;
5. the anchor, ``faiss``: faiss's own auto-tuner (``ParameterSpace.explore``, which times every
   ``nprobe`` × ``k_factor_rf`` combination it does not prune and keeps the ``OperatingPoints``
   frontier) on its IVF-PQ fast-scan + exact re-ranking index at Partitioned's leaf count, given
   the same kind of training-made queries (perturbed indexed vectors, as HNSW is tuned: faiss
   cannot leave a query's own vector out) with their exact ground truth; the cheapest operating
   point meeting the target is measured on the test queries against faiss's whole grid.

Prints a Markdown table headed by the command and the load average; writes JSON with ``--out``.

    python -m annlib.bench.tune_bench --dataset glove-50-angular-200k --queries 1000 --out results/tune
    python -m annlib.bench.tune_bench --summarize results/tune     # one table of every run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
import time

import numpy as np

from .measures import best_time, qps
from .runner import Workload

__all__ = ["main"]


def _measure(index, work: Workload, params: dict) -> tuple[float, float]:
    ids, _ = index.search(work.queries, work.k, threads=1, **params)
    recall = work.recall(ids)
    seconds, _, _ = best_time(lambda: index.search(work.queries, work.k, threads=1, **params),
                              min_reps=3, min_seconds=0.3)
    return recall, qps(len(work.queries), seconds)


def _grid(index) -> list[dict]:
    space = index.search_space()["search"]
    names = [n for n in space if n != "finger"]
    return [dict(zip(names, values)) for values in itertools.product(*(space[n] for n in names))]


def _paired(timers: list, rounds: int = 3) -> list[float]:
    """QPS of several search calls timed in turn, best of ``rounds`` each.

    The grid's best point at a target is the maximum of many noisy timings, which favours it
    (its own lucky run); timing the tuned point and the few best grid candidates again, one
    after another, compares them under the same conditions.
    """
    best = [0.0] * len(timers)
    for _ in range(rounds):
        for i, (n_queries, call) in enumerate(timers):
            seconds, _, _ = best_time(call, min_reps=2, min_seconds=0.2)
            best[i] = max(best[i], qps(n_queries, seconds))
    return best


def _compare(work: Workload, tuned_params, grid: list[dict], target: float, call_at) -> tuple[float, float | None, dict | None]:
    """(tuned QPS, best grid QPS at ``target`` re-timed, that grid point), timed in turn.

    A grid point with the tuned parameters is the same search: it is timed once and shared, so
    their ratio is exactly 1 rather than the noise between two timings of one thing.
    """
    ok = sorted((p for p in grid if p["recall"] >= target), key=lambda p: -p["qps"])[:3]
    others = [p for p in ok if p["params"] != tuned_params]
    n = len(work.queries)
    timed = _paired([(n, call_at(tuned_params))] + [(n, call_at(p["params"])) for p in others], rounds=5)
    if not ok:
        return timed[0], None, None
    candidates = [(timed[0], tuned_params)] if len(others) < len(ok) else []
    candidates += [(q, p["params"]) for q, p in zip(timed[1:], others)]
    best, params = max(candidates, key=lambda c: c[0])
    return timed[0], best, params


def _best_at(points: list[dict], target: float) -> float | None:
    ok = [p["qps"] for p in points if p["recall"] >= target]
    return max(ok) if ok else None


def run_family(family: str, work: Workload, targets: list[float], build_params: dict, log) -> dict:
    from .tuned_build import build_and_tune

    index, build_s, tunings = build_and_tune(family, work.train, work.metric, targets, k=work.k,
                                             threads=1, **build_params)
    index.warmup()
    grid = []
    t0 = time.perf_counter()
    for params in _grid(index):
        recall, q = _measure(index, work, params)
        grid.append({"params": params, "recall": recall, "qps": q})
    grid_s = time.perf_counter() - t0
    log(f"{family}: built in {build_s:.1f} s, grid of {len(grid)} points in {grid_s:.1f} s")
    tuned = []
    search_at = (lambda p: (lambda: index.search(work.queries, work.k, threads=1, **p)))
    for target in targets:
        params, info = tunings[target]
        if params is None:
            tuned.append({"target": target, "params": None, "note": info["error"]})
            log(f"  target {target}: {info['error']}")
            continue
        recall, _ = _measure(index, work, params)
        q, best, best_params = _compare(work, params, grid, target, search_at)
        tuned.append({"target": target, "params": params, "predicted_recall": info["predicted_recall"],
                      "sample_held_out_recall": info["held_out_recall"], "test_recall": recall, "qps": q,
                      "best_grid_qps": best, "best_grid_params": best_params,
                      "first_pass_best_grid_qps": _best_at(grid, target),
                      "qps_ratio": None if not best else q / best,
                      "tune_seconds": info["tune_s"], "tune_fraction_of_grid": info["tune_s"] / grid_s})
        log(f"  target {target}: {params} test recall {recall:.4f}, {q:,.0f} QPS, "
            f"best grid {best if best is None else round(best)} at {best_params}; tuning {info['tune_s']:.1f} s")
    num_leaves = index.stats()["num_leaves"] if family == "partitioned" else None
    return {"_search_at": search_at, "family": family, "build_params": build_params, "build_seconds": build_s,
            "num_leaves": num_leaves, "grid_seconds": grid_s, "grid": grid, "tuned": tuned,
            "tune_seconds_total": sum(t.get("tune_seconds", 0.0) for t in tuned)}


def _faiss_grid_params(ps, index) -> list[tuple[str, dict]]:
    """Every combination of the ParameterSpace ranges, as faiss keys and as dicts."""
    import faiss

    ranges = []
    for i in range(ps.parameter_ranges.size()):
        rng_i = ps.parameter_ranges.at(i)  # keep the range alive while its values are copied
        ranges.append((str(rng_i.name), [float(v) for v in faiss.vector_to_array(rng_i.values)]))
    out = []
    for values in itertools.product(*(v for _, v in ranges)):
        params = {name: int(v) for (name, _), v in zip(ranges, values)}
        out.append((",".join(f"{k}={v}" for k, v in params.items()), params))
    return out


def run_faiss_anchor(work: Workload, targets: list[float], nlist: int, log) -> dict:
    """faiss IVF-PQ fast-scan + RFlat tuned by faiss's ParameterSpace/OperatingPoints."""
    import faiss
    import annlib
    from annlib.tune.auto import PERTURBATION

    faiss.omp_set_num_threads(1)
    angular = work.metric in ("cosine", "angular")
    prep = (lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)) if angular else (lambda x: x)
    X = np.ascontiguousarray(prep(work.train), dtype=np.float32)
    d = X.shape[1]
    m = d // 2 if (d // 2) % 2 == 0 else d
    metric = faiss.METRIC_INNER_PRODUCT if angular else faiss.METRIC_L2
    t0 = time.perf_counter()
    index = faiss.index_factory(d, f"IVF{nlist},PQ{m}x4fs,RFlat", metric)
    index.train(X)
    index.add(X)
    build_s = time.perf_counter() - t0
    Qt = np.ascontiguousarray(prep(work.queries), dtype=np.float32)

    def measure(key):
        ps.set_index_parameters(index, key)
        _, ids = index.search(Qt, work.k)
        seconds, _, _ = best_time(lambda: index.search(Qt, work.k), min_reps=3, min_seconds=0.3)
        return work.recall(ids), qps(len(Qt), seconds)

    ps = faiss.ParameterSpace()
    ps.initialize(index)
    ps.verbose = 0
    grid = []
    t0 = time.perf_counter()
    for key, params in _faiss_grid_params(ps, index):
        recall, q = measure(key)
        grid.append({"params": params, "recall": recall, "qps": q})
    grid_s = time.perf_counter() - t0
    log(f"faiss IVF{nlist},PQ{m}x4fs,RFlat: built in {build_s:.1f} s, grid of {len(grid)} points in {grid_s:.1f} s")
    # The tuning queries: perturbed indexed vectors (annlib.tune.auto.tuning_queries' second
    # kind), ground truth by exact search, both counted in the tuning time.
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    pos = np.sort(rng.choice(len(X), min(1000, len(X)), replace=False))
    S = X[pos]
    flat = faiss.IndexFlatL2(d) if metric == faiss.METRIC_L2 else faiss.IndexFlatIP(d)
    flat.add(X)
    Dn, In = flat.search(S, 2)
    nearest = np.where(In[:, 0] == pos, In[:, 1], In[:, 0])
    radius = np.linalg.norm(S - X[nearest], axis=1)
    Qs = np.ascontiguousarray(S + rng.standard_normal(S.shape).astype(np.float32)
                              * (PERTURBATION * radius / np.sqrt(d))[:, None], dtype=np.float32)
    Qs = np.ascontiguousarray(prep(Qs), dtype=np.float32)
    D, I = flat.search(Qs, work.k)
    crit = faiss.IntersectionCriterion(len(Qs), work.k)
    crit.set_groundtruth(D, I.astype("int64"))
    ops = ps.explore(index, Qs, crit)
    explore_s = time.perf_counter() - t0
    optimal = [ops.optimal_pts.at(i) for i in range(ops.optimal_pts.size())]
    tuned = []
    for target in targets:
        ok = [p for p in optimal if p.perf >= target]
        if not ok:
            tuned.append({"target": target, "params": None, "note": "no operating point reached the target"})
            log(f"  faiss target {target}: no operating point reached it")
            continue
        point = min(ok, key=lambda p: p.t)
        recall, _ = measure(point.key)

        def search_at(key):
            def call():
                ps.set_index_parameters(index, key)
                index.search(Qt, work.k)
            return call

        grid_keyed = [{**g, "params": ",".join(f"{k}={v}" for k, v in g["params"].items())} for g in grid]
        q, best, best_params = _compare(work, point.key, grid_keyed, target, search_at)
        tuned.append({"target": target, "params": point.key, "predicted_recall": point.perf,
                      "test_recall": recall, "qps": q, "best_grid_qps": best, "best_grid_params": best_params,
                      "qps_ratio": None if not best else q / best, "tune_seconds": explore_s,
                      "tune_fraction_of_grid": explore_s / grid_s})
        log(f"  faiss target {target}: {point.key} test recall {recall:.4f}, {q:,.0f} QPS, "
            f"best grid {best if best is None else round(best)}; explore {explore_s:.1f} s")
    return {"family": "faiss-ivfpqfs (OperatingPoints)", "build_params": {"nlist": nlist, "m": m},
            "build_seconds": build_s, "grid_seconds": grid_s, "grid": grid, "tuned": tuned}


def run_auto(work: Workload, targets: list[float], families: list[dict], log) -> list[dict]:
    """``Index.build(train, target_recall=t)`` per target, timed in turn with the two best grid
    points (first pass) of each annlib family measured before that meet the target."""
    import annlib

    out = []
    n = len(work.queries)
    for target in targets:
        t0 = time.perf_counter()
        index = annlib.Index.build(work.train, metric=work.metric, target_recall=target, threads=1)
        build_s = time.perf_counter() - t0
        index.warmup()
        recall, _ = _measure(index, work, {})
        rivals = []
        for r in families:
            ok = sorted((p for p in r["grid"] if p["recall"] >= target), key=lambda p: -p["qps"])[:2]
            rivals += [(r["family"], p["params"], r["_search_at"](p["params"])) for p in ok]
        timed = _paired([(n, lambda: index.search(work.queries, work.k, threads=1))]
                        + [(n, call) for _, _, call in rivals])
        q = timed[0]
        j = int(np.argmax(timed[1:])) if rivals else None
        best_family, best_params = (rivals[j][0], rivals[j][1]) if rivals else (None, None)
        best = timed[1 + j] if rivals else None
        out.append({"target": target, "family": index.family, "params": index.tuning["params"],
                    "build_params": index.tuning.get("build_params"),
                    "test_recall": recall, "qps": q, "build_seconds": build_s,
                    "best_family": best_family, "best_family_params": best_params, "best_family_qps": best,
                    "qps_ratio": None if not best else q / best, "rule": index.tuning["rule"]})
        log(f"auto {target}: {index.family} {index.tuning['params']} test recall {recall:.4f}, {q:,.0f} QPS "
            f"(best family {best_family} {best if best is None else round(best)})")
    return out


def summarize(folder: str) -> str:
    """One Markdown table of every ``tune-*.json`` in ``folder`` (the docs' must-show table)."""
    import glob

    rows = ["| data set | index | target | tuned parameters | test recall | QPS ÷ best grid at target "
            "(that grid point) | tuning s (÷ grid time) | load before/after |",
            "|---|---|---:|---|---:|---:|---:|---|"]
    for path in sorted(glob.glob(os.path.join(folder, "tune-*.json"))):
        doc = json.load(open(path))
        name = os.path.basename(path)[5:-5]
        load = "/".join(f"{v:.2f}" for v in doc["load_average"])
        for r in doc["families"]:
            for t in r["tuned"]:
                if t.get("params") is None:
                    rows.append(f"| {name} | {r['family']} | {t['target']} | {t['note']} | | | | {load} |")
                    continue
                ratio = "—" if t["qps_ratio"] is None else f"{t['qps_ratio']:.2f} ({t.get('best_grid_params')})"
                rows.append(f"| {name} | {r['family']} | {t['target']} | {t['params']} | {t['test_recall']:.4f} | "
                            f"{ratio} | {t['tune_seconds']:.1f} ({100 * t['tune_fraction_of_grid']:.0f} %) | {load} |")
        for a in doc.get("auto", []):
            ratio = "—" if a["qps_ratio"] is None else f"{a['qps_ratio']:.2f} ({a['best_family']} {a['best_family_params']})"
            rows.append(f"| {name} | auto → {a['family']} {a.get('build_params') or ''} | {a['target']} | {a['params']} | "
                        f"{a['test_recall']:.4f} | {ratio} | build {a['build_seconds']:.0f} s | {load} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--summarize"]:
        print(summarize(argv[1] if len(argv) > 1 else "results/tune"))
        return 0
    p = argparse.ArgumentParser(prog="python -m annlib.bench.tune_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--families", default="partitioned,hnsw,faiss,auto",
                   help="annlib families, 'auto', and 'faiss' (the anchor; needs partitioned first)")
    p.add_argument("--targets", default="0.9,0.95,0.99")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--hnsw-M", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import annlib
    from annlib.datasets import load

    annlib.set_num_threads(1)
    log = (lambda msg: print(msg, flush=True))
    ds = load(args.dataset)
    work = Workload.from_dataset(ds, k=args.k, queries=args.queries)
    targets = [float(t) for t in args.targets.split(",")]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    command = shlex.join(["python -m annlib.bench.tune_bench", *argv])
    load_before = os.getloadavg()[0]
    log(f"{command}\ndata: {ds.name} n={len(work.train)} d={work.train.shape[1]} queries={len(work.queries)} "
        f"metric={work.metric}; load average {load_before:.2f}")
    results, frontier = [], {}
    for family in families:
        if family == "auto":
            continue
        if family == "faiss":
            nlist = next((r["num_leaves"] for r in results if r.get("num_leaves")), None)
            if nlist is None:
                nlist = int(round(2 * np.sqrt(len(work.train))))
            results.append(run_faiss_anchor(work, targets, nlist, log))
            continue
        params = {"M": args.hnsw_M} if family == "hnsw" else {}
        r = run_family(family, work, targets, params, log)
        results.append(r)
        frontier[family] = {t: _best_at(r["grid"], t) for t in targets}
    annlib_runs = [r for r in results if "_search_at" in r]
    auto = run_auto(work, targets, annlib_runs, log) if "auto" in families else []
    for r in annlib_runs:
        del r["_search_at"]
    load_after = os.getloadavg()[0]
    print(f"\n`{command}` — load average {load_before:.2f} before, {load_after:.2f} after\n")
    print("| family | target | tuned params | test recall | QPS | best grid QPS at target | ratio | tuning s | ÷ grid time |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for t in r["tuned"]:
            if t.get("params") is None:
                print(f"| {r['family']} | {t['target']} | {t['note']} | | | | | | |")
                continue
            best = "—" if t["best_grid_qps"] is None else f"{t['best_grid_qps']:,.0f}"
            ratio = "—" if t["qps_ratio"] is None else f"{t['qps_ratio']:.2f}"
            print(f"| {r['family']} | {t['target']} | {t['params']} | {t['test_recall']:.4f} | {t['qps']:,.0f} | "
                  f"{best} | {ratio} | {t['tune_seconds']:.1f} | {100 * t['tune_fraction_of_grid']:.0f} % |")
    for a in auto:
        best = "—" if a["best_family_qps"] is None else f"{a['best_family_qps']:,.0f} ({a['best_family']})"
        ratio = "—" if a["qps_ratio"] is None else f"{a['qps_ratio']:.2f}"
        print(f"| auto → {a['family']} | {a['target']} | {a['params']} | {a['test_recall']:.4f} | {a['qps']:,.0f} | "
              f"{best} | {ratio} | build {a['build_seconds']:.0f} s | |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"tune-{ds.name}.json"), "w") as fh:
            json.dump({"command": command, "load_average": [load_before, load_after], "families": results,
                       "auto": auto}, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
