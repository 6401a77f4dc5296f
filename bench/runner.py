"""The sweep: for each method and build configuration, build once, then measure every search
configuration in batch and single-query mode.

Measurement follows ann-benchmarks' runner with the repetition rules of the reference numbers
the project started from: a warm-up call that is not timed (it absorbs JIT compilation and cold
caches), batch QPS as the best of at least 3 repetitions spanning at least 0.5 s, single-query
QPS as the best of at least 2 passes of a Python loop over the queries, and recall recomputed
from the raw vectors for both modes. Everything runs under one thread count (1 unless asked
otherwise).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import adapters as _adapters
from .environment import blas_info, limit_threads, load_average
from .flops import exact_throughput
from .grids import expand
from .measures import best_time, qps, recall_at_k, true_kth_distances, canonical_metric

__all__ = ["Workload", "Settings", "run_benchmark", "run_method", "measure_search"]


@dataclass(frozen=True)
class Workload:
    """What every method is measured on.

    Attributes
    ----------
    name : str
    train : ndarray of float32, shape (n, d)
    queries : ndarray of float32, shape (q, d)
    kth_distance : ndarray of float64, shape (q,)
        True k-th nearest distance of each query (the recall threshold before epsilon).
    metric : str
        ``l2``, ``cosine`` or ``ip``.
    k : int
    query_ids : ndarray of int or None
        Rows of the data set's test set used, when a subsample was drawn.
    """

    name: str
    train: np.ndarray
    queries: np.ndarray
    kth_distance: np.ndarray
    metric: str
    k: int
    query_ids: np.ndarray | None = None

    @classmethod
    def from_dataset(cls, ds, *, k: int = 10, queries: int | None = None, seed: int = 0):
        """Take a loaded data set, optionally keeping a seeded random subset of its queries.

        Parameters
        ----------
        ds : annlib.datasets.Dataset
            Needs ``name``, ``train``, ``test``, ``neighbors``, ``distances`` and ``metric``.
        k : int
        queries : int, optional
            Number of queries to keep; all when None or not fewer than the test set.
        seed : int
            Seed of the subsample, recorded with the results.
        """
        train = np.ascontiguousarray(ds.train, dtype=np.float32)
        test = np.ascontiguousarray(ds.test, dtype=np.float32)
        neighbors = None if ds.neighbors is None else np.asarray(ds.neighbors)
        distances = None if ds.distances is None else np.asarray(ds.distances)
        query_ids = None
        if queries is not None and queries < len(test):
            if queries < 1:
                raise ValueError(f"queries must be >= 1; got {queries}")
            query_ids = np.sort(np.random.default_rng(seed).choice(len(test), queries, replace=False))
            test = np.ascontiguousarray(test[query_ids])
            neighbors = None if neighbors is None else neighbors[query_ids]
            distances = None if distances is None else distances[query_ids]
        metric = canonical_metric(ds.metric)
        kth = true_kth_distances(k, distances=distances, neighbors=neighbors, train=train,
                                 queries=test, metric=metric)
        return cls(ds.name, train, test, kth, metric, k, query_ids)

    def recall(self, ids: np.ndarray) -> float:
        """recall@k of returned ids (ann-benchmarks definition)."""
        return recall_at_k(ids, self.train, self.queries, self.kth_distance, self.metric, self.k)


@dataclass
class Settings:
    """How to measure.

    Attributes
    ----------
    threads : int
        Threads for build and search in every library.
    single : bool
        Also measure one query per call from a Python loop.
    batch_min_reps, batch_min_seconds : int, float
        Batch timing is the best of at least this many repetitions spanning this long.
    single_passes : int
        Single-query timing is the best of this many passes over the queries.
    max_build_configs : int, optional
        Keep only the first (cheapest) build configurations of each method.
    grids : dict
        Per-method ``{"build": grid, "search": grid}`` replacing the defaults.
    tune : list of float
        Recall targets: after its grid, every tunable annlib index is tuned for each (queries
        made from the training vectors, never the test queries) and the tuned point measured as
        an extra record marked ``tuned_for``; ``auto`` is built once per target instead of its
        default targets.
    progress : bool
        Show a progress bar per built index.
    log : callable
        Where messages go (``print`` unless quiet).
    """

    threads: int = 1
    single: bool = True
    batch_min_reps: int = 3
    batch_min_seconds: float = 0.5
    single_passes: int = 2
    max_build_configs: int | None = None
    grids: dict = field(default_factory=dict)
    tune: list = field(default_factory=list)
    progress: bool = True
    log: Callable[[str], None] = print


def _single_pass(adapter, queries: np.ndarray, k: int) -> np.ndarray:
    """One query per call, as a user serving requests one at a time would call it."""
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for i in range(len(queries)):
        ids = adapter.query(queries[i], k)
        out[i, : len(ids)] = ids[:k]
    return out


def measure_search(adapter, work: Workload, settings: Settings, params: dict) -> dict:
    """Measure one search configuration of a built index.

    Returns
    -------
    dict
        ``recall``, ``qps_batch``, ``batch_seconds``, ``batch_reps`` and, when single-query mode
        is on, ``recall_single``, ``qps_single``, ``single_seconds``, ``single_passes``.
    """
    adapter.set_query_arguments(**params)
    q, k = work.queries, work.k
    adapter.batch_query(q, k)  # warm-up, not timed
    seconds, reps, ids = best_time(lambda: adapter.batch_query(q, k),
                                   min_reps=settings.batch_min_reps,
                                   min_seconds=settings.batch_min_seconds)
    out = {"recall": work.recall(ids), "qps_batch": qps(len(q), seconds),
           "batch_seconds": seconds, "batch_reps": reps}
    if settings.single:
        adapter.query(q[0], k)  # warm-up of the one-query path, not timed
        seconds, passes, ids = best_time(lambda: _single_pass(adapter, q, k),
                                         min_reps=settings.single_passes, min_seconds=0.0)
        out.update({"recall_single": work.recall(ids), "qps_single": qps(len(q), seconds),
                    "single_seconds": seconds, "single_passes": passes})
    return out


def _grids_for(cls, name: str, work: Workload, settings: Settings) -> tuple[list[dict], object]:
    """Build configurations to run and the search grid override (None = the index's own)."""
    override = settings.grids.get(name, {})
    n, d = work.train.shape
    build = override["build"] if "build" in override else cls.default_space(n, d, work.metric)["build"]
    if settings.tune and cls is _adapters.AnnlibAuto and "build" not in override:
        build = {"target_recall": list(settings.tune)}
    configs = expand(build)
    if settings.max_build_configs is not None:
        configs = configs[: settings.max_build_configs]
    return configs, override.get("search")


def _index_sizes(adapter) -> dict:
    """Serialized and in-memory size; a method that cannot report one records why."""
    out = {}
    for key, fn in (("index_bytes", adapter.index_bytes), ("memory_bytes", adapter.memory_bytes)):
        try:
            value = fn()
            out[key] = None if value is None else int(value)
        except Exception as exc:
            out[key] = None
            out[f"{key}_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _tuned_points(adapter, base, work, settings, failures) -> list[dict]:
    """The index tuned for each of ``settings.tune`` and measured: one record per target."""
    if not settings.tune or not hasattr(adapter, "tune"):
        return []
    records = []
    label = base["label"]
    for target in settings.tune:
        try:
            tuned = adapter.tune(work, target)
            if tuned is None:
                return records
            params, info = tuned
            result = measure_search(adapter, work, settings, params)
        except Exception as exc:
            failures.append({"method": base["method"], "label": label, "tuned_for": target,
                             "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()})
            settings.log(f"  {label} tuned for {target}: failed: {type(exc).__name__}: {exc}")
            continue
        settings.log(f"  {label} tuned for {target}: {params} in {info['tune_s']:.1f} s, "
                     f"test recall {result['recall']:.4f}, {result['qps_batch']:,.0f} QPS")
        records.append({**base, "search_params": dict(params), "tuned_for": target, **info,
                        **result})
    return records


def _run_build(cls, name, build_params, search_grid, work, settings, failures) -> list[dict]:
    """Build one configuration and sweep its search grid; returns one record per point."""
    from tqdm.auto import tqdm

    adapter = cls(threads=settings.threads, **build_params)
    if settings.tune and hasattr(adapter, "tune_targets"):
        adapter.tune_targets = tuple(settings.tune)
    adapter.warmup(work.train, work.metric)
    start = time.perf_counter()
    adapter.fit(work.train, work.metric)
    build_s = time.perf_counter() - start
    label = adapter.describe()  # may name what the build chose (auto)
    sizes = _index_sizes(adapter)
    n = work.train.shape[0]
    base = {"method": name, "label": label, "build_params": dict(build_params),
            "build_s": build_s, **sizes,
            "bytes_per_vector": None if sizes["index_bytes"] is None else sizes["index_bytes"] / n,
            "threads": settings.threads, "exact": bool(cls.exact)}
    grid = search_grid if search_grid is not None else adapter.search_space()
    records = []
    points = expand(grid)
    for params in tqdm(points, desc=label, disable=not settings.progress, leave=False):
        try:
            result = measure_search(adapter, work, settings, params)
        except Exception as exc:
            failures.append({"method": name, "label": label, "search_params": params,
                             "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()})
            settings.log(f"  {label} {params}: failed: {type(exc).__name__}: {exc}")
            continue
        records.append({**base, "search_params": dict(params), **result})
    records += _tuned_points(adapter, base, work, settings, failures)
    settings.log(f"  {label}: built in {build_s:.2f} s, {len(records)}/{len(points)} search "
                 f"configs, best recall {max((r['recall'] for r in records), default=float('nan')):.4f}")
    adapter.done()
    return records


def run_method(name: str, work: Workload, settings: Settings) -> dict:
    """Every build and search configuration of one method.

    Returns
    -------
    dict
        ``runs`` (list of records), ``failures`` (list), ``skipped`` (reason or None) and, for
        an exact method, ``flops`` (see :func:`annlib.bench.flops.exact_throughput`).
    """
    out = {"runs": [], "failures": [], "skipped": None}
    cls = _adapters.resolve(name)
    reason = cls.missing()
    if reason is not None:
        settings.log(f"skipping {name}: {reason}")
        out["skipped"] = reason
        return out
    build_configs, search_grid = _grids_for(cls, name, work, settings)
    settings.log(f"{name}: {len(build_configs)} build config(s)")
    with limit_threads(settings.threads):
        for build_params in build_configs:
            try:
                out["runs"] += _run_build(cls, name, build_params, search_grid, work, settings,
                                          out["failures"])
            except Exception as exc:
                out["failures"].append({"method": name, "build_params": build_params,
                                        "error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc()})
                settings.log(f"  {name} {build_params}: build failed: {type(exc).__name__}: {exc}")
        if cls.exact and out["runs"]:
            best = min(out["runs"], key=lambda r: r["batch_seconds"])
            out["flops"] = exact_throughput(work.train, work.queries, best["batch_seconds"],
                                            metric=work.metric, label=best["label"])
    return out


def run_benchmark(methods: list[str], work: Workload, settings: Settings) -> dict:
    """Run every method on one workload.

    Returns
    -------
    dict
        ``runs``, ``failures``, ``skipped`` ({method: reason}), ``flops`` ({label: figures}),
        ``started``/``finished`` (local time), ``loadavg_start``/``loadavg_end`` and ``blas``
        (the BLAS/OpenMP libraries loaded, see :func:`annlib.bench.environment.blas_info`).
    """
    result = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": load_average(),
              "runs": [], "failures": [], "skipped": {}, "flops": {}}
    for name in methods:
        part = run_method(name, work, settings)
        result["runs"] += part["runs"]
        result["failures"] += part["failures"]
        if part["skipped"] is not None:
            result["skipped"][name] = part["skipped"]
        if "flops" in part:
            result["flops"][part["flops"]["label"]] = part["flops"]
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["loadavg_end"] = load_average()
    with limit_threads(settings.threads):
        # Read under the same limits as the measurements, after every library has loaded, so
        # the record shows the kernels and thread counts the timings actually ran with.
        result["blas"] = blas_info()
    return result
