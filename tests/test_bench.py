"""The benchmark harness: recall measure, Pareto reading, grids, adapters, and the CLI end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from annlib.bench import adapters, cli, grids, measures, pareto, report

# -- recall@k -----------------------------------------------------------------------------------


@pytest.fixture
def line():
    """Points 0..19 on the x axis, two extra points near x = 9, and one query at the origin.

    The true 10-NN of the query are ids 0..9 and the true 10th distance is 9.
    """
    x = np.zeros((22, 2), dtype=np.float32)
    x[:20, 0] = np.arange(20)
    x[20] = [9.0005, 0.0]  # within the 1e-3 tie tolerance of the 10th distance
    x[21] = [9.002, 0.0]  # just outside it
    q = np.zeros((1, 2), dtype=np.float32)
    return x, q, np.array([9.0])


def recall(ids, x, q, kth, metric="l2", k=10):
    return measures.recall_at_k(np.array([ids]), x, q, kth, metric, k)


def test_recall_perfect_result_is_one(line):
    assert recall(list(range(10)), *line) == 1.0


def test_recall_one_wrong_id_is_point_nine(line):
    assert recall(list(range(9)) + [15], *line) == pytest.approx(0.9)


def test_recall_counts_ties_within_epsilon(line):
    assert recall(list(range(9)) + [20], *line) == 1.0
    assert recall(list(range(9)) + [21], *line) == pytest.approx(0.9)


def test_recall_padding_is_a_miss(line):
    assert recall(list(range(9)) + [-1], *line) == pytest.approx(0.9)
    # A row shorter than k scores its missing entries as misses too.
    assert recall(list(range(8)), *line) == pytest.approx(0.8)


def test_recall_rejects_duplicate_ids(line):
    with pytest.raises(ValueError, match="unique"):
        recall(list(range(9)) + [3], *line)
    # padding may repeat
    assert recall(list(range(8)) + [-1, -1], *line) == pytest.approx(0.8)


def test_recall_rejects_ids_outside_train(line):
    with pytest.raises(ValueError, match="outside"):
        recall(list(range(9)) + [22], *line)


def test_recall_recomputes_distances_rather_than_trusting_ids(line):
    x, q, kth = line
    # The 10th true distance is 9: a result of ids 1..10 misses id 0 and has id 10 at 10 > 9.
    assert recall(list(range(1, 11)), x, q, kth) == pytest.approx(0.9)


def test_recompute_distances_per_metric():
    x = np.array([[3.0, 4.0], [0.0, 2.0], [-1.0, 0.0]], dtype=np.float32)
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    ids = np.array([[0, 1, 2, -1]])
    l2 = measures.recompute_distances(x, q, ids, "euclidean")[0]
    assert l2[:3] == pytest.approx([math.sqrt(4 + 16), math.sqrt(1 + 4), 2.0])
    assert np.isinf(l2[3])
    cos = measures.recompute_distances(x, q, ids, "angular")[0]
    assert cos[:3] == pytest.approx([1 - 0.6, 1.0, 2.0])
    ip = measures.recompute_distances(x, q, ids, "ip")[0]
    assert ip[:3] == pytest.approx([-3.0, 0.0, 1.0])


def test_true_kth_from_neighbors_matches_distances(line):
    x, q, _ = line
    neighbors = np.array([list(range(10))])
    kth = measures.true_kth_distances(10, neighbors=neighbors, train=x, queries=q, metric="l2")
    assert kth == pytest.approx([9.0])
    with pytest.raises(ValueError, match="k=11"):
        measures.true_kth_distances(11, distances=np.zeros((1, 10)))


def test_best_time_respects_repetitions_and_span():
    calls = []
    best, reps, result = measures.best_time(lambda: calls.append(1) or len(calls),
                                            min_reps=3, min_seconds=0.0)
    assert reps == 3 and result == 3 and best >= 0.0
    _, reps, _ = measures.best_time(lambda: None, min_reps=1, min_seconds=0.02)
    assert reps > 1


# -- Pareto frontier and QPS at recall ------------------------------------------------------------

POINTS = [(0.5, 1000.0), (0.8, 500.0), (0.7, 400.0), (0.95, 100.0), (0.9, 50.0), (0.95, 80.0),
          (0.6, 900.0), (0.4, 950.0), (0.45, 1000.0)]


def test_frontier_drops_dominated_points():
    assert pareto.frontier(POINTS) == [(0.5, 1000.0), (0.6, 900.0), (0.8, 500.0), (0.95, 100.0)]


def test_qps_interpolates_log_linearly_between_bracketing_points():
    front = pareto.frontier(POINTS)
    # 0.9 lies 2/3 of the way from (0.8, 500) to (0.95, 100): 500 * (100/500)^(2/3)
    assert pareto.qps_at_recall(front, 0.9) == pytest.approx(500 * 0.2 ** (2 / 3))
    assert pareto.qps_at_recall(front, 0.9) == pytest.approx(170.998, rel=1e-4)
    assert pareto.qps_at_recall(front, 0.8) == 500.0  # a point exactly at the level
    assert pareto.qps_at_recall(front, 0.3) == 1000.0  # every point reaches it: the best QPS


def test_method_figure_is_the_best_of_its_indexes():
    # M=32's lone point at 0.951 would sit between M=16's bracketing points on a pooled
    # frontier and pull the interpolated 0.95 figure below what M=16 alone reaches.
    def run(label, r, q):
        return {"method": "h", "label": label, "recall": r, "qps_batch": q, "build_s": 1.0,
                "bytes_per_vector": 8.0}

    runs = [run("h16", 0.93, 200e3), run("h16", 0.99, 60e3), run("h32", 0.951, 70e3)]
    table = report.summaries(runs, ("label", "h16"), modes=("batch",))["batch"]
    h16 = table["by_label"]["h16"]["qps_at"]["0.95"]
    assert h16 == pytest.approx(200e3 * 0.3 ** (1 / 3))
    assert table["by_method"]["h"]["qps_at"]["0.95"] == h16
    assert table["by_method"]["h"]["qps_at"]["0.90"] == 200e3
    assert table["by_label"]["h32"]["ratio_at"]["0.95"] == pytest.approx(70e3 / h16)


def test_qps_never_reached_is_none():
    assert pareto.qps_at_recall(pareto.frontier(POINTS), 0.99) is None
    assert pareto.qps_at_recall([], 0.5) is None


def test_summarize_and_ratios_per_mode():
    runs = [{"label": "a", "method": "a", "recall": r, "qps_batch": q, "recall_single": r,
             "qps_single": q / 2} for r, q in POINTS]
    batch = pareto.summarize(runs, "batch")
    single = pareto.summarize(runs, "single")
    assert batch["max_recall"] == 0.95
    assert batch["qps_at"]["0.90"] == pytest.approx(2 * single["qps_at"]["0.90"])
    assert batch["qps_at"]["0.99"] is None
    assert pareto.ratio(batch["qps_at"]["0.90"], single["qps_at"]["0.90"]) == pytest.approx(2.0)
    assert pareto.ratio(None, 3.0) is None


# -- grids ----------------------------------------------------------------------------------------


def test_grid_expansion_order_and_groups():
    assert grids.expand({"a": [1, 2], "b": [3, 4]}) == [
        {"a": 1, "b": 3}, {"a": 1, "b": 4}, {"a": 2, "b": 3}, {"a": 2, "b": 4}]
    assert grids.expand([{"a": 1}, {"b": [5, 6]}]) == [{"a": 1}, {"b": 5}, {"b": 6}]
    assert grids.expand({}) == [{}] and grids.expand(None) == [{}]


def test_grid_file_rejects_unknown_keys(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("hnswlib:\n  query_args: {ef: [10]}\n")
    with pytest.raises(ValueError, match="query_args"):
        grids.load_grids(str(path))
    assert "quick" in grids.packaged_configs()
    loaded, origin = grids.load_grids("quick")
    assert loaded["hnswlib"]["search"]["ef"][0] == 10 and origin.endswith("quick.yml")


# -- baseline adapters ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clustered_set():
    g = np.random.default_rng(3)
    centers = g.normal(size=(10, 16)) * 3
    x = (centers[g.integers(0, 10, 1500)] + g.normal(size=(1500, 16))).astype(np.float32)
    q = (centers[g.integers(0, 10, 30)] + g.normal(size=(30, 16))).astype(np.float32)
    return x, q


def _kth(x, q, metric, k):
    every = measures.recompute_distances(x, q, np.tile(np.arange(len(x)), (len(q), 1)), metric)
    return np.sort(every, axis=1)[:, k - 1]


FAST_BASELINES = ["faiss-flat", "faiss-hnsw", "faiss-ivf", "faiss-ivfpqfs", "hnswlib", "scann"]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("name", FAST_BASELINES)
def test_baseline_adapter_reaches_high_recall(name, metric, clustered_set):
    cls = adapters.resolve(name)
    if cls.missing():
        pytest.skip(cls.missing())
    x, q = clustered_set
    k = 10
    build = grids.expand(cls.default_space(len(x), x.shape[1], metric)["build"])[0]
    adapter = cls(threads=1, **build)
    adapter.fit(x, metric)
    last = grids.expand(adapter.search_space())[-1]  # the most expensive search point
    adapter.set_query_arguments(**last)
    ids = adapter.batch_query(q, k)
    assert ids.shape == (len(q), k) and ids.dtype == np.int64
    kth = _kth(x, q, metric, k)
    assert measures.recall_at_k(ids, x, q, kth, metric, k) >= 0.95
    single = np.stack([adapter.query(v, k) for v in q])
    assert measures.recall_at_k(single, x, q, kth, metric, k) >= 0.95
    assert adapter.index_bytes() >= x.nbytes // 2


def test_unknown_method_lists_accepted_names():
    with pytest.raises(ValueError, match="faiss-flat"):
        adapters.resolve("no-such-method")


# -- end to end -----------------------------------------------------------------------------------


class ToyExact(adapters.Adapter):
    """A stand-in exact index: numpy brute force over the raw vectors (l2 only)."""

    name = "toy-exact"
    exact = True

    def _fit(self, train):
        self.x = train

    def _scan(self, queries, k, rows):
        d = ((queries[:, None, :] - self.x[None, :rows]) ** 2).sum(-1)
        return np.argsort(d, axis=1, kind="stable")[:, :k].astype(np.int64)

    def batch_query(self, queries, k):
        return self._scan(queries, k, len(self.x))

    def index_bytes(self):
        return self.x.nbytes


class ToyPartial(ToyExact):
    """A stand-in approximate index: scans only the first ``fraction`` of the points."""

    name = "toy-partial"
    exact = False

    @classmethod
    def default_space(cls, n, d, metric):
        return {"build": {}, "search": {"fraction": [0.2, 1.0]}}

    def batch_query(self, queries, k):
        rows = max(k, int(self.search_params["fraction"] * len(self.x)))
        return self._scan(queries, k, rows)


class ToyMissing(ToyExact):
    name = "toy-missing"
    requires = ("annlib_bench_test_module_that_does_not_exist",)


@pytest.fixture
def tiny_hdf5(tmp_path):
    from annlib.datasets import write_hdf5

    g = np.random.default_rng(11)
    train = g.normal(size=(400, 8)).astype(np.float32)
    test = g.normal(size=(25, 8)).astype(np.float32)
    return write_hdf5(tmp_path / "tiny-8-euclidean.hdf5", train, test, "euclidean", k=20,
                      attrs={"source": "seeded normal vectors written by the test"})


def test_cli_end_to_end(tiny_hdf5, tmp_path, monkeypatch, capsys):
    for cls in (ToyExact, ToyPartial, ToyMissing):
        monkeypatch.setitem(adapters._REGISTERED, cls.name, cls)
    methods = ["toy-exact", "toy-partial", "toy-missing"]
    exact = {"toy-exact"}
    if adapters.FaissFlat.missing() is None:
        methods.append("faiss-flat")
        exact.add("faiss-flat")
    if "bruteforce" in adapters.annlib_families():
        methods.append("bruteforce")
        exact.add("bruteforce")
    config = tmp_path / "grid.json"
    config.write_text(json.dumps({"toy-partial": {"search": {"fraction": [0.05, 0.5, 1.0]}}}))
    out = tmp_path / "out"
    argv = ["--dataset", str(tiny_hdf5), "--methods", ",".join(methods), "--k", "10",
            "--out", str(out), "--queries", "20", "--config", str(config),
            "--reference", "toy-exact", "--quiet"]

    assert cli.main(argv) == 0

    printed = capsys.readouterr().out
    folder = out / "tiny-8-euclidean"
    doc = json.loads((folder / "results.json").read_text())
    assert doc["command"].startswith("annlib-bench --dataset ")
    assert doc["command"] in printed and "n=400" in printed and "seeded normal vectors" in printed
    assert doc["dataset"]["q"] == 20 and doc["dataset"]["q_total"] == 25
    assert doc["skipped"].keys() == {"toy-missing"} and not doc["failures"]
    assert {r["method"] for r in doc["runs"]} == set(methods) - {"toy-missing"}
    for run in doc["runs"]:
        assert run["threads"] == 1 and run["qps_batch"] > 0 and run["qps_single"] > 0
        if run["method"] in exact:
            assert run["recall"] == 1.0 and run["recall_single"] == 1.0
    partial = sorted((r["search_params"]["fraction"], r["recall"]) for r in doc["runs"]
                     if r["method"] == "toy-partial")
    assert [f for f, _ in partial] == [0.05, 0.5, 1.0]  # the config file replaced the default grid
    assert partial[0][1] < 0.5 and partial[-1][1] == 1.0
    assert set(doc["flops"]) == exact
    assert all(f["gflops"] > 0 and f["fraction"] > 0 for f in doc["flops"].values())
    assert doc["summary"]["batch"]["by_label"]["toy-exact"]["ratio_at"]["0.95"] == 1.0
    assert doc["environment"]["versions"]["numpy"] == np.__version__
    for mode in ("batch", "single"):
        png = (folder / f"pareto-{mode}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "| toy-exact |" in printed and "QPS@0.99" in printed


def test_cli_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--methods", "toy-nothing"])
    assert exc.value.code == 2
    assert "accepted" in capsys.readouterr().err


@pytest.fixture
def clustered_hdf5(tmp_path):
    from annlib.datasets import write_hdf5

    g = np.random.default_rng(12)
    centres = g.normal(size=(20, 8)) * 4
    train = (centres[g.integers(0, 20, 1500)] + g.normal(size=(1500, 8))).astype(np.float32)
    test = (centres[g.integers(0, 20, 60)] + g.normal(size=(60, 8))).astype(np.float32)
    return write_hdf5(tmp_path / "clusters-8-euclidean.hdf5", train, test, "euclidean", k=20,
                      attrs={"source": "seeded clustered vectors written by the test"})


def test_cli_tune_draws_tuned_points_and_runs_auto(clustered_hdf5, tmp_path, capsys):
    config = tmp_path / "grid.json"
    config.write_text(json.dumps({"hnsw": {"build": {"M": [12]}, "search": {"ef": [10, 40, 160]}}}))
    out = tmp_path / "out"
    argv = ["--dataset", str(clustered_hdf5), "--methods", "hnsw,auto", "--tune", "0.9",
            "--config", str(config), "--out", str(out), "--no-single", "--quiet"]

    assert cli.main(argv) == 0

    printed = capsys.readouterr().out
    doc = json.loads((out / "clusters-8-euclidean" / "results.json").read_text())
    assert doc["settings"]["tune"] == [0.9] and not doc["failures"]
    tuned = [r for r in doc["runs"] if r.get("tuned_for") is not None]
    assert [r["method"] for r in tuned] == ["hnsw"]  # auto is tuned by its own build
    assert set(tuned[0]["search_params"]) == {"ef"} and tuned[0]["recall"] >= 0.85
    assert tuned[0]["tune_s"] > 0 and 0.0 < tuned[0]["predicted_recall"] <= 1.0
    auto = [r for r in doc["runs"] if r["method"] == "auto"]
    assert len(auto) == 1 and auto[0]["build_params"] == {"target_recall": 0.9}
    assert "→" in auto[0]["label"] and auto[0]["recall"] >= 0.85
    # the tuned point is judged against the sweep, and kept out of its frontier
    grid_qps = [r["qps_batch"] for r in doc["runs"] if r["method"] == "hnsw" and "tuned_for" not in r]
    assert len(grid_qps) == 3
    assert "**tuned points**" in printed and "| 0.90 | ef=" in printed
    assert (out / "clusters-8-euclidean" / "pareto-batch.png").read_bytes().startswith(b"\x89PNG")


def test_cli_rejects_bad_tune_target(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--tune", "1.5"])
    assert exc.value.code == 2
    assert "recall targets must be numbers in (0, 1]" in capsys.readouterr().err


def test_baseline_table_divides_by_the_fastest_baseline_at_each_level():
    def run(method, recall, q):
        return {"method": method, "label": method, "recall": recall, "qps_batch": q,
                "build_s": 1.0, "bytes_per_vector": 4.0}

    runs = [run("hnsw", 0.90, 2000.0), run("hnsw", 0.95, 1500.0), run("hnsw", 0.99, 1000.0),
            run("hnswlib", 0.90, 1000.0), run("hnswlib", 0.95, 1200.0), run("hnswlib", 0.99, 800.0),
            run("scann", 0.90, 4000.0), run("scann", 0.95, 400.0)]
    doc = {"summary": report.summaries(runs, None, ("batch",))}
    rows = report.baseline_table(doc)
    assert rows[0].startswith("| annlib | ÷ best @0.90")
    assert rows[2] == "| hnsw | 0.50 (scann) | 1.25 (hnswlib) | 1.25 (hnswlib) |"
    assert report.baseline_table({"summary": report.summaries(runs[:2], None, ("batch",))}) == []
