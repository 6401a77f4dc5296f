"""Concurrency stress run: 4 searcher threads and 1 writer thread per family, every row checked.

For each family that can ``add`` (HNSW twice: with and without FINGER), a subprocess builds an
index on synthetic clustered data, then for ``--seconds`` runs four threads that search (1-8
queries, k in {1, 5, 10, 20}) and one that adds batches of 32 vectors with ids and, where the
family supports it, deletes 16 live ids after each add. Every returned row is checked: ids exist
(added before the search ended, or in the build), are unique and not deleted before the search
began; no row is all -1; distances ascend and equal the float64 distances to the stored vectors.
The subprocess reports its counts as one JSON line; a crash or hang is counted for the family.

Usage::

    python bench/stress_concurrency.py [--seconds 60] [--families hnsw,partitioned] [--n 5000] [--dim 32]

Prints one line per family (searches, rows checked, bad rows, exceptions, crashes, writes) and
exits with status 1 if any family had a bad row, an exception or a crash.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

POOL_ID = 1 << 40  # ids of added vectors: POOL_ID + row of the pool
BATCH = 32
MAX_REPORTED = 5


def _variants(families):
    """(label, family, extra build params) for every requested family that writes."""
    import annlib
    from annlib.api import get_family

    out = []
    for family in families or annlib.families():
        cls = get_family(family)
        if not (cls.supports_add or cls.supports_delete):
            print(f"{family}: neither add nor delete, skipped", flush=True)
            continue
        if family == "hnsw":
            out += [("hnsw-finger", family, {"finger": True}),
                    ("hnsw-plain", family, {"finger": False, "walk": "float"}), ("hnsw-codes", family, {})]
        else:
            out.append((family, family, {}))
    return out


def _build_params(family, extra):
    small = {"hnsw": {"M": 16, "ef_construction": 100, "random_state": 0},
             "partitioned": {"random_state": 0},
             "mahalanobis": {"random_state": 0}}
    return {**small.get(family, {}), **extra}


class _Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.searches = self.rows = self.bad_rows = self.exceptions = 0
        self.adds = self.deletes = 0
        self.messages: list[str] = []

    def note(self, text):
        with self.lock:
            if len(self.messages) < MAX_REPORTED:
                self.messages.append(text[:500])


def _bad_row(ids, dist, r, k, q, vector, exists, deleted, done_before):
    """Why row ``r`` is wrong, or None. ``deleted`` maps an id to the number of the delete()
    call that removed it; calls numbered below ``done_before`` returned before the search began."""
    row, drow = ids[r], dist[r]
    pad = row < 0
    if (row[pad] != -1).any():
        return "negative id other than -1"
    if pad.all():
        return "row of only -1"
    if pad.any() and not pad[int(np.argmax(pad)):].all():
        return "-1 before a real id"
    if pad.any() and not np.isposinf(drow[pad]).all():
        return "padding distance is not +inf"
    real = row[~pad]
    if len(set(real.tolist())) != real.size:
        return f"repeated id in {real.tolist()}"
    unknown = [int(i) for i in real if not exists(int(i))]
    if unknown:
        return f"ids never added: {unknown[:3]}"
    back = [int(i) for i in real if deleted.get(int(i), done_before) < done_before]
    if back:
        return f"deleted ids returned: {back[:3]}"
    d = drow[~pad].astype(np.float64)
    if not np.isfinite(d).all() or (np.diff(d) < -1e-6 * np.maximum(np.abs(d[1:]), 1.0)).any():
        return f"distances not finite and ascending: {d.tolist()}"
    X = np.stack([vector(int(i)) for i in real]).astype(np.float64)
    qv = q.astype(np.float64)
    true_sq = ((X - qv) ** 2).sum(1)
    scale = (X ** 2).sum(1) + (qv ** 2).sum()
    if (np.abs(d ** 2 - true_sq) > 1e-4 * scale + 1e-6).any():
        return f"distances {d.tolist()} differ from recomputed {np.sqrt(true_sq).tolist()}"
    return None


def worker(label, family, extra, seconds, n, dim, seed=0):
    """Run one family's stress test in this process; print one JSON line of counts."""
    import annlib

    g = np.random.default_rng(seed)
    centres = g.normal(size=(32, dim)) * 3.0
    def sample(m):
        return (centres[g.integers(0, 32, m)] + g.normal(size=(m, dim))).astype(np.float32)

    base = sample(n)
    pool_size = 400_000 if dim <= 64 else 100_000
    pool = sample(pool_size)
    queries = sample(4096)
    index = annlib.Index.build(base, method=family, ids=np.arange(n), **_build_params(family, extra))
    cls = type(index)
    stats = _Stats()
    # pool rows whose add began; id -> order of the delete() calls that have returned
    state = {"started": 0, "deleted": {}, "deletes_done": 0}
    stop = threading.Event()

    def vector(ext):
        return base[ext] if ext < n else pool[ext - POOL_ID]

    # compile every path before the clock starts
    index.search(queries[:2], 5)
    if cls.supports_add:
        index.add(pool[:BATCH], ids=POOL_ID + np.arange(BATCH))
        state["started"] = BATCH
    if cls.supports_delete:
        index.delete([n - 1])
        state["deleted"][n - 1] = 0
        state["deletes_done"] = 1
    for k in (1, 5, 10, 20):
        for q in (1, 8):
            index.search(queries[:q], k)

    def searcher(s):
        rng = np.random.default_rng(100 + s)
        while not stop.is_set():
            done_before = state["deletes_done"]
            Q = queries[rng.integers(0, len(queries), int(rng.choice([1, 8])))]
            k = int(rng.choice([1, 5, 10, 20]))
            try:
                ids, dist = index.search(Q, k)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with stats.lock:
                    stats.exceptions += 1
                stats.note(f"search: {type(exc).__name__}: {exc}")
                continue
            started = state["started"]

            def exists(i):
                return 0 <= i < n or POOL_ID <= i < POOL_ID + started

            bad = 0
            for r in range(ids.shape[0]):
                why = _bad_row(ids, dist, r, k, Q[r], vector, exists, state["deleted"], done_before)
                if why is not None:
                    bad += 1
                    stats.note(f"k={k}: {why}")
            with stats.lock:
                stats.searches += 1
                stats.rows += ids.shape[0]
                stats.bad_rows += bad

    def writer():
        rng = np.random.default_rng(7)
        live = [i for i in range(n) if i not in state["deleted"]]
        live += list(range(POOL_ID, POOL_ID + state["started"]))
        while not stop.is_set():
            try:
                lo = state["started"]
                if cls.supports_add and lo + BATCH <= pool_size:
                    state["started"] = lo + BATCH
                    index.add(pool[lo:lo + BATCH], ids=POOL_ID + np.arange(lo, lo + BATCH))
                    live += range(POOL_ID + lo, POOL_ID + lo + BATCH)
                    stats.adds += 1
                if cls.supports_delete and len(live) > n // 2:
                    victims = [live.pop(int(rng.integers(0, len(live)))) for _ in range(BATCH // 2)]
                    index.delete(victims)
                    call = state["deletes_done"]
                    state["deleted"].update((v, call) for v in victims)
                    state["deletes_done"] = call + 1
                    stats.deletes += 1
            except Exception as exc:  # noqa: BLE001
                with stats.lock:
                    stats.exceptions += 1
                stats.note(f"write: {type(exc).__name__}: {exc}")
            time.sleep(0.002)  # readers get the lock between writes, as in a serving process

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(4)] + [threading.Thread(target=writer)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    stop.wait(seconds)
    stop.set()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    print(json.dumps({
        "label": label, "seconds": round(elapsed, 1), "searches": stats.searches, "rows": stats.rows,
        "bad_rows": stats.bad_rows, "exceptions": stats.exceptions, "adds": stats.adds,
        "deletes": stats.deletes, "final_size": len(index), "messages": stats.messages,
    }), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="stress time per family (default 60)")
    parser.add_argument("--families", default="", help="comma-separated family names (default: all that write)")
    parser.add_argument("--n", type=int, default=5000, help="vectors built before the run (default 5000)")
    parser.add_argument("--dim", type=int, default=32, help="dimension (default 32)")
    parser.add_argument("--worker", nargs=2, metavar=("LABEL", "FAMILY"), help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], json.loads(args.extra), args.seconds, args.n, args.dim)
        return 0

    families = [f for f in args.families.split(",") if f]
    header = f"{'family':<14}{'searches':>10}{'rows':>11}{'bad rows':>10}{'exceptions':>11}{'crashes':>9}" \
             f"{'writes':>9}{'adds':>7}{'deletes':>9}{'size':>9}{'seconds':>9}"
    print(f"stress: {args.seconds:g} s per family, n={args.n}, dim={args.dim}, 4 searchers + 1 writer", flush=True)
    print(header, flush=True)
    failed = False
    for label, family, extra in _variants(families):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", label, family, "--extra", json.dumps(extra),
               "--seconds", str(args.seconds), "--n", str(args.n), "--dim", str(args.dim)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 600)
            out, err, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err, code = "timed out (hang?)", "timeout"
        result = None
        for line in out.splitlines():
            if line.startswith("{"):
                result = json.loads(line)
        crashed = int(code != 0 or result is None)
        if result is None:
            result = {"searches": 0, "rows": 0, "bad_rows": 0, "exceptions": 0, "adds": 0, "deletes": 0,
                      "final_size": 0, "seconds": 0, "messages": []}
        writes = result["adds"] + result["deletes"]
        print(f"{label:<14}{result['searches']:>10}{result['rows']:>11}{result['bad_rows']:>10}"
              f"{result['exceptions']:>11}{crashed:>9}{writes:>9}{result['adds']:>7}{result['deletes']:>9}"
              f"{result['final_size']:>9}{result['seconds']:>9}", flush=True)
        for message in result["messages"]:
            print(f"    {message}", flush=True)
        if crashed:
            print(f"    exit code {code}; stderr tail: {err[-1500:]}", flush=True)
        failed |= bool(crashed or result["bad_rows"] or result["exceptions"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
