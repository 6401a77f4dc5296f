"""Throughput of a ShardedIndex with 1, 2 and 4 shards, thread-pool against Ray executor, the
scatter/merge overhead as a share of query time, and the recovery time after an actor is killed.

For each family and shard count the sharded index is built once with the thread-pool executor
and saved; the thread-pool run searches it, then the Ray run loads the same files into one actor
per shard (read into memory, or mapped with ``--mmap``) and searches them with the same batches, so both executors search the
very same shards. Each figure is the best of ``--repeats`` passes over ``--queries`` queries in
batches of ``--batch``, after one warm-up pass.

* ``QPS (wall)``: queries per second over the whole pass, by the clock.
* ``QPS per CPU-second``: queries per CPU-second used by this process and every process it
  started (for Ray: raylet, GCS, workers, actors) during the pass. On a machine shared with other
  work the clock counts time spent waiting for a core; CPU time does not.
* ``shard cpu``: CPU seconds the shards' own searches took (measured inside each shard), summed
  over shards. ``overhead (CPU)`` = 1 - shard cpu / all CPU of the pass: the share of the work
  spent outside the shards' searches (queries checked, scattered, results gathered, merged, and
  Ray's own processes). ``overhead (wall)`` = 1 - shard cpu / wall time: the same against the
  clock, which counts waits for a busy core too. (With one core per shard and a quiet machine,
  wall time is bounded by the slowest shard instead.)
* ``merge``: the share of query time in the merge of the per-shard lists alone.
* ``recovery``: after ``ray.kill`` of shard 0's actor, the time of the next search (it finds the
  actor dead, starts a new one that loads the artefact, replays and warms up, and repeats the
  call), and the restart alone as the handle measured it.

    python -m annlib.bench.distributed_bench --dataset glove-50-angular-200k
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

__all__ = ["main"]

_DEFAULT_PARAMS = {
    "hnsw": ({"M": 16, "ef_construction": 100, "finger": False, "default_recall": None}, {"ef": 64}),
    "partitioned": ({"default_recall": None}, {"leaves": 16, "reorder": 100}),
    "bruteforce": ({}, {}),
}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average %.2f, %.2f, %.2f" % os.getloadavg()


def _tree_cpu() -> float:
    """CPU seconds used so far by this process and every process it started (for Ray: the
    raylet, the GCS and every worker and actor); this process alone where /proc is missing."""
    if not os.path.isdir("/proc"):
        return time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    me, total = os.getpid(), 0.0
    for pid, seconds in cpu.items():
        p = pid
        while p > 1 and p != me:
            p = parent.get(p, 0)
        if p == me:
            total += seconds
    return total


def _recall(ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, truth)]))


def _passes(index, Q: np.ndarray, k: int, batch: int, repeats: int, search: dict) -> dict:
    """Best of ``repeats`` timed passes (after a warm-up pass) and the results of the last."""
    batches = [Q[i:i + batch] for i in range(0, len(Q), batch)]
    for b in batches:  # warm-up: compiled kernels, pages of memory-mapped files
        index.search(b, k, **search)
    best = None
    for _ in range(repeats):
        wall, cpu, merge, ids = 0.0, 0.0, 0.0, []
        tree = _tree_cpu()
        for b in batches:
            t0 = time.perf_counter()
            res = index.search(b, k, **search)
            wall += time.perf_counter() - t0
            cpu += sum(getattr(res, "shard_cpu_seconds", ()))
            merge += getattr(res, "merge_seconds", 0.0)
            ids.append(res.ids)
        tree = _tree_cpu() - tree
        if best is None or wall < best["wall"]:
            best = {"wall": wall, "shard_cpu": cpu, "merge": merge, "ids": np.vstack(ids), "cpu": tree}
    best["qps"] = len(Q) / best["wall"]
    best["cpu_qps"] = len(Q) / best["cpu"] if best["cpu"] > 0 else float("nan")
    return best


def run(args) -> dict:
    import annlib
    from annlib.datasets import load
    from annlib.distributed import RayExecutor, ShardedIndex, ThreadExecutor

    ds = load(args.dataset, progress=False)
    X = np.ascontiguousarray(ds.train, dtype=np.float32)
    test = np.ascontiguousarray(ds.test, dtype=np.float32)
    reps = -(-args.queries // len(test))  # the test queries again when more are asked for
    Q = np.ascontiguousarray(np.tile(test, (reps, 1))[:args.queries])
    truth = np.tile(np.asarray(ds.neighbors), (reps, 1))[:args.queries]
    metric = "cosine" if ds.metric in ("cosine", "angular") else "l2"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {"dataset": args.dataset, "n": len(X), "queries": len(Q), "batch": args.batch, "cores": cores,
           "uptime_start": _uptime(), "rows": [], "recovery": []}
    ray = None
    if "ray" in args.executors:
        import ray

        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        for method in args.methods:
            build, search = _DEFAULT_PARAMS.get(method, ({}, {}))
            build = {**build, **json.loads(args.build_params or "{}")}
            search = {**search, **json.loads(args.search_params or "{}")}
            # the unsharded index, for reference
            t0 = time.perf_counter()
            plain = annlib.Index.build(X, method=method, metric=metric, threads=1, **build)
            plain_build = time.perf_counter() - t0
            with annlib.threads(1):
                ref = _passes(plain, Q, args.k, args.batch, args.repeats, search)
            out["rows"].append({"method": method, "shards": 1, "executor": "none (annlib.Index)",
                                "qps": ref["qps"], "cpu_qps": ref["cpu_qps"], "recall": _recall(ref["ids"], truth, args.k),
                                "build_s": plain_build, "bytes_per_vector": plain.memory_bytes() / len(X),
                                "uptime": _uptime()})
            del plain
            for shards in args.shards:
                folder = tempfile.mkdtemp(prefix="annlib-dbench-")
                t0 = time.perf_counter()
                index = ShardedIndex(method, shards, metric=metric, executor=ThreadExecutor(), **build).build(X)
                build_s = time.perf_counter() - t0
                index.save(folder)
                per_vector = index.memory_bytes() / len(X)
                runs = []
                if "thread" in args.executors:
                    with annlib.threads(1):
                        runs.append(("thread", index, _passes(index, Q, args.k, args.batch, args.repeats, search)))
                index.close()
                if ray is not None:
                    rindex = ShardedIndex.load(folder, executor=RayExecutor(mmap=args.mmap))
                    with annlib.threads(1):  # the merge in this process, as for the thread-pool run
                        runs.append(("ray", rindex, _passes(rindex, Q, args.k, args.batch, args.repeats, search)))
                    # recovery: kill shard 0's actor, time the next search
                    handle = rindex.handles[0]
                    ray.kill(handle.actor)
                    t0 = time.perf_counter()
                    res = rindex.search(Q[:args.batch], args.k, **search)
                    first = time.perf_counter() - t0
                    assert not res.partial and handle.restarts == 1
                    out["recovery"].append({"method": method, "shards": shards, "next_search_s": first,
                                            "restart_s": handle.last_recovery_seconds,
                                            "shard_mb": handle.stats.memory_bytes / 1e6, "uptime": _uptime()})
                    rindex.close()
                for name, _, r in runs:
                    out["rows"].append({"method": method, "shards": shards, "executor": name, "qps": r["qps"],
                                        "cpu_qps": r["cpu_qps"], "recall": _recall(r["ids"], truth, args.k),
                                        "overhead": 1.0 - r["shard_cpu"] / r["cpu"],
                                        "overhead_wall": 1.0 - r["shard_cpu"] / r["wall"],
                                        "merge": r["merge"] / r["wall"],
                                        "shard_cpu_per_query_us": 1e6 * r["shard_cpu"] / len(Q),
                                        "build_s": build_s, "bytes_per_vector": per_vector, "uptime": _uptime()})
                    print(json.dumps(out["rows"][-1]), file=sys.stderr, flush=True)
    finally:
        if ray is not None:
            ray.shutdown()
    out["uptime_end"] = _uptime()
    return out


def report(out: dict, command: str) -> str:
    """Markdown tables of a run."""
    lines = [f"command: `{command}`", "",
             f"data: {out['dataset']} (n={out['n']:,}, {out['queries']:,} queries — the test queries repeated as needed — "
             f"in batches of {out['batch']:,}); "
             f"cores this process may use: {out['cores']}", "",
             f"start: `{out['uptime_start']}`", f"end: `{out['uptime_end']}`", "",
             "| family | shards | executor | QPS (wall) | ÷ thread-pool | QPS per CPU-second | ÷ thread-pool | "
             "recall@10 | overhead (CPU) | overhead (wall) | merge | shard µs/query | B/vector | load (1 min) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    thread = {(r["method"], r["shards"]): r for r in out["rows"] if r["executor"] == "thread"}
    for r in out["rows"]:
        base = thread.get((r["method"], r["shards"])) if r["executor"] == "ray" else None
        ratio = "" if base is None else format(r["qps"] / base["qps"], ".2f")
        cpu_ratio = "" if base is None else format(r["cpu_qps"] / base["cpu_qps"], ".2f")
        load1 = r["uptime"].split("load average:")[-1].split(",")[0].strip()
        share = {key: (f"{100 * r[key]:.1f} %" if key in r else "") for key in ("overhead", "overhead_wall", "merge")}
        per_query = f"{r['shard_cpu_per_query_us']:.0f}" if "shard_cpu_per_query_us" in r else ""
        lines.append(f"| {r['method']} | {r['shards']} | {r['executor']} | {r['qps']:,.0f} | {ratio} | "
                     f"{r['cpu_qps']:,.0f} | {cpu_ratio} | {r['recall']:.3f} | {share['overhead']} | "
                     f"{share['overhead_wall']} | {share['merge']} | {per_query} | {r['bytes_per_vector']:.0f} | {load1} |")
    if out["recovery"]:
        lines += ["", "| family | shards | shard size | restart (new actor, load, replay, warm-up) | "
                  "next search after the kill | load (1 min) |", "|---|---:|---:|---:|---:|---:|"]
        for r in out["recovery"]:
            load1 = r["uptime"].split("load average:")[-1].split(",")[0].strip()
            lines.append(f"| {r['method']} | {r['shards']} | {r['shard_mb']:.0f} MB | {r['restart_s']:.2f} s | "
                         f"{r['next_search_s']:.2f} s | {load1} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command line: see the module docstring and ``--help``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m annlib.bench.distributed_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="glove-50-angular-200k")
    p.add_argument("--methods", default="hnsw,partitioned", type=lambda s: [m for m in s.split(",") if m])
    p.add_argument("--shards", default="1,2,4", type=lambda s: [int(v) for v in s.split(",") if v])
    p.add_argument("--executors", default="thread,ray", type=lambda s: [e for e in s.split(",") if e])
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--mmap", action="store_true", help="Ray actors map the shard files instead of reading them")
    p.add_argument("--build-params", default=None, help="JSON added to the family's build parameters")
    p.add_argument("--search-params", default=None, help="JSON added to the family's search parameters")
    p.add_argument("--json", default=None, help="also write the raw figures to this file")
    args = p.parse_args(argv)
    command = shlex.join(["python -m annlib.bench.distributed_bench", *argv])
    out = run(args)
    out["command"] = command
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    print(report(out, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
