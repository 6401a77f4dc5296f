"""The ann-benchmarks module (bench/annbench): driven the way the harness drives it, recall
against brute force, every config.yml entry built and run, the BaseANN import and its fallback,
and the packaging of the folder."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import resource
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from annlib.bench.annbench import fallback_base, module
from annlib.bench.annbench.module import AnnlibHNSW, AnnlibPartitioned

yaml = pytest.importorskip("yaml")
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

FOLDER = Path(module.__file__).resolve().parent
REPO = FOLDER.parents[1]
HARNESS_MODULE = "ann_benchmarks.algorithms.annlib"


def clustered(n, d=16, seed=0):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(12, d)) * 3
    return (centres[g.integers(0, 12, n)] + g.normal(size=(n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    X = clustered(2100)
    return X[:2000], X[2000:]


def harness_distance(metric, a, b):
    """The harness' own definitions of its two float metrics (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if metric == "euclidean":
        return np.linalg.norm(a - b, axis=-1)
    return 1 - (b @ a) / (np.linalg.norm(a) * np.linalg.norm(b, axis=-1))


def true_neighbours(metric, train, test, k):
    return np.stack([np.argsort(harness_distance(metric, q, train), kind="stable")[:k] for q in test])


def drive(algo, train, test, count, query_args, batch):
    """What the harness' runner does with one definition: memory around fit, query settings,
    queries one at a time or as a batch, duplicate check, name, done. Returns the id lists."""
    before = algo.get_memory_usage()
    algo.fit(train)
    index_kb = algo.get_memory_usage() - before
    # a difference of resident sizes, as the harness takes it: it can be negative, because a build
    # hands the freed heap pages of everything before it back to the OS
    assert np.isfinite(index_kb)
    assert algo.get_additional()["annlib_index_kb"] > 0
    if query_args:
        algo.set_query_arguments(*query_args)
    if batch:
        algo.batch_query(test, count)
        results = list(algo.get_batch_results())
    else:
        results = [algo.query(q, count) for q in test]
    assert len(results) == len(test)
    for ids in results:
        ids = [int(i) for i in ids]  # the harness converts each id with int() and indexes train
        assert len(ids) == len(set(ids)) and len(ids) <= count
        assert all(0 <= i < len(train) for i in ids)
    assert str(algo) and isinstance(str(algo), str)
    assert isinstance(algo.get_additional(), dict)
    algo.done()
    return results


def recall(results, truth):
    return np.mean([len(set(map(int, r)) & set(t.tolist())) / truth.shape[1] for r, t in zip(results, truth)])


# -- both classes, both metrics, recall against brute force --------------------------------------

CASES = [
    (AnnlibHNSW, (16, 100, True), (200,)),
    (AnnlibHNSW, (16, 100, False), (200,)),
    (AnnlibHNSW, (16, 100, False, "float"), (200,)),
    (AnnlibPartitioned, ("2*sqrt(n)",), (64, 250)),
    (AnnlibPartitioned, (40,), (40, 250)),
]


@pytest.mark.parametrize("metric", ["euclidean", "angular"])
@pytest.mark.parametrize("cls, args, query_args", CASES)
@pytest.mark.parametrize("batch", [False, True])
def test_recall_against_brute_force(data, metric, cls, args, query_args, batch):
    train, test = data
    results = drive(cls(metric, *args), train, test, 10, query_args, batch)
    assert recall(results, true_neighbours(metric, train, test, 10)) >= 0.95


def test_cheap_query_arguments_cost_recall(data):
    """The query arguments reach the search: the cheapest setting finds fewer neighbours."""
    train, test = data
    truth = true_neighbours("euclidean", train, test, 10)
    cheap = recall(drive(AnnlibPartitioned("euclidean", 40), train, test, 10, (1, 10), True), truth)
    dear = recall(drive(AnnlibPartitioned("euclidean", 40), train, test, 10, (40, 250), True), truth)
    assert cheap < dear


def test_names_carry_build_and_query_arguments():
    algo = AnnlibHNSW("angular", 16, 200, False)
    assert str(algo) == "annlib-hnsw(M=16,efC=200,finger=0,walk=auto)"
    algo.set_query_arguments(40)
    assert str(algo) == "annlib-hnsw(M=16,efC=200,finger=0,walk=auto,ef=40)"
    part = AnnlibPartitioned("euclidean", "2 * sqrt(n)")
    part.set_query_arguments(8, 100)
    assert str(part) == "annlib-partitioned(leaves=2*sqrt(n),probe=8,reorder=100)"


def test_hnsw_arguments_reach_the_walk_built():
    train = clustered(400, seed=3)
    for args, walk, finger in (((16, 100, False), "sq8", False), ((16, 100, False, "float"), "float", False),
                               ((16, 100, True), "float", True)):
        algo = AnnlibHNSW("euclidean", *args)
        algo.fit(train)
        assert (algo.index.walk_built, algo.index.params["finger"]) == (walk, finger), args


def test_leaf_count_forms():
    assert AnnlibPartitioned("euclidean", "2*sqrt(n)").leaf_count(10_000) == 200
    assert AnnlibPartitioned("euclidean", "0.5 * sqrt(n)").leaf_count(3) == 1
    assert AnnlibPartitioned("euclidean", 500).leaf_count(10_000) == 500
    assert AnnlibPartitioned("euclidean", 500).leaf_count(100) == 100  # never more leaves than points


def test_more_neighbours_than_points_and_errors():
    train = clustered(30)
    algo = AnnlibHNSW("euclidean", 8, 50)
    algo.fit(train)
    algo.set_query_arguments(10)
    assert sorted(map(int, algo.query(train[0], 100))) == list(range(30))
    with pytest.raises(ValueError, match="annlib serves the ann-benchmarks metrics euclidean, angular; got 'hamming'"):
        AnnlibHNSW("hamming")
    with pytest.raises(ValueError, match="num_leaves must be an int >= 1 or a string like '2\\*sqrt\\(n\\)'"):
        AnnlibPartitioned("euclidean", "sqrt(n)")
    with pytest.raises(ValueError, match="num_leaves must be >= 1; got 0"):
        AnnlibPartitioned("euclidean", 0)
    with pytest.raises(ValueError, match="M must be in"):
        AnnlibHNSW("euclidean", 1).fit(train)


def test_memory_usage_is_kilobytes():
    usage = AnnlibHNSW("euclidean").get_memory_usage()
    assert isinstance(usage, float)
    # a Python process with numpy holds tens of MB; RSS now is at most the peak RSS (kB on Linux)
    assert 10_000 < usage < 1e9
    if sys.platform.startswith("linux"):
        assert usage <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1.01


# -- BaseANN: the harness' class when it is there, the fallback otherwise -----------------------


def test_fallback_base_outside_the_harness():
    if importlib.util.find_spec("ann_benchmarks") is not None:
        pytest.skip("ann-benchmarks is installed here")
    assert module.BaseANN is fallback_base.BaseANN
    base = fallback_base.BaseANN()
    base.batch_query(np.zeros((3, 2)), 5)
    assert base.get_batch_results() == [[], [], []] and base.get_additional() == {}


def test_harness_base_class_is_used_when_present(monkeypatch):
    class HarnessBaseANN:
        def get_memory_usage(self):
            return 123.0

    names = ["ann_benchmarks", "ann_benchmarks.algorithms", "ann_benchmarks.algorithms.base",
             "ann_benchmarks.algorithms.base.module"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].BaseANN = HarnessBaseANN
    reloaded = importlib.reload(module)
    try:
        assert issubclass(reloaded.AnnlibHNSW, HarnessBaseANN)
        assert reloaded.AnnlibPartitioned("angular").get_memory_usage() == 123.0
    finally:
        monkeypatch.undo()
        importlib.reload(module)
    assert module.BaseANN is not HarnessBaseANN


# -- config.yml: every entry, as the harness expands it ------------------------------------------


def products(spec):
    """The harness' expansion of ``args``/``query_args``: a list is the product of its
    elements (a scalar counts as a one-value list), a dict the product of its values."""
    if isinstance(spec, dict):
        keys = list(spec)
        values = [v if isinstance(v, list) else [v] for v in spec.values()]
        return [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    return [list(combo) for combo in itertools.product(*[v if isinstance(v, list) else [v] for v in spec])]


def definitions(metric):
    config = yaml.safe_load((FOLDER / "config.yml").read_text())
    for entry in config["float"]["any"]:
        for group_name, group in entry["run_groups"].items():
            query_args = products(group["query_args"]) if "query_args" in group else [[]]
            for args in products(group["args"]):
                base = [metric if a == "@metric" else a for a in entry["base_args"]]
                full = base + (args if isinstance(args, list) else [args])
                yield entry, group_name, full, query_args


def test_config_declares_what_the_harness_requires():
    config = yaml.safe_load((FOLDER / "config.yml").read_text())
    entries = config["float"]["any"]
    assert sorted(e["name"] for e in entries) == ["annlib-hnsw", "annlib-partitioned"]
    for entry in entries:
        # install.py tags the image of folder annlib as ann-benchmarks-annlib
        assert entry["docker_tag"] == "ann-benchmarks-annlib"
        assert entry["module"] == HARNESS_MODULE
        assert entry["base_args"] == ["@metric"] and entry["disabled"] is False
        assert hasattr(module, entry["constructor"])
        assert entry["run_groups"]


@pytest.mark.parametrize("metric", ["euclidean", "angular"])
def test_every_config_entry_builds_and_runs_once(metric):
    train, test = clustered(300, seed=1), clustered(5, seed=2)
    seen = 0
    for entry, group, args, query_args in definitions(metric):
        constructor = getattr(module, entry["constructor"])
        algo = constructor(*args)
        algo.fit(train)
        for qargs in query_args:
            algo.set_query_arguments(*qargs)
            algo.batch_query(test, 10)
            got = algo.get_batch_results()
            assert all(len(ids) == 10 for ids in got), (group, args, qargs)
            assert len(algo.query(test[0], 10)) == 10
        algo.done()
        seen += 1
    assert seen == 7  # HNSW: 2 groups x finger on/off, the plain float walk; Partitioned: 2 groups


# -- the files a user copies, and the packaging ----------------------------------------------------


def test_folder_has_the_harness_files():
    dockerfile = (FOLDER / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    assert instructions[0] == "FROM ann-benchmarks"  # the harness' base image
    assert "COPY annlib-src annlib-src" in dockerfile and "pip install ./annlib-src" in dockerfile
    readme = (FOLDER / "README.md").read_text()
    assert "python run.py --algorithm annlib-hnsw --dataset glove-100-angular" in readme
    assert "ann_benchmarks/algorithms/annlib" in readme


def test_packaging_ships_the_module_and_its_files():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert "annlib.bench.annbench" in setuptools["packages"]
    assert setuptools["package-dir"]["annlib.bench"] == "bench"
    shipped = setuptools["package-data"]["annlib.bench.annbench"]
    for name in ("config.yml", "Dockerfile", "README.md"):
        assert name in shipped and (FOLDER / name).is_file()
    # the Dockerfile installs annlib from its source (not editable): every package it imports
    # must be listed, or `import annlib` fails in the image
    folders = {"annlib": REPO / "annlib", **{name: REPO / folder for name, folder in setuptools["package-dir"].items()}}
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            package = ".".join([name, *init.parent.relative_to(folder).parts])
            assert package in setuptools["packages"], f"{package} is not packaged"
