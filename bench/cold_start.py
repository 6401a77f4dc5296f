"""First use as a user meets it: time to the first ``build`` + ``search`` and resident memory.

For each family, in a fresh interpreter: ``import annlib``, ``Index.build(X, method=f)`` on
10,000 × 32 float32 vectors and one batch ``search``, timed; then the process's resident memory
growth over the import, against ``index.memory_bytes()``. Each family runs twice with the same
numba cache folder: "cold" (an empty folder: every kernel compiles, as in a fresh install) and
"warm" (a later process loading the cache; it then repeats the same calls, which gives the
work itself with every kernel loaded). CPU time is reported beside the cold wall time: on a
loaded machine it is the steadier figure; it includes the process that compiles a first
build's search kernels on another core (``annlib._compile_ahead``; ``--no-ahead`` turns it off,
as does running on one CPU).

    python -m annlib.bench.cold_start [--families hnsw,partitioned] [--n 10000] [--no-ahead]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile

__all__ = ["main"]

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import annlib

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096

family, n, repeat = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
X = np.random.default_rng(0).standard_normal((n, 32)).astype(np.float32)
Q = np.random.default_rng(1).standard_normal((100, 32)).astype(np.float32)

def build():
    return annlib.Index.build(X) if family == "auto" else annlib.Index.build(X, method=family)

t1, c1 = time.perf_counter(), time.process_time()
base = rss()
index = build()
t2 = time.perf_counter()
after_build = rss()
index.search(Q, 10)
t3 = time.perf_counter()
index.search(Q[0], 10)
t4, c4 = time.perf_counter(), time.process_time()
from annlib import _compile_ahead
_compile_ahead.wait(None)  # after the timings: a compile-ahead child's CPU counts, and it is done
out = {"import_s": t1 - t0, "build_s": t2 - t1, "batch_s": t3 - t2, "one_s": t4 - t3, "cpu_s": c4 - c1,
       "rss_growth": after_build - base, "memory_bytes": index.memory_bytes(), "family": index.family}
if repeat:  # the same calls again in this process: the work itself, every kernel already loaded
    t5 = time.perf_counter()
    again = build()
    again.search(Q, 10)
    again.search(Q[0], 10)
    out["repeat_s"] = time.perf_counter() - t5
print(json.dumps(out))
"""


def _run(family: str, n: int, cache: str, repeat: bool = False, ahead: bool = True) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "ANNLIB_COMPILE_AHEAD": "1" if ahead else "0"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-c", _CHILD, family, str(n), "1" if repeat else "0"], env=env,
                          capture_output=True, text=True, timeout=1800)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{family}: {done.stderr[-1000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # the whole process and every child it waited for (the compile-ahead process), import included
    out["all_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m annlib.bench.cold_start", description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="bruteforce,hnsw,partitioned,tpuknn,mahalanobis,auto")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--no-ahead", action="store_true", help="no compile-ahead process (ANNLIB_COMPILE_AHEAD=0)")
    args = p.parse_args(argv)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    command = " ".join(["python -m annlib.bench.cold_start", shlex.join(argv)]).strip()
    load_before = os.getloadavg()[0]
    rows = []
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        with tempfile.TemporaryDirectory() as cache:
            cold = _run(family, args.n, cache, ahead=not args.no_ahead)
            warm = _run(family, args.n, cache, repeat=True, ahead=not args.no_ahead)
        rows.append((family, cold, warm))
        print(f"{family}: cold {cold}, warm {warm}", flush=True)
    ahead = "off" if args.no_ahead or cpus < 2 else "on"
    print(f"\n`{command}` — {args.n:,} × 32 vectors, one search thread, {cpus} CPU(s) usable, compile-ahead "
          f"process {ahead}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print("| family | cold: build + first batch search (s) | cold: + first one-query search (s) | cold CPU, all "
          "processes (s) | warm: same (s) | warm: the same calls again in that process (s) | import (s) | "
          "resident growth ÷ memory_bytes() |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for family, cold, warm in rows:
        total = lambda r: r["build_s"] + r["batch_s"] + r["one_s"]
        ratio = cold["rss_growth"] / max(cold["memory_bytes"], 1)
        print(f"| {family}{' → ' + cold['family'] if family == 'auto' else ''} | "
              f"{cold['build_s'] + cold['batch_s']:.1f} | {total(cold):.1f} "
              f"({cold['build_s']:.1f} + {cold['batch_s']:.1f} + {cold['one_s']:.1f}) | {cold['all_cpu_s']:.1f} | "
              f"{total(warm):.2f} | {warm['repeat_s']:.2f} | {warm['import_s']:.1f} | "
              f"{cold['rss_growth'] / 1e6:.0f} MB ÷ {cold['memory_bytes'] / 1e6:.1f} MB = {ratio:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
