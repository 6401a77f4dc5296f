"""Fixed cost of one ``search`` call: one query per call, every family against hnswlib and faiss.

One query per call is how the ann-benchmarks harness (and many services) search, so what a call
costs beyond the search itself decides the result on small indexes. For each index size (1,000 ×
32 and 100,000 × 50, Gaussian vectors) every method answers one query per call, ``k = 10``, at
its cheapest setting (HNSW ``ef = 10`` like hnswlib's and faiss's, Partitioned one leaf and ten
re-ranked candidates, a small sketch for MahalanobisSketch), single-threaded.

Timing on a shared machine moves by ±25 % from one moment to the next, so methods are never timed
one after the other in blocks: every round times a batch of calls of every method, in a new random
order, and the figures are medians over many rounds (with the quartiles). With ``--before COMMIT``
a second worker process runs the same methods on the library as it was at that commit (extracted
with ``git archive``), and the two workers take turns round by round, so before and after are
measured at the same moments. Each worker also times the baselines, so their ratios to hnswlib
compare within one process.

Extra rows (this code only) show where the time goes: ``_search_one`` called directly (the
family's kernel, without the boundary's checks and lock) and every family on an index of 16
vectors with ``k = 1`` at its cheapest setting (the cost of a call with next to no search in it).

    taskset -c 1 python -m annlib.bench.per_call [--before COMMIT] [--sizes small,large]
        [--rounds 40] [--out per_call.json]
    python -m annlib.bench.per_call --report per_call.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

SIZES = {"small": (1_000, 32), "large": (100_000, 50)}
K = 10
TARGET_BATCH_S = 0.002  # each timed batch of calls lasts about this long


# ============================================================================ worker side
def _methods(n: int, d: int, extras: bool):
    """name -> (callable(q), takes a 2-D query); built on the same seeded data in every worker."""
    import numpy as np

    import annlib

    X = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    out = {}
    bf = annlib.BruteForce().build(X)
    out["annlib BruteForce"] = (lambda q: bf.search(q, K), False)
    hn = annlib.HNSW(M=16, ef_construction=200, default_recall=None).build(X)
    out["annlib HNSW ef=10"] = (lambda q: hn.search(q, K, ef=10), False)  # the default walk: on codes
    hf = annlib.HNSW(M=16, ef_construction=200, walk="float", default_recall=None).build(X)
    out["annlib HNSW ef=10 walk=float"] = (lambda q: hf.search(q, K, ef=10), False)
    pa = annlib.Partitioned(default_recall=None).build(X)
    out["annlib Partitioned leaves=1 reorder=10"] = (lambda q: pa.search(q, K, leaves=1, reorder=10), False)
    ma = annlib.MahalanobisSketch(m=8, copies=4, votes=1, random_state=0).build(X)
    out["annlib MahalanobisSketch m=8 votes=1 reorder=10"] = (lambda q: ma.search(q, K, reorder=10), False)
    if n <= 10_000:
        mad = annlib.MahalanobisSketch(random_state=0).build(X)
        out["annlib MahalanobisSketch defaults"] = (lambda q: mad.search(q, K), False)
    tp = annlib.TPUKNN().build(X)
    out["annlib TPUKNN"] = (lambda q: tp.search(q, K), False)
    try:
        import hnswlib

        hl = hnswlib.Index(space="l2", dim=d)
        hl.init_index(max_elements=n, M=16, ef_construction=200, random_seed=0)
        hl.set_num_threads(1)
        hl.add_items(X)
        hl.set_ef(10)
        out["hnswlib knn_query ef=10"] = (lambda q: hl.knn_query(q, k=K), False)
    except ImportError:
        pass
    try:
        import faiss

        faiss.omp_set_num_threads(1)
        fh = faiss.IndexHNSWFlat(d, 16)
        fh.hnsw.efConstruction = 200
        fh.add(X)
        fh.hnsw.efSearch = 10
        out["faiss HNSW efSearch=10"] = (lambda q: fh.search(q, K), True)
        ff = faiss.IndexFlatL2(d)
        ff.add(X)
        out["faiss flat"] = (lambda q: ff.search(q, K), True)
    except ImportError:
        pass
    out["(timing loop, empty call)"] = (lambda q: None, False)
    if extras:
        out.update(_extra_methods(X, {"bf": bf, "hn": hn, "hf": hf, "pa": pa, "ma": ma, "tp": tp}))
    return out


def _extra_methods(X, built):
    """Where the time goes: the family hooks alone, and calls with next to no work in them."""
    import numpy as np

    import annlib

    out = {}
    hooks = {"bf": ("BruteForce", {}), "hn": ("HNSW ef=10", {"ef": 10}), "hf": ("HNSW walk=float ef=10", {"ef": 10}),
             "pa": ("Partitioned leaves=1 reorder=10", {"leaves": 1, "reorder": 10}),
             "ma": ("MahalanobisSketch m=8 votes=1 reorder=10", {"reorder": 10}), "tp": ("TPUKNN", {})}
    for key, (label, params) in hooks.items():
        index = built[key]
        hook = getattr(index, "_search_one", None)
        if hook is None:
            continue
        index.search(X[0], K, **params)  # validates the parameters once
        index.search(X[0], K, **params)  # the short path makes its plan
        full = index._validated_search_params(params) if params else index._default_search_params()
        out[f"  {label}: _search_one alone"] = (lambda q, h=hook, p=full: h(q, K, p, None), False)
    # the kernels alone, with their outputs allocated once (what remains is dispatch and search)
    try:
        from annlib.kernels.blockwise import search_one as exact_one
        from annlib.kernels.graph import new_one_query_scratch, search_one as graph_one
        from annlib.kernels.graph_sq8 import sq8_search_one
    except ImportError:
        exact_one = None
    if exact_one is not None:
        no_mask = np.zeros(0, np.bool_)
        out_d, out_i = np.empty(K, np.float32), np.empty(K, np.int64)
        words = built["bf"]._one_plan[3]
        out["  BruteForce: kernel alone"] = (lambda q: exact_one(q, words, K, no_mask, out_d, out_i), False)
        hf = built["hf"]
        gwords, scratch = hf._one_plan[3], new_one_query_scratch(hf.n_positions)
        out["  HNSW walk=float ef=10: kernel alone"] = (
            lambda q: graph_one(q, gwords, K, 10, None, no_mask, scratch, out_d, out_i), False)
        hn = built["hn"]
        cwords, cscratch = hn._one_plan[3], new_one_query_scratch(hn.n_positions)
        # n_exact as the index derives it at ef=10 and the default rescore=2: min(ef, 2k)
        out["  HNSW ef=10: kernel alone"] = (
            lambda q: sq8_search_one(q, cwords, K, 10, 10, no_mask, cscratch, out_d, out_i), False)
    tiny = np.ascontiguousarray(X[:16])
    small = {"BruteForce": (annlib.BruteForce().build(tiny), {}),
             "HNSW": (annlib.HNSW(M=16, default_recall=None).build(tiny), {"ef": 1}),
             "Partitioned": (annlib.Partitioned(default_recall=None).build(tiny), {"leaves": 1, "reorder": 1}),
             "MahalanobisSketch": (annlib.MahalanobisSketch(m=8, copies=4, votes=1, random_state=0).build(tiny),
                                   {"reorder": 1}),
             "TPUKNN": (annlib.TPUKNN().build(tiny), {})}
    for label, (index, params) in small.items():
        out[f"  {label}, 16 vectors, k=1"] = (lambda q, ix=index, p=params: ix.search(q, 1, **p), False)
    return out


def _worker() -> None:
    """Answer the main process's commands, one JSON line each (see :func:`_Worker`)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np

    import annlib

    annlib.set_num_threads(1)
    methods, rows1, rows2, numbers = {}, [], [], {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["do"] == "setup":
            n, d = cmd["n"], cmd["d"]
            methods = _methods(n, d, cmd["extras"])
            Q = np.random.default_rng(1).standard_normal((256, d)).astype(np.float32)
            rows1 = [Q[j] for j in range(len(Q))]
            rows2 = [Q[j:j + 1] for j in range(len(Q))]
            numbers = {}
            for name, (fn, two_d) in methods.items():
                rows = rows2 if two_d else rows1
                for q in rows[:20]:  # compile and warm
                    fn(q)
                t0 = time.perf_counter()
                calls = 0
                while time.perf_counter() - t0 < 0.02:
                    fn(rows[calls % len(rows)])
                    calls += 1
                per = (time.perf_counter() - t0) / calls
                numbers[name] = max(3, int(TARGET_BATCH_S / per))
            reply = {"methods": list(methods), "annlib": annlib.__file__}
        elif cmd["do"] == "round":
            order = list(methods)
            random.Random(cmd["seed"]).shuffle(order)
            times = {}
            for name in order:
                fn, two_d = methods[name]
                rows = rows2 if two_d else rows1
                number = numbers[name]
                start = cmd["seed"] % len(rows)
                batch = [rows[(start + j) % len(rows)] for j in range(number)]
                t0 = time.perf_counter_ns()
                for q in batch:
                    fn(q)
                times[name] = (time.perf_counter_ns() - t0) / number / 1000.0
            reply = {"times": times}
        else:
            return
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


# ============================================================================ main side
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


def _old_tree(commit: str) -> str:
    """The library as it was at ``commit``, laid out as an importable ``annlib`` package."""
    root = Path(__file__).resolve().parents[1]
    sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", commit], capture_output=True, text=True,
                         check=True).stdout.strip()
    dest = Path(tempfile.gettempdir()) / f"annlib-per-call-{sha}"
    if not (dest / "annlib" / "__init__.py").exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(root), "archive", sha], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        # the package layout of an installed annlib (pyproject's package-dir)
        for sub in ("accel", "datasets", "bench"):
            if (dest / sub).is_dir() and not (dest / "annlib" / sub).exists():
                (dest / "annlib" / sub).symlink_to(dest / sub, target_is_directory=True)
    return str(dest)


def _quartiles(values):
    import numpy as np

    a = np.asarray(values)
    return float(np.median(a)), float(np.percentile(a, 25)), float(np.percentile(a, 75))


def _environment() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpu": platform.processor()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["affinity"] = sorted(os.sched_getaffinity(0))
    except AttributeError:
        pass
    for mod in ("numpy", "numba", "hnswlib", "faiss", "jax"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            pass
    return info


def _method_names(results: dict, labels: list[str], notes: bool = True) -> list[str]:
    # every method any worker timed, in first-seen order ("(...)" rows are notes, not methods)
    names = []
    for label in labels:
        names += [m for m in results[label] if m not in names and (notes or not m.startswith("("))]
    return names


def _rows(names: list[str], cells) -> list[str]:
    return [f"| {name.strip()} | " + " | ".join(cells(name)) + " |" for name in names]


def _table(size: str, results: dict, labels: list[str]) -> str:
    n, d = SIZES[size]
    head = f"| {n:,} × {d}: µs per call (median [quartiles]) | " + " | ".join(labels) + " |"

    def cells(name):
        out = []
        for label in labels:
            samples = results[label].get(name)
            if samples:
                med, lo, hi = _quartiles(samples)
                out.append(f"{med:.2f} [{lo:.2f}–{hi:.2f}]")
            else:
                out.append("")
        return out

    return "\n".join([head, "|---|" + "---|" * len(labels), *_rows(_method_names(results, labels), cells)])


def _same_round_ratio(results: dict, label: str, name: str, base: str) -> str:
    # median over rounds of this method's time over base's in the same worker and round
    import numpy as np

    samples, ref = results[label].get(name), results[label].get(base)
    if not (samples and ref):
        return ""
    return f"{float(np.median(np.asarray(samples) / np.asarray(ref))):.2f}"


def _ratio_table(size: str, results: dict, labels: list[str], base: str) -> str:
    """Per round, each method's time over ``base``'s in the same worker and round; medians."""
    n, d = SIZES[size]
    head = f"| {n:,} × {d}: per call ÷ {base}, same round (median) | " + " | ".join(labels) + " |"
    rows = _rows(_method_names(results, labels),
                 lambda name: [_same_round_ratio(results, label, name, base) for label in labels])
    return "\n".join([head, "|---|" + "---|" * len(labels), *rows])


def _combined_table(size: str, results: dict, labels: list[str], base: str) -> str:
    """One row per method: median µs per call and median same-round ratio to ``base``, per worker."""
    import numpy as np

    n, d = SIZES[size]
    head = " | ".join([f"{label}: µs" for label in labels] + [f"{label}: ÷ {base.split()[0]}" for label in labels])

    def cells(name):
        us = []
        for label in labels:
            samples = results[label].get(name)
            us.append(f"{float(np.median(samples)):,.2f}" if samples else "")
        return us + [_same_round_ratio(results, label, name, base) for label in labels]

    rows = _rows(_method_names(results, labels, notes=False), cells)
    return "\n".join([f"| {n:,} × {d} | {head} |", "|---|" + "---:|" * (2 * len(labels)), *rows])


def main(argv=None) -> int:
    """Run the benchmark; print one table per size (and write every sample with ``--out``)."""
    p = argparse.ArgumentParser(prog="python -m annlib.bench.per_call", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="also time the library as it was at this git commit (alternating rounds)")
    p.add_argument("--sizes", default="small,large", help="comma-separated: small (1,000 x 32), large (100,000 x 50)")
    p.add_argument("--rounds", type=int, default=40, help="rounds per size (every method once per round)")
    p.add_argument("--out", help="write every sample and the environment as JSON here")
    p.add_argument("--report", help="print the tables of a file written by --out, and stop")
    args = p.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        for size, entry in saved["sizes"].items():
            results = entry["samples"]
            labels = list(results)[::-1]
            print()
            print(_table(size, results, labels))
            print()
            print(_ratio_table(size, results, labels, "hnswlib knn_query ef=10"))
            print()
            print(_combined_table(size, results, labels, "hnswlib knn_query ef=10"))
            print(f"\nload average while timing: {entry['load_during'][0][0]:.2f} -> {entry['load_during'][1][0]:.2f}")
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    load_start = os.getloadavg()
    workers = [_Worker("after", None)]
    if args.before:
        workers.append(_Worker(f"before ({args.before})", _old_tree(args.before)))
    labels = [w.label for w in workers][::-1]
    report = {"environment": _environment(), "load_start": load_start, "sizes": {}}
    try:
        for size in sizes:
            n, d = SIZES[size]
            results = {}
            for w in workers:
                setup = w.ask(do="setup", n=n, d=d, extras=w.label == "after")
                results[w.label] = {m: [] for m in setup["methods"]}
            load_timed = os.getloadavg()
            for r in range(args.rounds):
                for w in (workers if r % 2 == 0 else workers[::-1]):
                    for name, us in w.ask(do="round", seed=r)["times"].items():
                        results[w.label][name].append(us)
            report["sizes"][size] = {"n": n, "d": d, "samples": results, "load_during": [load_timed, os.getloadavg()]}
            print()
            print(_table(size, results, labels))
            base = "hnswlib knn_query ef=10"
            if all(base in results[label] for label in labels):
                print()
                print(_ratio_table(size, results, labels, base))
            print(f"\nload average (1, 5, 15 min) before timing: {load_timed[0]:.2f} {load_timed[1]:.2f} "
                  f"{load_timed[2]:.2f}; after: {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for w in workers:
            w.close()
    report["load_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker()
    else:
        sys.exit(main())
