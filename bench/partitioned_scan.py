"""Partitioned's batch search and its scan stage before and after a change, in alternating workers.

The scan (:func:`annlib.kernels.fastscan.scan_pq`: the shuffle look-ups and the candidate
admissions) and the whole batch search are timed for the library as it is and as it was at
``--before COMMIT``, at a few ``leaves:reorder`` operating points (``--points``; the defaults
are glove-50-200k's frontier points near recall@10 0.90, 0.95 and 0.98 in round 4). The
plumbing is :mod:`.rerank_prefetch`'s: one index built and saved here, two worker processes
(one per library) loading it and taking turns round by round, the order flipped every round,
``--pairs`` fresh pairs one after the other (``--build each``: each worker builds its own index
instead, for a change of the layout; the scans' candidates are then not compared). Each worker
reports its recall@10 at every point. Each round times, per point:

* the scan stage alone on the point's probed leaves and tables (µs per query, best of 3);
* the batch search of every query in one call (QPS, best of 3).

The candidates (as a set per query, with their approximate scores) and the results' distances
of both workers must be identical, else it stops; ids that differ (only possible among equal
distances) are reported; ``--ties`` accepts candidate sets that differ only among equal scores at
the ``reorder`` boundary (their sorted scores must match; the searches may then differ, and the
recall shows by how much). Prints the median over rounds of each figure and the median of the
per-round after / before ratios. Single-threaded.

Usage::

    taskset -c 0 python -m annlib.bench.partitioned_scan <file.hdf5> --before COMMIT
        [--after COMMIT] [--points 12:100,24:100,48:160] [--pairs 3] [--rounds 3] [--build once|each]
        [--ties] [--out results/partitioned-scan-<set>.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

K = 10
DEFAULT_POINTS = "12:100,24:100,48:160"


def _worker() -> None:
    """Answer the main process's commands, one JSON line each (no relative imports: this file runs
    as a script next to either library)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import h5py
    import numpy as np

    import annlib
    from annlib.kernels import fastscan
    from annlib.kernels.quantization import build_luts, pad_columns

    annlib.set_num_threads(1)

    def digest(*arrays):
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def best_of(fn, reps):
        best, out = float("inf"), None
        for _ in range(reps):
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
        return best, out

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["do"] == "setup":
            with h5py.File(cmd["data"], "r") as f:
                Q = np.asarray(f["test"], dtype=np.float32)
                truth = np.asarray(f["neighbors"])[:, :K]
                if cmd["index"] is None:  # --build each: this library builds its own index
                    metric = {"euclidean": "l2", "angular": "cosine"}[f.attrs["distance"]]
                    index = annlib.Partitioned.build(np.asarray(f["train"], dtype=np.float32), metric=metric,
                                                     default_recall=None)
                else:
                    index = annlib.load(cmd["index"])
            points = [tuple(p) for p in cmd["points"]]
            st = index._st
            Qp = np.ascontiguousarray(index._metric.prepare(Q), dtype=np.float32)
            S = Qp @ st.centres.T
            D = st.centre_sqnorms[None, :] - 2.0 * S if st.centre_sqnorms.shape[0] else -S
            tables = build_luts(pad_columns(Qp, st.padded_dim), st.codebooks)
            no_mask = np.zeros(0, dtype=bool)
            probes = {}
            for leaves, _ in points:
                _, leaf_ids = fastscan.select_leaves(D, leaves)
                probes[leaves] = fastscan.Probes(leaf_ids, np.ascontiguousarray(
                    -np.take_along_axis(S, leaf_ids, axis=1), dtype=np.float32))

            def scan(leaves, reorder):
                return fastscan.scan_pq(tables, probes[leaves], st.packed, no_mask, reorder, st.num_vectors)

            def search(leaves, reorder):
                r = index.search(Q, K, leaves=leaves, reorder=reorder)
                return r.distances, r.ids

            recall = {}
            for leaves, reorder in points:  # compile (or load from the cache) and warm
                scan(leaves, reorder)
                ids = search(leaves, reorder)[1]
                recall[f"{leaves}:{reorder}"] = float(np.mean([len(set(a) & set(b)) for a, b in zip(ids, truth)])) / K
            reply = {"annlib": annlib.__file__, "queries": int(Q.shape[0]), "recall": recall}
        elif cmd["do"] == "round":
            reply = {}
            nq = Q.shape[0]
            for leaves, reorder in points:
                key = f"{leaves}:{reorder}"
                t, (cand_d, cand_i) = best_of(lambda: scan(leaves, reorder), 3)
                reply[f"scan_{key}"] = 1e6 * t / nq
                by_id = np.argsort(cand_i, axis=1, kind="stable")  # the candidates, not their order
                reply[f"digest_scan_{key}"] = digest(np.take_along_axis(cand_i, by_id, axis=1),
                                                     np.take_along_axis(cand_d, by_id, axis=1))
                # the candidates' scores alone: equal when the sets differ only among equal scores
                reply[f"digest_scores_{key}"] = digest(np.sort(cand_d, axis=1))
                t, (dist, ids) = best_of(lambda: search(leaves, reorder), 3)
                reply[f"qps_{key}"] = nq / t
                # distances must match; ids may differ among equal distances (duplicate vectors:
                # the candidates' order decides), which is counted, not fatal
                reply[f"digest_search_{key}"] = digest(dist)
                reply[f"ids_{key}"] = digest(ids)
                reply[f"ids_sorted_{key}"] = digest(np.sort(ids, axis=1))
        else:
            return
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def _worker_class():
    """:class:`.rerank_prefetch._Worker`, running this file's worker (imported here: the worker
    runs this file as a script, where a relative import fails)."""
    from . import rerank_prefetch

    class _Worker(rerank_prefetch._Worker):
        def __init__(self, label: str, pythonpath: str | None):
            env = dict(os.environ)
            if pythonpath:
                env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            self.label = label
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    return _Worker, rerank_prefetch._load


def _points(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        leaves, reorder = part.split(":")
        out.append((int(leaves), int(reorder)))
    return out


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--worker"]:
        _worker()
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--before", required=True, help="git commit of the library to compare with")
    p.add_argument("--after", default=None, help="git commit to time as 'after' (default: the library this runs from)")
    p.add_argument("--points", default=DEFAULT_POINTS, help="leaves:reorder operating points, comma separated")
    p.add_argument("--pairs", type=int, default=3, help="fresh before/after worker pairs")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per worker pair")
    p.add_argument("--build", choices=("once", "each"), default="once",
                   help="once: both libraries load one index built here (the scan's candidates must match); "
                        "each: each builds its own (a layout change; searches compared, recall printed)")
    p.add_argument("--ties", action="store_true",
                   help="with --build once: accept candidate sets that differ only among equal scores at the "
                        "reorder boundary (the scores must match); the searches may then differ (recall printed)")
    p.add_argument("--out", default=None, help="write every round as JSON here")
    args = p.parse_args(argv)
    points = _points(args.points)

    import h5py
    import numpy as np

    import annlib

    from .per_call import _old_tree

    _Worker, _load = _worker_class()

    with h5py.File(args.path, "r") as f:
        X = np.asarray(f["train"], dtype=np.float32)
        metric = {"euclidean": "l2", "angular": "cosine"}[f.attrs["distance"]]
    annlib.set_num_threads(1)
    saved = None
    if args.build == "once":
        index = annlib.Partitioned.build(X, metric=metric, default_recall=None)
        fd, saved = tempfile.mkstemp(suffix=".annlib")
        os.close(fd)
        index.save(saved)
    load_start = _load()
    root = Path(__file__).resolve().parents[1]

    def commit_of(ref):  # recorded as a hash: HEAD moves on
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", ref], capture_output=True, text=True,
                              check=True).stdout.strip()

    before_commit = commit_of(args.before)
    after_commit = commit_of(args.after) if args.after else f"the tree at {commit_of('HEAD')}"
    before_tree = _old_tree(args.before)
    after_tree = _old_tree(args.after) if args.after else None
    rounds, setups = [], []
    try:
        for pair in range(args.pairs):
            workers = {"before": _Worker("before", before_tree), "after": _Worker("after", after_tree)}
            try:
                for label, w in workers.items():
                    setups.append({"pair": pair, "label": label,
                                   **w.ask(do="setup", index=saved, data=os.path.abspath(args.path), points=points)})
                    print(setups[-1], flush=True)
                for i in range(args.rounds):
                    order = ("before", "after") if (pair + i) % 2 == 0 else ("after", "before")
                    row = {label: workers[label].ask(do="round") for label in order}
                    bad = [key for key in row["before"]
                           if key.startswith("digest") and row["before"][key] != row["after"][key]]
                    if args.build == "each":  # different layouts: the scans' candidate order differs
                        bad = [key for key in bad if not key.startswith("digest_scan")]
                        if bad:
                            print(f"results differ between before and after (see the recall above): {bad}")
                    elif bad and args.ties and "digest_scores" not in " ".join(bad):
                        # which of equally scored candidates a scan keeps may change, and with it
                        # the re-ranked results
                        print(f"candidates differ among equal scores (see the recall above): {bad}", flush=True)
                    elif bad:
                        raise SystemExit(f"results differ between before and after: {bad}")
                    ties = [key for key in row["before"]
                            if key.startswith("ids") and row["before"][key] != row["after"][key]]
                    if ties:
                        print(f"ids differ among equal distances: {ties}", flush=True)
                    rounds.append(row)
                    print(json.dumps({lb: {k: round(v, 2) for k, v in r.items() if not k.startswith(("digest", "ids"))}
                                      for lb, r in row.items()}), flush=True)
            finally:
                for w in workers.values():
                    w.close()
    finally:
        if saved is not None:
            os.unlink(saved)
    load_end = _load()
    name = os.path.splitext(os.path.basename(args.path))[0]
    keys = [f"{kind}_{lv}:{ro}" for lv, ro in points for kind in ("scan", "qps")]
    summary = {}
    for key in keys:
        before = float(np.median([r["before"][key] for r in rounds]))
        after = float(np.median([r["after"][key] for r in rounds]))
        # speed-up: time before / after for the scan, QPS after / before for searches
        ratios = [(r["before"][key] / r["after"][key]) if key.startswith("scan") else
                  (r["after"][key] / r["before"][key]) for r in rounds]
        summary[key] = {"before": before, "after": after, "speedup_median": float(np.median(ratios)),
                        "speedup_min": float(min(ratios)), "speedup_max": float(max(ratios))}
    print(f"\n{name}: {args.pairs} worker pairs x {args.rounds} alternating rounds, before = {before_commit}, "
          f"after = {after_commit}, load average {load_start:.2f} -> {load_end:.2f}")
    print("| figure | before | after | speed-up, median (min-max) of rounds |")
    print("|---|---|---|---|")
    for key in keys:
        s = summary[key]
        kind, point = key.split("_")
        leaves, reorder = point.split(":")
        label = (f"scan, leaves {leaves}, reorder {reorder} (us per query)" if kind == "scan" else
                 f"batch search, leaves {leaves}, reorder {reorder} (QPS)")
        fmt = "{:.2f}" if kind == "scan" else "{:,.0f}"
        print(f"| {label} | {fmt.format(s['before'])} | {fmt.format(s['after'])} | "
              f"{s['speedup_median']:.2f} ({s['speedup_min']:.2f}-{s['speedup_max']:.2f}) |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"dataset": name, "before": before_commit, "after": after_commit, "points": points, "build": args.build,
                       "load": [load_start, load_end], "setups": setups, "rounds": rounds, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
