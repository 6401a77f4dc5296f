"""bench.partitioned_gap: which grid points it times, and a whole run on a tiny synthetic set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from annlib.bench import adapters, measures, partitioned_gap


def test_thin_grid_keeps_every_nth_value_and_the_last():
    grid = {"leaves": [2, 4, 8, 12, 14], "reorder": [40, 50, 60, 70]}
    assert partitioned_gap.thin_grid(grid, 2) == {"leaves": [2, 8, 14], "reorder": [40, 60, 70]}
    assert partitioned_gap.thin_grid(grid, 1) == grid


def test_points_to_time_drops_dearer_points_and_keeps_the_brackets():
    recall = {(2, 40): 0.70, (2, 100): 0.70,  # same recall for more re-ranking: dropped
              (4, 40): 0.82, (4, 100): 0.83,  # below the window: only the dearer one is kept
              (8, 40): 0.92, (8, 100): 0.94,  # inside the window: both kept
              (16, 40): 0.98, (16, 100): 0.99,
              (32, 40): 0.997, (32, 100): 0.999}  # above it: only the cheaper one is kept
    points = [{"leaves": leaves, "reorder": reorder} for leaves, reorder in recall]
    kept = partitioned_gap.points_to_time(points, list(recall.values()), (0.85, 0.995))
    assert [tuple(points[i].values()) for i in kept] == [
        (4, 100), (8, 40), (8, 100), (16, 40), (16, 100), (32, 40)]


@pytest.fixture
def tiny_set(tmp_path):
    """A clustered 1,500 x 16 Euclidean set with 40 queries, as DIR/<name>.hdf5."""
    pytest.importorskip("h5py")
    from annlib.datasets import write_hdf5

    g = np.random.default_rng(5)
    centres = g.normal(size=(12, 16)) * 4
    train = centres[g.integers(0, 12, 1500)] + g.normal(size=(1500, 16))
    test = centres[g.integers(0, 12, 40)] + g.normal(size=(40, 16))
    write_hdf5(tmp_path / "tiny-16-euclidean.hdf5", train, test, "euclidean", k=10)
    return tmp_path, "tiny-16-euclidean"


def test_run_writes_recall_and_timings_per_mode(tiny_set, tmp_path):
    data_dir, name = tiny_set
    methods = ["partitioned"]
    grid = {"partitioned": {"build": {"spill": ["soar"]},
                            "search": {"leaves": [1, 2, 4, 16], "reorder": [20, 60]}}}
    if adapters.FaissIVFPQFastScan.missing() is None:
        methods.append("faiss-ivfpqfs")
        grid["faiss-ivfpqfs"] = {"build": {"nlist_factor": [2]},
                                 "search": {"nprobe": [1, 2, 4, 16], "k_factor": [2, 6]}}
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(grid))
    out = tmp_path / "gap.json"
    cache = tmp_path / "cache"
    argv = [name, "--data-dir", data_dir, "--methods", ",".join(methods), "--config", config,
            "--rounds", "2", "--min-span", "0.002", "--window", "0.5,0.999", "--cache", cache,
            "--out", out]

    partitioned_gap.main(argv)

    doc = json.loads(out.read_text())
    assert doc["dataset"] == {"name": name, "n": 1500, "d": 16, "q": 40, "metric": "l2", "query_seed": 0}
    assert list(doc["methods"]) == methods and doc["rounds"] == 2
    levels = ["0.90", "0.95", "0.99"]
    for mode in ("batch", "single"):
        fig = doc["by_mode"][mode]
        assert set(fig["qps_at"]) == set(methods) and "ratio_to_scann" not in fig  # no ScaNN here
        assert all(list(at) == levels for at in fig["qps_at"].values())
        assert fig["estimated_s"] > 0 and fig["thread_cpu_s"] > 0 and "ratio_to_scann_median_of_rounds" not in fig
        assert len(fig["load_per_round"]) == 2 and len(fig["qps_at_per_round"]) == 2
    for method in methods:
        entry = doc["methods"][method]
        assert len(entry["points"]) == 8
        for point in entry["points"]:
            for mode in ("batch", "single"):
                assert 0.0 <= point[f"recall_{mode}"] <= 1.0
                if f"seconds_{mode}" in point:  # timed: one time per round
                    assert len(point[f"seconds_{mode}"]) == 2 and point[f"qps_{mode}"] > 0
        for mode in ("batch", "single"):
            assert doc["by_mode"][mode]["timed_points"][method] == sum(
                f"seconds_{mode}" in p for p in entry["points"]) > 0

    # the recall written for one point is the recall of that point's search, recomputed here
    # on the cached build
    import annlib
    from annlib.datasets import read_hdf5

    (cached,) = cache.glob("*.annlib")
    index = annlib.load(cached)
    ds = read_hdf5(data_dir / f"{name}.hdf5")
    point = doc["methods"]["partitioned"]["points"][2]
    ids, _ = index.search(ds.test, 10, threads=1, **point["params"])
    direct = measures.recall_at_k(ids, ds.train, ds.test, ds.distances[:, 9], "l2", 10)
    assert point["recall_batch"] == pytest.approx(direct)
