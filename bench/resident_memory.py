"""Resident memory a build leaves behind, against what the index holds (``memory_bytes()``).

In one process per family: a warm-up build and search on the first 20,000 vectors (so numba's
compiler, which stays resident, is not counted), then the measured build on the whole set; the
growth of the process's resident set over that build, and after 1,000 searches, against
``index.memory_bytes()``.

    python -m annlib.bench.resident_memory --dataset glove-50-angular-200k
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

__all__ = ["main"]

_CHILD = r"""
import gc, json, sys
import numpy as np, annlib
from annlib.datasets import load

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096

family, name = sys.argv[1], sys.argv[2]
ds = load(name, progress=False)
X = np.ascontiguousarray(ds.train, dtype=np.float32)
metric = "cosine" if ds.metric in ("cosine", "angular") else "l2"
annlib.Index.build(X[:20000], method=family, metric=metric).search(X[:1000], 10)
gc.collect()
base = rss()
index = annlib.Index.build(X, method=family, metric=metric)
gc.collect()
built = rss()
index.search(np.ascontiguousarray(ds.test[:1000], dtype=np.float32), 10)
gc.collect()
print(json.dumps({"build": built - base, "search": rss() - base, "memory_bytes": index.memory_bytes()}))
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m annlib.bench.resident_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="glove-50-angular-200k")
    p.add_argument("--families", default="bruteforce,hnsw,partitioned")
    args = p.parse_args(argv)
    command = shlex.join(["python -m annlib.bench.resident_memory", *argv])
    load_before = os.getloadavg()[0]
    rows = []
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", _CHILD, family, args.dataset], env=env, capture_output=True,
                              text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"{family}: {done.stderr[-1000:]}")
        rows.append((family, json.loads(done.stdout.strip().splitlines()[-1])))
    print(f"`{command}` — load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print("| family | memory_bytes() | resident growth after build | ÷ memory_bytes | after 1,000 searches |")
    print("|---|---:|---:|---:|---:|")
    for family, r in rows:
        mb = r["memory_bytes"]
        print(f"| {family} | {mb / 1e6:.0f} MB | {r['build'] / 1e6:.0f} MB | {r['build'] / mb:.2f} | "
              f"{r['search'] / 1e6:.0f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
