"""Partitioned's float32 re-ranking before and after a change, in alternating worker processes.

The exact re-ranking (:func:`annlib.kernels.fastscan.rerank`, also inside the few- and one-query
kernels) is timed for the library as it is and as it was at ``--before COMMIT`` (extracted with
``git archive``, as :mod:`.per_call` does). One index is built and saved by this process; two
worker processes load it, one per library, and take turns round by round (the order flipped
every round), so a load change on a shared machine hits both alike; ``--pairs`` fresh pairs of
workers are started one after the other. Each round times:

* the re-ranking stage alone: the candidates of a batch scan at ``--leaves`` probed leaves,
  ``reorder`` 20 / 100 / 250, re-ranked by ``fastscan.rerank`` (µs per query, best of 3);
* whole searches at ``--leaves`` / ``reorder`` 100: all queries in one call (batch), three per
  call (the few-query kernel) and one per call (the one-query kernel), best of 2 passes (QPS).

Every result (ids and distances) of both workers must be identical, else it stops. Prints the
median over rounds of each figure and the median of the per-round after / before ratios.
Single-threaded.

Usage::

    taskset -c 1 python -m annlib.bench.rerank_prefetch <file.hdf5> --before COMMIT [--leaves 24]
        [--after COMMIT] [--pairs 4] [--rounds 3] [--out results/rerank-prefetch-<set>.json]
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
STAGE_REORDER = (20, 100, 250)
SEARCH_REORDER = 100
MODES = ("batch", "three", "one")


def _anon_huge_kb() -> int:
    """Transparent huge pages of this process (kB; -1 where the kernel does not say)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


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

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["do"] == "setup":
            index = annlib.load(cmd["index"])
            with h5py.File(cmd["data"], "r") as f:
                Q = np.asarray(f["test"], dtype=np.float32)
            leaves = cmd["leaves"]
            st = index._st
            Qp = np.ascontiguousarray(index._metric.prepare(Q), dtype=np.float32)
            S = Qp @ st.centres.T
            D = st.centre_sqnorms[None, :] - 2.0 * S if st.centre_sqnorms.shape[0] else -S
            _, leaf_ids = fastscan.select_leaves(D, leaves)
            probes = fastscan.Probes(leaf_ids, np.ascontiguousarray(-np.take_along_axis(S, leaf_ids, axis=1),
                                                                    dtype=np.float32))
            tables = build_luts(pad_columns(Qp, st.padded_dim), st.codebooks)
            proxy = index._metric.proxy
            cands = {r: fastscan.scan_pq(tables, probes, st.packed, np.zeros(0, dtype=bool), r, st.num_vectors)[1]
                     for r in STAGE_REORDER}
            nq = Q.shape[0] - Q.shape[0] % 3

            def search(mode):
                if mode == "batch":
                    r = index.search(Q[:nq], K, leaves=leaves, reorder=SEARCH_REORDER)
                    return r.distances, r.ids
                step = 3 if mode == "three" else 1
                ds = np.empty((nq, K), dtype=np.float32)
                ids = np.empty((nq, K), dtype=np.int64)
                for s in range(0, nq, step):
                    r = index.search(Q[s:s + step] if step > 1 else Q[s], K, leaves=leaves, reorder=SEARCH_REORDER)
                    ds[s:s + step] = r.distances
                    ids[s:s + step] = r.ids
                return ds, ids

            for mode in MODES:  # compile (or load from the cache) and warm
                search(mode)
            reply = {"annlib": annlib.__file__, "queries": nq, "anon_huge_kb": _anon_huge_kb()}
        elif cmd["do"] == "round":
            reply = {}
            for r in STAGE_REORDER:
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    out = fastscan.rerank(Qp, st.vectors, cands[r], K, proxy)
                    best = min(best, time.perf_counter() - t)
                reply[f"stage_{r}"] = 1e6 * best / Q.shape[0]
                reply[f"digest_stage_{r}"] = digest(*out)
            for mode in MODES:
                best = float("inf")
                for _ in range(2):
                    t = time.perf_counter()
                    out = search(mode)
                    best = min(best, time.perf_counter() - t)
                reply[f"qps_{mode}"] = nq / best
                reply[f"digest_{mode}"] = digest(*out)
        else:
            return
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class _Worker:
    def __init__(self, label: str, pythonpath: str | None):
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.label = label
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} worker stopped (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"do": "quit"}) + "\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--worker"]:
        _worker()
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--before", required=True, help="git commit of the library to compare with")
    p.add_argument("--after", default=None, help="git commit to time as 'after' (default: the library this runs from)")
    p.add_argument("--leaves", type=int, default=24, help="probed leaves (stage candidates and searches)")
    p.add_argument("--pairs", type=int, default=4, help="fresh before/after worker pairs")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per worker pair")
    p.add_argument("--out", default=None, help="write every round as JSON here")
    args = p.parse_args(argv)

    import h5py
    import numpy as np

    import annlib

    from .per_call import _old_tree

    with h5py.File(args.path, "r") as f:
        X = np.asarray(f["train"], dtype=np.float32)
        metric = {"euclidean": "l2", "angular": "cosine"}[f.attrs["distance"]]
    annlib.set_num_threads(1)
    index = annlib.Partitioned.build(X, metric=metric, default_recall=None)
    fd, saved = tempfile.mkstemp(suffix=".annlib")
    os.close(fd)
    index.save(saved)
    load_start = _load()
    before_tree = _old_tree(args.before)
    after_tree = _old_tree(args.after) if args.after else None
    rounds = []
    try:
        # fresh worker pairs: where a process's arrays land in memory stays with it for its life
        # and would otherwise count as a difference of the code (with one pair, kdewall's batch
        # figure of one worker was ~20 % lower in 10 of 11 rounds, not seen with four pairs)
        for pair in range(args.pairs):
            workers = {"before": _Worker("before", before_tree), "after": _Worker("after", after_tree)}
            try:
                for label, w in workers.items():
                    print(label, w.ask(do="setup", index=saved, data=os.path.abspath(args.path), leaves=args.leaves),
                          flush=True)
                for i in range(args.rounds):
                    order = ("before", "after") if (pair + i) % 2 == 0 else ("after", "before")
                    row = {label: workers[label].ask(do="round") for label in order}
                    bad = [key for key in row["before"]
                           if key.startswith("digest") and row["before"][key] != row["after"][key]]
                    if bad:
                        raise SystemExit(f"results differ between before and after: {bad}")
                    rounds.append(row)
                    print(json.dumps({lb: {k: round(v, 2) for k, v in r.items() if not k.startswith("digest")}
                                      for lb, r in row.items()}), flush=True)
            finally:
                for w in workers.values():
                    w.close()
    finally:
        os.unlink(saved)
    load_end = _load()
    name = os.path.splitext(os.path.basename(args.path))[0]
    keys = [f"stage_{r}" for r in STAGE_REORDER] + [f"qps_{m}" for m in MODES]
    summary = {}
    for key in keys:
        before = float(np.median([r["before"][key] for r in rounds]))
        after = float(np.median([r["after"][key] for r in rounds]))
        # speed-up: time before / after for the stage, QPS after / before for searches
        ratios = [(r["before"][key] / r["after"][key]) if key.startswith("stage") else
                  (r["after"][key] / r["before"][key]) for r in rounds]
        summary[key] = {"before": before, "after": after, "speedup_median": float(np.median(ratios)),
                        "speedup_min": float(min(ratios)), "speedup_max": float(max(ratios))}
    print(f"\n{name}: {args.leaves} leaves, {args.pairs} worker pairs x {args.rounds} alternating rounds, "
          f"before = {args.before}, "
          f"after = {args.after or 'this tree'}, "
          f"load average {load_start:.2f} -> {load_end:.2f}")
    print("| figure | before | after | speed-up, median (min-max) of rounds |")
    print("|---|---|---|---|")
    for key in keys:
        s = summary[key]
        label = (f"re-ranking stage, reorder {key.split('_')[1]} (us per query)" if key.startswith("stage") else
                 f"search {key[4:]}, reorder {SEARCH_REORDER} (QPS)")
        fmt = "{:.2f}" if key.startswith("stage") else "{:,.0f}"
        print(f"| {label} | {fmt.format(s['before'])} | {fmt.format(s['after'])} | "
              f"{s['speedup_median']:.2f} ({s['speedup_min']:.2f}-{s['speedup_max']:.2f}) |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"dataset": name, "before": args.before, "leaves": args.leaves, "pairs": args.pairs, "load": [load_start, load_end],
                       "rounds": rounds, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
