"""``annlib-bench``: recall/QPS sweeps of annlib and the baselines on one data set.

Example::

    annlib-bench --dataset sift-128-euclidean-10k --methods bruteforce,faiss-flat,hnswlib

prints which data it used, runs every method's build × search grid, writes
``OUT/<dataset>/results.json`` with every measured point and the environment, saves
``pareto-batch.png`` and ``pareto-single.png`` beside it, and prints a Markdown table of QPS at
recall@k >= 0.90 / 0.95 / 0.99 per index headed by the exact command line. With
``--tune 0.95`` each annlib index is also tuned for that recall and its tuned point measured and
drawn next to its sweep; ``auto`` (the one-line ``Index.build(X)``) is a method name.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from . import adapters, environment, report
from .grids import load_grids
from .plot import plot_mode
from .runner import Settings, Workload, run_benchmark

__all__ = ["main", "build_parser"]

DEFAULT_METHODS = "bruteforce,faiss-flat,faiss-hnsw,hnswlib"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _targets(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"recall targets must be numbers in (0, 1]; got {text!r}")
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"recall targets must be numbers in (0, 1]; got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="annlib-bench",
        description="Recall/QPS sweeps of annlib indexes and baseline libraries, measured side "
                    "by side in one process (ann-benchmarks method).")
    p.add_argument("--dataset", default="glove-6b-50d",
                   help="data set name known to annlib.datasets, or a path to an ann-benchmarks "
                        "HDF5 file (default: %(default)s)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated annlib families and baselines (default: %(default)s); "
                        "baselines: " + ", ".join(adapters.BASELINES))
    p.add_argument("--k", type=_positive, default=10, help="neighbours per query (default: 10)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="threads for build and search in every library, BLAS and numba "
                        "(default: 1)")
    p.add_argument("--out", default="results", help="output folder (default: %(default)s)")
    p.add_argument("--queries", type=_positive, default=None,
                   help="use a seeded random subset of this many test queries")
    p.add_argument("--seed", type=int, default=0, help="seed of the query subset (default: 0)")
    p.add_argument("--config", default=None,
                   help="YAML/JSON file (or packaged name, e.g. 'quick') of per-method build and "
                        "search grids replacing the defaults")
    p.add_argument("--max-build-configs", type=_positive, default=None,
                   help="keep only the first N build configurations of each method")
    p.add_argument("--reference", default=None,
                   help="index label or method the QPS ratios are taken against (default: the "
                        "first hnswlib index when hnswlib runs)")
    p.add_argument("--tune", type=_targets, default=None, metavar="T[,T...]",
                   help="after each annlib index's sweep, tune it for these recall targets with "
                        "annlib.tune (queries made from the training vectors) and measure the "
                        "tuned point on the test queries; drawn as a star on the plot. Also the "
                        "targets 'auto' is built for")
    p.add_argument("--no-single", action="store_true",
                   help="skip the one-query-per-call measurements")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-index messages")
    return p


def _display_path(path) -> str:
    """A path as short as possible and without this machine's home folder."""
    if not path:
        return "—"
    path = os.path.abspath(os.fspath(path))
    rel = os.path.relpath(path)
    if not rel.startswith(os.pardir + os.sep):
        return rel  # inside the working folder
    home = os.path.expanduser("~")
    if path.startswith(home + os.sep):
        return "~" + path[len(home):]
    return rel if not rel.startswith(os.pardir + os.sep + os.pardir + os.sep + os.pardir) else path


def _plain(value):
    """An HDF5 attribute as a JSON-friendly value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "tolist"):
        return value.tolist()
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _dataset_record(ds, work: Workload) -> dict:
    attrs = {str(k): _plain(v) for k, v in dict(getattr(ds, "attrs", {}) or {}).items()}
    n, d = work.train.shape
    return {"name": ds.name, "path": _display_path(getattr(ds, "path", None)), "n": n, "d": d,
            "q": len(work.queries), "q_total": len(ds.test),
            "query_ids": None if work.query_ids is None else work.query_ids.tolist(),
            "metric": work.metric, "distance": getattr(ds, "distance", work.metric),
            "source": attrs.get("source"), "attrs": attrs}


def _load_dataset(name: str, progress: bool):
    from annlib.datasets import load

    return load(name, progress=progress)


def main(argv=None) -> int:
    """Run the benchmark; returns 0, or 1 when any build or search configuration failed."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["annlib-bench", *argv])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        for name in methods:
            adapters.resolve(name)
        grids, grid_origin = load_grids(args.config) if args.config else ({}, None)
    except ValueError as exc:
        parser.error(str(exc))

    ds = _load_dataset(args.dataset, progress=not args.quiet)
    work = Workload.from_dataset(ds, k=args.k, queries=args.queries, seed=args.seed)
    record = _dataset_record(ds, work)
    print(f"data: {record['name']} from {record['path']}\n"
          f"      n={record['n']:,} d={record['d']} q={record['q']:,} (of {record['q_total']:,}) "
          f"metric={work.metric} ({record['distance']}) source: {record['source'] or '—'}")
    print(f"command: {command}")

    log = (lambda *_: None) if args.quiet else print
    settings = Settings(threads=args.threads, single=not args.no_single,
                        max_build_configs=args.max_build_configs, grids=grids,
                        tune=args.tune or [],
                        progress=not args.quiet, log=log)
    result = run_benchmark(methods, work, settings)

    try:
        reference = report.choose_reference(result["runs"], args.reference)
    except ValueError as exc:
        print(f"warning: {exc}; no ratios", file=sys.stderr)
        reference = None
    modes = ("batch", "single") if settings.single else ("batch",)
    doc = {
        "command": command, "argv": argv, "k": args.k, "threads": args.threads,
        "methods": methods, "dataset": record,
        "settings": {"batch_min_reps": settings.batch_min_reps,
                     "batch_min_seconds": settings.batch_min_seconds,
                     "single_passes": settings.single_passes, "query_seed": args.seed,
                     "max_build_configs": args.max_build_configs, "tune": args.tune,
                     "config": grid_origin, "grids": grids},
        "environment": {"versions": environment.library_versions(),
                        "blas": result.pop("blas"),
                        "machine": environment.machine_info(),
                        "thread_environment": environment.thread_environment()},
        "reference": list(reference) if reference else None,
        **result,
        "summary": report.summaries(result["runs"], reference, modes),
    }

    out_dir = os.path.join(args.out, ds.name)
    os.makedirs(out_dir, exist_ok=True)
    report.write_json(doc, os.path.join(out_dir, "results.json"))
    threads = f"{args.threads} thread" + ("s" if args.threads > 1 else "")
    title = f"{ds.name} (n={record['n']:,}, d={record['d']}, {record['distance']}), k={args.k}, {threads}"
    for mode in modes:
        path = os.path.join(out_dir, f"pareto-{mode}.png")
        if plot_mode(result["runs"], path, mode=mode, k=args.k, footer=command,
                     title=f"{title}: {mode} queries"):
            log(f"wrote {path}")
    log(f"wrote {os.path.join(out_dir, 'results.json')}")
    print()
    print(report.format_tables(doc))
    return 1 if result["failures"] else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
