"""One adapter per algorithm, all with the ann-benchmarks adapter shape.

Every adapter is built with its build parameters, then::

    adapter.fit(train, metric)               # build (the runner times this)
    adapter.set_query_arguments(**params)    # one point of the search sweep
    adapter.batch_query(Q, k) -> (q, k) int64 ids, -1 where fewer than k were found
    adapter.query(q, k)       -> (k,)  int64 ids
    adapter.index_bytes()     -> serialized size of the index
    adapter.describe()        -> label naming the method and its build parameters

The baselines are the libraries our users know, configured as in the reference measurements
the project started from (faiss IVF with 4·√n lists and ScaNN with 2·√n leaves by default; grids
in bench/configs/): their packages are imported only when asked for, and a method whose package
is missing is skipped by the runner with a message. Angular data are unit-normalised and searched
by inner product for every baseline; query normalisation happens inside the timed call, as the
library under test has to do it too.

annlib's own families go through the public API only: ``annlib.Index.build`` and
``index.search``, with the parameter ranges from ``search_space()``.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
from importlib import import_module

import numpy as np

from .measures import canonical_metric, path_bytes

__all__ = [
    "Adapter",
    "AnnlibAdapter",
    "AnnlibAuto",
    "FaissFlat",
    "FaissHNSW",
    "FaissIVF",
    "FaissIVFPQFastScan",
    "Hnswlib",
    "Scann",
    "PyNNDescent",
    "BASELINES",
    "register",
    "annlib_families",
    "method_names",
    "resolve",
    "format_label",
]

# Search sweeps of the reference measurements the project started from.
EF_SWEEP = [10, 20, 40, 80, 120, 200, 400, 600, 800]
PROBE_SWEEP = [1, 2, 4, 8, 16, 32, 64, 128, 256]
EPSILON_SWEEP = [0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.24, 0.28, 0.32, 0.36]


def format_label(name: str, build_params: dict) -> str:
    """``name(p1=v1,p2=v2)``, or just ``name`` without build parameters."""
    if not build_params:
        return name
    return f"{name}({','.join(f'{k}={v}' for k, v in build_params.items())})"


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows left as they are)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, np.finfo(np.float32).tiny), dtype=np.float32)


def _clip_sweep(values, upper: int) -> list[int]:
    """A sweep cut at ``upper``; when values were cut, ``upper`` (exhaustive) ends it instead."""
    kept = [v for v in values if v < upper]
    return kept + [upper] if len(kept) < len(values) else kept


class Adapter:
    """Base class: the ann-benchmarks adapter contract plus the parameter grids.

    Parameters
    ----------
    threads : int
        Threads the library may use for build and search; 1 for the reference measurements.
    **build_params
        The method's build parameters (one point of its build grid).
    """

    #: Method name as given to ``--methods``.
    name = ""
    #: Modules that must import for the method to run.
    requires: tuple[str, ...] = ()
    #: What to install when they do not.
    install_hint = ""
    #: True for methods that return the exact neighbours (reported with GFLOP/s).
    exact = False
    #: Rows of the train set a JIT warm-up builds on (a few thousand reach every build path).
    _WARMUP_ROWS = 3000

    def __init__(self, *, threads: int = 1, **build_params):
        self.threads = int(threads)
        self.build_params = dict(build_params)
        self.search_params: dict = {}
        self.metric = None
        self.n = self.d = 0

    # -- availability and grids -------------------------------------------------------------
    @classmethod
    def missing(cls) -> str | None:
        """Why the method cannot run here, or None when its packages import."""
        for module in cls.requires:
            try:
                import_module(module)
            except Exception as exc:  # a broken install raises more than ImportError
                hint = f" (install {cls.install_hint})" if cls.install_hint else ""
                return f"{module} does not import: {exc}{hint}"
        return None

    @classmethod
    def default_space(cls, n: int, d: int, metric: str) -> dict:
        """Default build and search grids for a data set of ``n`` vectors of dimension ``d``."""
        return {"build": {}, "search": {}}

    def search_space(self) -> dict:
        """Search grid for the fitted index."""
        return self.default_space(self.n, self.d, self.metric)["search"]

    def describe(self) -> str:
        """Label naming the method and its build parameters."""
        return format_label(self.name, self.build_params)

    __str__ = describe

    # -- the adapter contract ---------------------------------------------------------------
    def warmup(self, train: np.ndarray, metric: str) -> None:
        """Compile or load whatever a first call would, before the timed build (optional)."""

    def fit(self, train: np.ndarray, metric: str) -> None:
        """Build the index over ``train`` for ``metric`` (``l2``, ``cosine`` or ``ip``)."""
        self.metric = canonical_metric(metric)
        self.n, self.d = train.shape
        self._fit(np.ascontiguousarray(train, dtype=np.float32))

    def set_query_arguments(self, **params) -> None:
        """Select one point of the search grid for the following queries."""
        self.search_params = dict(params)

    def batch_query(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Ids of the ``k`` best points of every query, all queries in one call."""
        raise NotImplementedError

    def query(self, q: np.ndarray, k: int) -> np.ndarray:
        """Ids of the ``k`` best points of one query."""
        return self.batch_query(q[None, :], k)[0]

    def index_bytes(self) -> int:
        """Size of the serialized index in bytes."""
        raise NotImplementedError

    def memory_bytes(self) -> int | None:
        """In-memory size when the library reports it, else None."""
        return None

    def done(self) -> None:
        """Release the index."""
        self.__dict__.pop("index", None)

    # -- helpers for the baselines ----------------------------------------------------------
    def _prepare(self, x: np.ndarray) -> np.ndarray:
        """Vectors as the baseline indexes them: unit length for angular data."""
        if self.metric == "cosine":
            return _normalise(x)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _fit(self, train: np.ndarray) -> None:
        raise NotImplementedError

    def _build_param(self, key: str):
        """A build parameter as given, else the first value of the default build grid."""
        if key not in self.build_params:
            return self.default_space(self.n, self.d, self.metric)["build"][key][0]
        return self.build_params[key]


# -- faiss --------------------------------------------------------------------------------------
class _Faiss(Adapter):
    requires = ("faiss",)
    install_hint = "faiss-cpu"

    def _faiss(self):
        import faiss

        # faiss runs OpenMP; the count is process-wide, so set it before every use.
        faiss.omp_set_num_threads(self.threads)
        return faiss

    def _fit(self, train):
        faiss = self._faiss()
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        x = self._prepare(train)
        self.index = self._make(faiss, self.d, metric)
        if not self.index.is_trained:
            self.index.train(x)
        self.index.add(x)

    def _make(self, faiss, d, metric):
        raise NotImplementedError

    def set_query_arguments(self, **params):
        super().set_query_arguments(**params)
        self._faiss()
        self._apply(params)

    def _apply(self, params):
        pass

    def batch_query(self, queries, k):
        _, ids = self.index.search(self._prepare(queries), k)
        return ids

    def index_bytes(self):
        return int(self._faiss().serialize_index(self.index).nbytes)


class FaissFlat(_Faiss):
    """faiss ``IndexFlatL2`` (``IndexFlatIP`` on unit vectors for angular data): exact."""

    name = "faiss-flat"
    exact = True

    def _make(self, faiss, d, metric):
        return faiss.IndexFlatL2(d) if metric == faiss.METRIC_L2 else faiss.IndexFlatIP(d)


class FaissHNSW(_Faiss):
    """faiss ``IndexHNSWFlat``; search parameter ``ef`` (efSearch)."""

    name = "faiss-hnsw"

    @classmethod
    def default_space(cls, n, d, metric):
        return {"build": {"M": [32], "ef_construction": [200]}, "search": {"ef": EF_SWEEP}}

    def _make(self, faiss, d, metric):
        index = faiss.IndexHNSWFlat(d, int(self._build_param("M")), metric)
        index.hnsw.efConstruction = int(self._build_param("ef_construction"))
        return index

    def _apply(self, params):
        if "ef" in params:
            self.index.hnsw.efSearch = int(params["ef"])


class FaissIVF(_Faiss):
    """faiss ``IVF<nlist>,Flat`` with nlist = 4·√n; search parameter ``nprobe``.

    A build grid may give ``nlist`` itself or ``nlist_factor`` (nlist = round(factor · √n), so
    one config file sets the leaf count relative to each data set's size, e.g. 2 to match
    ScaNN's and Partitioned's 2·√n leaves).
    """

    name = "faiss-ivf"

    @classmethod
    def default_space(cls, n, d, metric):
        nlist = max(1, min(n, int(round(4 * math.sqrt(n)))))
        return {"build": {"nlist": [nlist]}, "search": {"nprobe": _clip_sweep(PROBE_SWEEP, nlist)}}

    def _nlist(self) -> int:
        """nlist as given, or from ``nlist_factor`` · √n, or the default grid's."""
        if "nlist" not in self.build_params and "nlist_factor" in self.build_params:
            factor = float(self.build_params["nlist_factor"])
            return max(1, min(self.n, int(round(factor * math.sqrt(self.n)))))
        return int(self._build_param("nlist"))

    def _factory(self):
        return f"IVF{self._nlist()},Flat"

    def _make(self, faiss, d, metric):
        return faiss.index_factory(d, self._factory(), metric)

    def search_space(self):
        return {"nprobe": _clip_sweep(PROBE_SWEEP, self._nlist())}

    def _apply(self, params):
        if "nprobe" in params:
            self._faiss().extract_index_ivf(self.index).nprobe = int(params["nprobe"])


class FaissIVFPQFastScan(FaissIVF):
    """faiss ``IVF<nlist>,PQ<m>x4fs,RFlat``: 4-bit fast-scan PQ with exact re-ranking.

    ``m`` = d/2 sub-quantizers (d when d/2 is odd, as fast-scan packs them in pairs); search
    parameters ``nprobe`` and ``k_factor`` (candidates re-ranked = k_factor · k).
    """

    name = "faiss-ivfpqfs"

    @classmethod
    def default_space(cls, n, d, metric):
        space = super().default_space(n, d, metric)
        m = d // 2 if (d // 2) % 2 == 0 else d
        space["build"]["m"] = [m]
        space["search"]["k_factor"] = [4, 16]
        return space

    def search_space(self):
        return {**super().search_space(), "k_factor": [4, 16]}

    def _factory(self):
        nlist, m = self._nlist(), int(self._build_param("m"))
        return f"IVF{nlist},PQ{m}x4fs,RFlat"

    def _apply(self, params):
        super()._apply(params)
        if "k_factor" in params:
            self.index.k_factor = float(params["k_factor"])


# -- hnswlib ------------------------------------------------------------------------------------
class Hnswlib(Adapter):
    """hnswlib HNSW (M = 16 and 32, ef_construction = 200); search parameter ``ef``."""

    name = "hnswlib"
    requires = ("hnswlib",)
    install_hint = "hnswlib"

    @classmethod
    def default_space(cls, n, d, metric):
        return {"build": {"M": [16, 32], "ef_construction": [200]}, "search": {"ef": EF_SWEEP}}

    def _fit(self, train):
        import hnswlib

        index = hnswlib.Index(space="l2" if self.metric == "l2" else "ip", dim=self.d)
        index.init_index(
            max_elements=self.n,
            M=int(self._build_param("M")),
            ef_construction=int(self._build_param("ef_construction")),
            random_seed=100,
        )
        index.set_num_threads(self.threads)
        index.add_items(self._prepare(train), np.arange(self.n), num_threads=self.threads)
        self.index = index

    def set_query_arguments(self, **params):
        super().set_query_arguments(**params)
        if "ef" in params:
            self.index.set_ef(int(params["ef"]))

    def batch_query(self, queries, k):
        labels, _ = self.index.knn_query(self._prepare(queries), k=k, num_threads=self.threads)
        return labels.astype(np.int64, copy=False)

    def index_bytes(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "index.bin")
            self.index.save_index(path)
            return path_bytes(path)


# -- ScaNN --------------------------------------------------------------------------------------
class Scann(Adapter):
    """ScaNN: k-means tree (2·√n leaves, spherical for angular data), 4-bit asymmetric hashing
    over 2-dimension blocks (anisotropic threshold 0.2 for inner product, plain for L2), exact
    re-ranking. Search parameters ``leaves_to_search`` and ``reorder`` (candidates re-ranked).
    """

    name = "scann"
    requires = ("scann",)
    install_hint = "scann"

    @classmethod
    def default_space(cls, n, d, metric):
        leaves = max(1, min(n, int(round(2 * math.sqrt(n)))))
        build = {"num_leaves": [leaves], "dims_per_block": [2]}
        if canonical_metric(metric) != "l2":
            build["anisotropic_threshold"] = [0.2]
        search = {"leaves_to_search": _clip_sweep(PROBE_SWEEP, leaves), "reorder": [40, 100, 250]}
        return {"build": build, "search": search}

    def search_space(self):
        leaves = int(self._build_param("num_leaves"))
        return {"leaves_to_search": _clip_sweep(PROBE_SWEEP, leaves), "reorder": [40, 100, 250]}

    def _fit(self, train):
        import scann

        leaves = int(self._build_param("num_leaves"))
        # Absent for L2 data: plain (isotropic) quantization, as in the reference setup.
        threshold = self.build_params.get("anisotropic_threshold",
                                          self.default_space(self.n, self.d, self.metric)["build"]
                                          .get("anisotropic_threshold", [None])[0])
        distance = "squared_l2" if self.metric == "l2" else "dot_product"
        builder = (
            scann.scann_ops_pybind.builder(self._prepare(train), 10, distance)
            .tree(num_leaves=leaves, num_leaves_to_search=min(leaves, 10),
                  training_sample_size=self.n, spherical=self.metric == "cosine")
            .score_ah(int(self._build_param("dims_per_block")),
                      anisotropic_quantization_threshold=float("nan") if threshold is None
                      else float(threshold))
            # The re-ranking stage must exist at build; its depth is chosen per search.
            .reorder(int(self.build_params.get("reorder_max", 250)))
            .set_n_training_threads(self.threads)
        )
        self.index = builder.build()
        self.index.set_num_threads(self.threads)

    def _search_args(self, k):
        return (k, int(self.search_params.get("reorder", 100)),
                int(self.search_params.get("leaves_to_search", 1)))

    def batch_query(self, queries, k):
        # One thread: the plain batched call, which is single-threaded by construction.
        if self.threads == 1:
            ids, dist = self.index.search_batched(self._prepare(queries), *self._search_args(k))
        else:
            ids, dist = self.index.search_batched_parallel(self._prepare(queries),
                                                           *self._search_args(k))
        # ScaNN pads rows it cannot fill with id 0 and distance NaN; make that the usual -1.
        return np.where(np.isnan(dist), -1, ids.astype(np.int64))

    def query(self, q, k):
        ids, _ = self.index.search(self._prepare(q), *self._search_args(k))
        out = np.full(k, -1, dtype=np.int64)
        out[: len(ids)] = ids  # a short row means fewer candidates than k were found
        return out

    def index_bytes(self):
        with tempfile.TemporaryDirectory() as tmp:
            self.index.serialize(tmp)
            return path_bytes(tmp)


# -- pynndescent --------------------------------------------------------------------------------
class PyNNDescent(Adapter):
    """pynndescent NN-descent graph (n_neighbors = 30); search parameter ``epsilon``."""

    name = "pynndescent"
    requires = ("pynndescent",)
    install_hint = "pynndescent"

    @classmethod
    def default_space(cls, n, d, metric):
        return {"build": {"n_neighbors": [30]}, "search": {"epsilon": EPSILON_SWEEP}}

    def _pynn_metric(self):
        if self.metric == "ip":
            raise ValueError("pynndescent has no maximum-inner-product search (metric 'ip')")
        return "euclidean" if self.metric == "l2" else "dot"

    def _build(self, x, n_neighbors):
        from pynndescent import NNDescent

        index = NNDescent(x, metric=self._pynn_metric(), n_neighbors=n_neighbors,
                          random_state=42, n_jobs=self.threads,
                          parallel_batch_queries=self.threads > 1)
        index.prepare()
        return index

    def warmup(self, train, metric):
        # Its numba code compiles on first use; pay that on a toy set, outside the timed build.
        # A few hundred rows leave some build paths uncompiled (measured: 20 s of a first
        # build on 10k vectors was still compilation), a few thousand cover them.
        self.metric = canonical_metric(metric)
        toy = self._prepare(np.asarray(train[: self._WARMUP_ROWS], dtype=np.float32))
        self.n, self.d = len(train), train.shape[1]
        n_neighbors = min(int(self._build_param("n_neighbors")), len(toy) - 1)
        self._build(toy, n_neighbors).query(toy[:5], k=min(10, len(toy)),
                                           pre_normalized=self.metric == "cosine")

    def _fit(self, train):
        self.index = self._build(self._prepare(train), int(self._build_param("n_neighbors")))

    def batch_query(self, queries, k):
        ids, _ = self.index.query(self._prepare(queries), k=k,
                                  epsilon=float(self.search_params.get("epsilon", 0.1)),
                                  pre_normalized=self.metric == "cosine")
        return ids.astype(np.int64, copy=False)

    def index_bytes(self):
        return len(pickle.dumps(self.index, protocol=pickle.HIGHEST_PROTOCOL))


# -- annlib -------------------------------------------------------------------------------------
class AnnlibAdapter(Adapter):
    """One of annlib's families, through ``annlib.Index.build`` and ``index.search``.

    Use :meth:`for_family` to get the adapter class of a family.
    """

    requires = ("annlib",)
    family = ""

    @classmethod
    def for_family(cls, family: str) -> type["AnnlibAdapter"]:
        """The adapter class of the annlib family ``family`` (e.g. ``"hnsw"``)."""
        return type(f"Annlib_{family}", (cls,), {
            "name": family, "family": family, "exact": family == "bruteforce",
            "__doc__": f"annlib family {family!r}.",
        })

    @classmethod
    def default_space(cls, n, d, metric):
        from annlib.api import get_family

        space = get_family(cls.family).search_space(n, d)
        return {"build": space.get("build", {}), "search": space.get("search", {})}

    def search_space(self):
        return self.index.search_space().get("search", {})

    def _build(self, train):
        import annlib

        index = annlib.Index.build(train, method=self.family, metric=self.metric,
                                   threads=self.threads, **self.build_params)
        if hasattr(index, "warmup"):
            index.warmup()  # compile ahead so the timed searches exclude JIT
        return index

    def warmup(self, train, metric):
        # Build once on a slice so JIT compilation is not billed to the timed build. A family
        # whose parameters do not fit so few rows is simply not warmed up.
        self.metric = canonical_metric(metric)
        toy = np.ascontiguousarray(train[: min(len(train), self._WARMUP_ROWS)], dtype=np.float32)
        try:
            self._build(toy).search(toy[:2], min(10, len(toy)), threads=self.threads)
        except Exception:
            pass

    def batch_query(self, queries, k):
        ids, _ = self.index.search(queries, k, threads=self.threads, **self.search_params)
        return np.asarray(ids, dtype=np.int64)

    def query(self, q, k):
        ids, _ = self.index.search(q, k, threads=self.threads, **self.search_params)
        return np.asarray(ids, dtype=np.int64)

    def index_bytes(self):
        # Serialized size, as for the baselines; the in-memory size is recorded separately.
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "index.annlib")
            self.index.save(path)
            return path_bytes(path)

    def memory_bytes(self):
        return int(self.index.memory_bytes())

    #: Recall targets to tune for (set by the runner before ``fit`` under ``--tune``).
    tune_targets: tuple = ()

    def _fit(self, train):
        if not self.tune_targets or self.family == "bruteforce":
            self.index = self._build(train)
            self._tuned = {}
            return
        from .tuned_build import build_and_tune

        # Tuned as Index.build self-tunes (held-out or leave-one-out training vectors); the
        # tuning time is reported per target, the build time here includes it.
        self.index, _, self._tuned = build_and_tune(self.family, train, self.metric, self.tune_targets,
                                                    threads=self.threads, **self.build_params)
        if hasattr(self.index, "warmup"):
            self.index.warmup()

    def tune(self, work, target: float):
        """The parameters tuned for ``target`` at ``fit`` (queries made from the training
        vectors, never the test queries; see ``bench/tuned_build.py``).

        Returns
        -------
        (params, info) or None
            None for a family with nothing to tune or a target not tuned at fit.

        Raises
        ------
        ValueError
            When the target could not be reached (the tuner's message).
        """
        if not self.search_space() or target not in getattr(self, "_tuned", {}):
            return None
        params, info = self._tuned[target]
        if params is None:
            raise ValueError(info["error"])
        return params, info


class AnnlibAuto(AnnlibAdapter):
    """annlib's one-line usage, ``Index.build(X, target_recall=t)``: family chosen and tuned.

    Its build grid is the target recall; each build is one point, searched with the tuned
    defaults (no search grid).
    """

    name = "auto"
    family = "auto"

    @classmethod
    def default_space(cls, n, d, metric):
        return {"build": {"target_recall": [0.9, 0.95, 0.99]}, "search": {}}

    def search_space(self):
        return {}

    def _build(self, train):
        import annlib

        index = annlib.Index.build(train, metric=self.metric, threads=self.threads,
                                   **self.build_params)
        index.warmup()
        return index

    def describe(self):
        label = super().describe()
        index = getattr(self, "index", None)
        return label if index is None else f"{label}→{index.family}"

    def _fit(self, train):
        self.index = self._build(train)

    def tune(self, work, target):
        return None  # already tuned by its build


# -- registry -----------------------------------------------------------------------------------
BASELINES: dict[str, type[Adapter]] = {
    cls.name: cls
    for cls in (FaissFlat, FaissHNSW, FaissIVF, FaissIVFPQFastScan, Hnswlib, Scann, PyNNDescent)
}
_REGISTERED: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Make an extra adapter class available under ``cls.name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError("an adapter class needs a non-empty 'name'")
    _REGISTERED[cls.name] = cls
    return cls


def annlib_families() -> list[str]:
    """Families annlib registers, or an empty list when its core cannot be imported."""
    try:
        import annlib

        return list(annlib.families())
    except Exception:
        return []


def method_names() -> list[str]:
    """Every name ``--methods`` accepts: annlib families, baselines, registered extras."""
    families = annlib_families()
    names = families + (["auto"] if families else []) + list(BASELINES) + list(_REGISTERED)
    return list(dict.fromkeys(names))


def resolve(name: str) -> type[Adapter]:
    """The adapter class for a method name.

    Raises
    ------
    ValueError
        For an unknown name, listing the accepted ones.
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in BASELINES:
        return BASELINES[name]
    if name in annlib_families():
        return AnnlibAdapter.for_family(name)
    if name == "auto" and annlib_families():
        return AnnlibAuto
    raise ValueError(f"unknown method {name!r}; accepted: {', '.join(method_names())}")
