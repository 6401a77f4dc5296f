"""Partitioned against ScaNN and faiss IVF-PQ fast-scan on one data set, timed in alternating rounds.

``annlib-bench --config partitioned`` times each grid point once per run, one library after the
other, and on a shared machine the QPS it reads at recall@10 0.90 / 0.95 / 0.99 moves between
runs by more than the gap between the libraries (three runs of the same code on glove-200k put
Partitioned ÷ ScaNN at 0.95 in batch at 1.04, 1.10 and 1.38). This tool measures the same three
indexes the way ``bench/hnsw_gap.py`` measures HNSW:

1. Each method is built as the bench config builds it (``bench/configs/partitioned.yml``, read
   through the runner's grid logic and the adapters of ``bench/adapters.py``): annlib
   ``Partitioned`` with the config's build parameters, ScaNN with the adapter's defaults (2·√n
   leaves, reorder stage of 250), faiss ``IVF<2·√n>,PQ<m>x4fs,RFlat``.
2. Recall@10 of every point of the search grid (the same grid for the three, from the config,
   optionally thinned with ``--grid-step``) is measured once per mode, untimed: it does not
   depend on the load of the machine. Recall is the ann-benchmarks measure the main harness
   uses (distances recomputed from the raw vectors, ties within 1e-3 count).
3. Only the points that can move the figures are timed (``--no-prune`` times them all), per
   mode, by their recall in that mode:

   * a point is dropped when another point of the same method has every search parameter no
     larger (one smaller) and at least its recall: every search parameter of the three methods
     (leaves probed, candidates re-ranked) costs time, so the dropped point is slower for no
     recall and cannot be on the Pareto frontier;
   * of the rest, the points with recall inside ``--window`` (default 0.85-0.995) are timed,
     plus, above the window, those not dearer in every parameter than another point above it
     (a dearer one is slower and reaches no level the cheaper one misses, so it can neither
     bracket a level nor beat a point in the window), and, below the window, those not cheaper
     than another point below it (the best recall below the window, kept as the lower bracket
     of 0.90 in case no frontier point falls between the window's start and 0.90).

   On sift-10k's grid thinned by 2 this kept 5 to 13 of 54 points per method, and the QPS
   at the three levels were those of the frontier through all 54; the rules keep that true as
   long as cost grows with each parameter. On glove-200k, whose recall climbs through the
   window over most of the grid, the recall of annlib-bench's runs keeps 110 to 136 of 170.
4. Every kept (method, point) is timed once per round, in a new random order each round, for
   ``--rounds`` rounds, and its median time is kept: a change of load hits every method alike
   instead of whichever block ran at that moment. A time is thread CPU time over at least
   ``--min-span`` seconds (30 ms) of repeated calls, so time spent descheduled by other jobs
   does not count (cache and memory-bandwidth contention from them still does). The recall
   pass checks that the searches run in the calling thread (process CPU time no larger than
   thread CPU time) and warns when they do not, since thread CPU time would then miss work.
5. QPS at 0.90 / 0.95 / 0.99 is read off each method's Pareto frontier with the main harness's
   reading (:mod:`bench.pareto`: log-QPS linear in recall between the bracketing points), and
   divided by ScaNN's. The same reading on each round's times alone gives one ratio per
   round; their median is the figure to quote when the machine's speed changed during the run
   (the per-point medians then depend on which round each point happened to be timed in).

Modes: ``batch`` (every query in one call) and ``single`` (one query per call from a Python
loop, the runner's loop). Everything runs on one thread: BLAS, numba and annlib through
``limit_threads(1)``, faiss's OpenMP count and ScaNN's own through their adapters built with
``threads=1``.

Builds: with ``--cache DIR`` the Partitioned index (``Index.save``) and the faiss index
(``faiss.write_index``) are saved there, keyed by data set, size and build parameters, and
loaded on the next run (delete the folder after changing the build); ScaNN is rebuilt on every
run. After the recall pass the expected timing time (from each point's recall-pass call) is
printed; ``--dry-run`` stops there.

    taskset -c 0 python -m bench.partitioned_gap glove-50-angular-200k --data-dir DATA
        [--queries 1000] [--rounds 3] [--modes batch,single] [--grid-step 1]
        [--methods partitioned,scann,faiss-ivfpqfs] [--window 0.85,0.995] [--no-prune]
        [--config partitioned] [--cache DIR] [--seed 0] [--dry-run] [--out f.json]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from . import adapters
from .environment import library_versions, limit_threads, load_average, machine_info
from .grids import expand, load_grids
from .hnsw_gap import MIN_SPAN
from .measures import canonical_metric
from .pareto import RECALL_LEVELS, frontier, qps_at_recall
from .report import write_json
from .runner import Settings, Workload, _grids_for, _single_pass

__all__ = ["main", "thin_grid", "points_to_time", "level_key"]

K = 10
DEFAULT_METHODS = "partitioned,scann,faiss-ivfpqfs"
REFERENCE = "scann"
DEFAULT_WINDOW = (0.85, 0.995)
MODES = ("batch", "single")
# Process CPU time above thread CPU time by more than this during the recall pass means a
# library searched in other threads, which thread CPU time does not see.
THREAD_SHARE_TOLERANCE = 1.25


@dataclass
class Method:
    """One built index and its search grid.

    Attributes
    ----------
    name : str
        Method name as ``--methods`` gives it (an adapter name).
    adapter : bench.adapters.Adapter
    build_s : float or None
        Build time in seconds; None when the index came from the cache.
    grid : dict
        The search grid swept (after thinning).
    points : list of dict
        Search parameters of every grid point, in grid order.
    rows : list of dict
        One record per point: recall per mode, recall-pass call time, timings once measured.
    """

    name: str
    adapter: object
    build_s: float | None
    grid: dict
    points: list
    rows: list = field(default_factory=list)


def level_key(level: float) -> str:
    """A recall level as the results files write it (``0.90``)."""
    return f"{level:.2f}"


# -- grid -------------------------------------------------------------------------------------------
def thin_grid(grid, step: int):
    """Every ``step``-th value of each search parameter from the first, always keeping the last.

    The last value is the most expensive point of the sweep, which the highest recall needs.
    """
    if step < 1:
        raise ValueError(f"grid step must be >= 1; got {step}")
    if isinstance(grid, list):
        return [thin_grid(group, step) for group in grid]
    out = {}
    for name, values in grid.items():
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        kept = values[::step]
        if kept[-1] != values[-1]:
            kept.append(values[-1])
        out[name] = kept
    return out


def _no_dearer(a: dict, b: dict) -> bool:
    """True when point ``a`` has every search parameter <= ``b``'s and at least one smaller."""
    return all(a[p] <= b[p] for p in b) and any(a[p] < b[p] for p in b)


def points_to_time(points: list, recalls: list, window=DEFAULT_WINDOW) -> list:
    """Indices of the points whose time can move the frontier at levels inside ``window``.

    See the module docstring for the rules; they assume every search parameter costs time.

    Parameters
    ----------
    points : list of dict
        Search parameters of each point (the same names in every point).
    recalls : list of float
        Recall of each point.
    window : (float, float)
        Recall range whose points are all kept (after the dominance rule).

    Returns
    -------
    list of int
        Kept indices, in the order of ``points``.
    """
    lo, hi = window
    n = len(points)
    useful = [i for i in range(n)
              if not any(_no_dearer(points[j], points[i]) and recalls[j] >= recalls[i]
                         for j in range(n) if j != i)]
    above = [i for i in useful if recalls[i] > hi]
    below = [i for i in useful if recalls[i] < lo]
    kept = {i for i in useful if lo <= recalls[i] <= hi}
    kept |= {i for i in above if not any(_no_dearer(points[j], points[i]) for j in above)}
    kept |= {i for i in below if not any(_no_dearer(points[i], points[j]) for j in below)}
    return sorted(kept)


# -- builds -----------------------------------------------------------------------------------------
def _cache_file(cache: Path | None, work: Workload, adapter) -> Path | None:
    """Where a build is cached, or None when there is no cache or the library is not cached."""
    if cache is None:
        return None
    if isinstance(adapter, adapters.AnnlibAdapter):
        suffix = "annlib"
    elif isinstance(adapter, adapters.FaissIVF):
        suffix = "faiss"
    else:
        return None  # ScaNN: rebuilt on every run
    n, d = work.train.shape
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", adapter.describe()).strip("_")
    return cache / f"{work.name}-n{n}-d{d}-{label}.{suffix}"


def _load_cached(adapter, path: Path, work: Workload) -> None:
    """Put the index saved at ``path`` into ``adapter`` as ``fit`` would have left it."""
    adapter.metric = canonical_metric(work.metric)
    adapter.n, adapter.d = work.train.shape
    if isinstance(adapter, adapters.AnnlibAdapter):
        import annlib

        adapter.index = annlib.load(str(path))
        adapter.index.warmup()  # compile ahead, as the adapter's own build does
    else:
        import faiss

        adapter.index = faiss.read_index(str(path))


def _save_cached(adapter, path: Path) -> None:
    """Save a fitted index for the next run (written under a temporary name, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(adapter, adapters.AnnlibAdapter):
        adapter.index.save(str(path))  # atomic by itself
        return
    import faiss

    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(adapter.index, str(tmp))
    os.replace(tmp, path)


def build_method(name: str, work: Workload, grids: dict, grid_step: int, cache: Path | None,
                 log) -> Method | None:
    """Build (or load) one method as the config builds it; None when its library is missing."""
    cls = adapters.resolve(name)
    reason = cls.missing()
    if reason is not None:
        log(f"skipping {name}: {reason}")
        return None
    configs, search_grid = _grids_for(cls, name, work, Settings(grids=grids))
    if len(configs) > 1:
        log(f"{name}: the config gives {len(configs)} builds; using the first, {configs[0]}")
    adapter = cls(threads=1, **configs[0])
    path = _cache_file(cache, work, adapter)
    build_s = None
    if path is not None and path.exists():
        _load_cached(adapter, path, work)
        log(f"{adapter.describe()}: loaded from the cache")
    else:
        adapter.warmup(work.train, work.metric)
        start = time.perf_counter()
        adapter.fit(work.train, work.metric)
        build_s = time.perf_counter() - start
        log(f"{adapter.describe()}: built in {build_s:.1f} s")
        if path is not None:
            _save_cached(adapter, path)
    grid = thin_grid(search_grid if search_grid is not None else adapter.search_space(), grid_step)
    return Method(name, adapter, build_s, grid, expand(grid))


# -- measurement ------------------------------------------------------------------------------------
def _query_call(adapter, work: Workload, mode: str):
    """The call one timing repeats: every query in one call, or one query per call."""
    if mode == "batch":
        return lambda: adapter.batch_query(work.queries, work.k)
    return lambda: _single_pass(adapter, work.queries, work.k)


def measure_recall(method: Method, work: Workload, modes) -> float:
    """Fill ``method.rows`` with each point's recall and call time per mode (one call each).

    Returns
    -------
    float
        Process CPU time over thread CPU time of these calls: about 1 when the library searched
        in the calling thread only.
    """
    thread_total = process_total = 0.0
    method.rows = []
    for params in method.points:
        method.adapter.set_query_arguments(**params)
        row = {"params": dict(params)}
        for mode in modes:
            call = _query_call(method.adapter, work, mode)
            thread0, process0 = time.thread_time(), time.process_time()
            ids = call()
            thread_s = time.thread_time() - thread0
            thread_total += thread_s
            process_total += time.process_time() - process0
            row[f"recall_{mode}"] = work.recall(ids)
            row[f"call_s_{mode}"] = thread_s
        method.rows.append(row)
    return process_total / thread_total if thread_total > 0 else 1.0


def estimated_seconds(call_s: float, min_span: float) -> float:
    """Time one timing of a point takes: whole calls until ``min_span`` is reached."""
    if call_s <= 0:
        return min_span
    return max(1, math.ceil(min_span / call_s)) * call_s


def seconds_per_call(call, min_span: float) -> float:
    """Thread CPU seconds per call, over at least ``min_span`` seconds of repeated calls."""
    reps = 0
    start = time.thread_time()
    while True:
        call()
        reps += 1
        spent = time.thread_time() - start
        if spent >= min_span:
            return spent / reps


def time_rounds(methods: dict, kept: dict, work: Workload, mode: str, rounds: int, min_span: float,
                rng: random.Random) -> list:
    """Time every kept point once per round, in a new random order each round.

    Appends each round's seconds per call to ``row["seconds_<mode>"]``; returns the 1-minute
    load average at the start of each round.
    """
    entries = [(name, i) for name in kept for i in kept[name]]
    for name, indices in kept.items():
        for i in indices:
            methods[name].rows[i][f"seconds_{mode}"] = []
    loads = []
    for _ in range(rounds):
        rng.shuffle(entries)
        loads.append((load_average() or [float("nan")])[0])
        for name, i in entries:
            method = methods[name]
            method.adapter.set_query_arguments(**method.points[i])
            seconds = seconds_per_call(_query_call(method.adapter, work, mode), min_span)
            method.rows[i][f"seconds_{mode}"].append(seconds)
    return loads


# -- figures ----------------------------------------------------------------------------------------
def qps_at_levels(rows: list, mode: str, q: int, round_index: int | None = None) -> dict:
    """QPS at each recall level on the frontier of the timed points (median, or one round's)."""
    key = f"seconds_{mode}"
    pts = []
    for row in rows:
        if not row.get(key):
            continue
        seconds = median(row[key]) if round_index is None else row[key][round_index]
        pts.append((row[f"recall_{mode}"], q / seconds))
    front = frontier(pts)
    return {level_key(lv): qps_at_recall(front, lv) for lv in RECALL_LEVELS}


def _ratio(value, reference):
    """``value / reference``, or None when either is missing."""
    return None if value is None or not reference else value / reference


def mode_figures(methods: dict, mode: str, q: int, rounds: int) -> dict:
    """QPS at the levels per method, and the ratios to ScaNN (medians and per round)."""
    for method in methods.values():
        for row in method.rows:
            if row.get(f"seconds_{mode}"):
                row[f"qps_{mode}"] = q / median(row[f"seconds_{mode}"])
    at = {name: qps_at_levels(m.rows, mode, q) for name, m in methods.items()}
    per_round = [{name: qps_at_levels(m.rows, mode, q, r) for name, m in methods.items()}
                 for r in range(rounds)]
    out = {"qps_at": at, "qps_at_per_round": per_round}
    if REFERENCE not in methods:
        return out
    ref = at[REFERENCE]
    out["ratio_to_scann"] = {name: {lv: _ratio(v, ref[lv]) for lv, v in levels.items()}
                             for name, levels in at.items() if name != REFERENCE}
    out["ratio_to_scann_per_round"] = {
        name: {level_key(lv): [_ratio(fig[name][level_key(lv)], fig[REFERENCE][level_key(lv)])
                               for fig in per_round] for lv in RECALL_LEVELS}
        for name in methods if name != REFERENCE}
    # Within a round both libraries meet the same machine; a speed change between rounds (seen
    # on glove: every point 30 % faster from the fourth of five rounds at the same load) moves
    # each point's median by when it ran, but not the ratio of one round's frontiers.
    out["ratio_to_scann_median_of_rounds"] = {
        name: {lv: _median_reached(values) for lv, values in per_level.items()}
        for name, per_level in out["ratio_to_scann_per_round"].items()}
    return out


def _median_reached(values: list):
    """Median of the figures of the rounds that reached the level, or None."""
    reached = [v for v in values if v is not None]
    return median(reached) if reached else None


# -- command line -----------------------------------------------------------------------------------
def _window(text: str) -> tuple:
    """``LO,HI`` as a recall window, which must contain every reported level."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"window must be LO,HI; got {text!r}")
    if not (0.0 <= lo <= min(RECALL_LEVELS) and max(RECALL_LEVELS) <= hi <= 1.0):
        raise argparse.ArgumentTypeError(
            f"window must contain the levels {RECALL_LEVELS} (LO <= {min(RECALL_LEVELS)}, "
            f"HI >= {max(RECALL_LEVELS)}); got {text!r}")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="python -m bench.partitioned_gap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="data set name (DIR/<name>.hdf5 with --data-dir, else found "
                                   "as annlib.datasets.load finds it), or a path to an .hdf5 file")
    p.add_argument("--data-dir", default=None, help="folder of the ann-benchmarks HDF5 files")
    p.add_argument("--queries", type=int, default=None, help="seeded random subset of the queries")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the query subset and of the rounds' order (default 0)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="default %(default)s")
    p.add_argument("--modes", default="batch,single", help="batch and/or single (default both)")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (default 3)")
    p.add_argument("--config", default="partitioned",
                   help="grid file (path or packaged name) with the builds and search grids "
                        "(default: bench/configs/partitioned.yml)")
    p.add_argument("--grid-step", type=int, default=1,
                   help="keep every N-th value of each search parameter (and the last)")
    p.add_argument("--window", type=_window, default=DEFAULT_WINDOW,
                   help="recall range whose points are all timed (default 0.85,0.995)")
    p.add_argument("--no-prune", action="store_true", help="time every grid point")
    p.add_argument("--min-span", type=float, default=MIN_SPAN,
                   help="thread CPU seconds of repeated calls per timing (default %(default)s)")
    p.add_argument("--cache", default=None, help="folder to save and reuse the annlib and faiss builds")
    p.add_argument("--dry-run", action="store_true",
                   help="stop after the recall pass and the time estimate")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p


def _load_workload(args) -> Workload:
    """The data set, with the query subset asked for, as the main harness loads it."""
    from annlib.datasets import load, read_hdf5

    if args.data_dir is not None:
        ds = read_hdf5(Path(args.data_dir) / f"{args.dataset}.hdf5", name=args.dataset)
    else:
        ds = load(args.dataset, download=False, progress=False)
    return Workload.from_dataset(ds, k=K, queries=args.queries, seed=args.seed)


def _log(*parts) -> None:
    """Progress messages, flushed so a long run shows where it is."""
    print(*parts, flush=True)


def _recall_pass(methods: dict, work: Workload, modes: list) -> dict:
    """Recall of every point of every method (untimed); returns the per-method records."""
    out = {}
    start = time.perf_counter()
    for method in methods.values():
        share = measure_recall(method, work, modes)
        out[method.name] = {"label": method.adapter.describe(), "build_s": method.build_s,
                            "grid": method.grid, "process_cpu_over_thread_cpu": share,
                            "points": method.rows}
        if share > THREAD_SHARE_TOLERANCE:
            _log(f"warning: {method.name} used {share:.2f}x its thread's CPU time: it searches "
                 f"in other threads too, which thread CPU time does not count")
    _log(f"recall pass: {sum(len(m.points) for m in methods.values())} points per mode in "
         f"{time.perf_counter() - start:.0f} s")
    return out


def _points_kept(methods: dict, mode: str, args) -> dict:
    """Indices of the points to time in one mode, per method."""
    if args.no_prune:
        return {name: list(range(len(m.points))) for name, m in methods.items()}
    return {name: points_to_time(m.points, [row[f"recall_{mode}"] for row in m.rows], args.window)
            for name, m in methods.items()}


def _timing_plan(methods: dict, modes: list, args) -> dict:
    """Points to time and expected timing time per mode, printed (CPU seconds)."""
    plan = {}
    for mode in modes:
        kept = _points_kept(methods, mode, args)
        estimate = args.rounds * sum(
            estimated_seconds(methods[name].rows[i][f"call_s_{mode}"], args.min_span)
            for name in kept for i in kept[name])
        counts = {name: len(v) for name, v in kept.items()}
        _log(f"{mode}: timing {sum(counts.values())} points "
             f"({', '.join(f'{k} {v}/{len(methods[k].points)}' for k, v in counts.items())}) "
             f"x {args.rounds} rounds: about {estimate:.0f} s of CPU time")
        plan[mode] = (kept, {"timed_points": counts, "estimated_s": estimate})
    total = sum(fig["estimated_s"] for _, fig in plan.values())
    _log(f"timing: about {total:.0f} s ({total / 60:.1f} min) of CPU time in all; more elapsed "
         f"time when other jobs share the core")
    return plan


def run(args, command: str) -> dict:
    """Build, measure recall, time the kept points in rounds; returns the results document."""
    modes = args.modes.split(",")
    grids, grid_origin = load_grids(args.config)
    work = _load_workload(args)
    n, d = work.train.shape
    q = len(work.queries)
    _log(f"{work.name}: n={n:,} d={d} q={q:,} metric={work.metric}")
    doc = {"command": command, "dataset": {"name": work.name, "n": n, "d": d, "q": q,
                                           "metric": work.metric, "query_seed": args.seed},
           "k": K, "config": grid_origin, "grid_step": args.grid_step, "window": list(args.window),
           "pruned": not args.no_prune, "rounds": args.rounds, "min_span": args.min_span,
           "modes": modes, "reference": REFERENCE, "versions": library_versions(),
           "machine": machine_info(), "load_start": load_average(), "methods": {}, "by_mode": {}}
    cache = Path(args.cache) if args.cache else None
    with limit_threads(1):
        methods = {}
        for name in (m for m in args.methods.split(",") if m):
            method = build_method(name, work, grids, args.grid_step, cache, _log)
            if method is not None:
                methods[name] = method
        doc["methods"] = _recall_pass(methods, work, modes)
        plan = _timing_plan(methods, modes, args)
        rng = random.Random(args.seed)
        for mode, (kept, fig) in plan.items():
            doc["by_mode"][mode] = fig
            if not args.dry_run:
                fig.update(_time_mode(methods, kept, work, mode, args, rng))
    doc["load_end"] = load_average()
    return doc


def _time_mode(methods: dict, kept: dict, work: Workload, mode: str, args, rng: random.Random) -> dict:
    """Time the kept points of one mode in rounds; the figures read off the frontiers."""
    start, cpu_start = time.perf_counter(), time.thread_time()
    loads = time_rounds(methods, kept, work, mode, args.rounds, args.min_span, rng)
    # CPU time is what the estimate predicts; elapsed time exceeds it when other jobs compete
    return {"elapsed_s": time.perf_counter() - start, "thread_cpu_s": time.thread_time() - cpu_start,
            "load_per_round": loads, **mode_figures(methods, mode, len(work.queries), args.rounds)}


def _fmt(value, pattern: str) -> str:
    """A figure, or a dash when it is missing (a level never reached)."""
    return "—" if value is None else format(value, pattern)


def _spread(values: list) -> str:
    """``min-max`` of the figures of the rounds that reached the level."""
    reached = [v for v in values if v is not None]
    return "—" if not reached else f"{min(reached):.2f}-{max(reached):.2f}"


def print_table(doc: dict) -> None:
    """QPS at the levels per method and mode, with the ratios to ScaNN and their spread."""
    levels = [level_key(lv) for lv in RECALL_LEVELS]
    for mode, fig in doc["by_mode"].items():
        if "qps_at" not in fig:
            continue  # a dry run
        loads = [v for v in fig["load_per_round"] if v == v]
        load = f"{min(loads):.2f}-{max(loads):.2f}" if loads else "—"
        print(f"-- {mode}: QPS at recall@10 {' / '.join(levels)}, median of {doc['rounds']} "
              f"rounds ({fig['elapsed_s']:.0f} s, {fig['thread_cpu_s']:.0f} s CPU, load {load})")
        for name, at in fig["qps_at"].items():
            line = f"  {name:15s} {' / '.join(_fmt(at[lv], ',.0f') for lv in levels):26s}"
            if name in fig.get("ratio_to_scann", {}):
                ratio = fig["ratio_to_scann"][name]
                spread = fig["ratio_to_scann_per_round"][name]
                of_rounds = fig["ratio_to_scann_median_of_rounds"][name]
                line += (f" ÷ scann {' / '.join(_fmt(ratio[lv], '.2f') for lv in levels)}"
                         f"   per round: median {' / '.join(_fmt(of_rounds[lv], '.2f') for lv in levels)}"
                         f", range {' / '.join(_spread(spread[lv]) for lv in levels)}")
            print(line)


def main(argv=None) -> dict:
    """Run the comparison; prints the table and returns (and with ``--out`` writes) the figures."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.grid_step < 1 or args.min_span <= 0:
        parser.error("--rounds and --grid-step must be >= 1 and --min-span > 0")
    if any(m not in MODES for m in args.modes.split(",")):
        parser.error(f"--modes takes batch and/or single; got {args.modes!r}")
    doc = run(args, shlex.join(["python", "-m", "bench.partitioned_gap", *argv]))
    print_table(doc)
    if args.out:
        write_json(doc, args.out)
        _log(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
