"""ShardedIndex: sharded exact search equals unsharded, approximate recall close to unsharded,
writes checked before any shard changes, save/load round trip, routing. Synthetic data only."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_set

import annlib
from annlib.distributed import SerialExecutor, ShardedIndex, ThreadExecutor


@pytest.fixture(scope="module")
def data():
    X, Q, _, _, _ = synthetic_set(4000, 16, 100, seed=5)
    return X, Q


def recall(ids, true_ids):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, true_ids)]))


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
@pytest.mark.parametrize("executor", [ThreadExecutor(), SerialExecutor()])
def test_sharded_exact_search_equals_unsharded(data, metric, executor):
    X, Q = data
    whole = annlib.Index.build(X, method="bruteforce", metric=metric).search(Q, 10)
    sharded = ShardedIndex("bruteforce", 3, metric=metric, executor=executor).build(X).search(Q, 10)
    assert sharded.ids.shape == (len(Q), 10)
    np.testing.assert_allclose(sharded.distances, whole.distances, rtol=1e-4, atol=1e-4)
    # ids equal where distances are not tied
    assert recall(sharded.ids, whole.ids) >= 0.999


def test_sharded_hnsw_recall_close_to_unsharded(data):
    X, Q = data
    truth = annlib.Index.build(X, method="bruteforce").search(Q, 10).ids
    params = dict(M=12, ef_construction=64, finger=False, default_recall=None)
    whole = annlib.Index.build(X, method="hnsw", **params).search(Q, 10, ef=32).ids
    sharded = ShardedIndex("hnsw", 4, **params).build(X).search(Q, 10, ef=32).ids
    # each shard searches a quarter of the data with the same ef: at least as good
    assert recall(sharded, truth) >= recall(whole, truth) - 0.01


def test_kmeans_partition_routes_to_nearest_shards(data):
    X, Q = data
    truth = annlib.Index.build(X, method="bruteforce").search(Q, 10)
    index = ShardedIndex("bruteforce", 4, partition="kmeans").build(X)
    full = index.search(Q, 10)
    np.testing.assert_allclose(full.distances, truth.distances, rtol=1e-4, atol=1e-4)
    routed = index.search(Q, 10, shards_to_search=2)
    assert recall(routed.ids, truth.ids) >= 0.8  # clustered data: most neighbours share a shard
    with pytest.raises(ValueError, match="partition='kmeans'"):
        ShardedIndex("bruteforce", 2).build(X).search(Q, 10, shards_to_search=1)


def test_ids_filter_add_delete(data):
    X, Q = data
    ids = np.arange(len(X)) * 3 + 7
    index = ShardedIndex("hnsw", 3, M=8, finger=False, default_recall=None).build(X[:3000], ids=ids[:3000])
    assert len(index) == 3000 and sum(index.shard_sizes()) == 3000
    res = index.search(X[5], 1, ef=64)
    assert res.ids.tolist() == [ids[5]] and res.distances[0] <= 1e-4
    allowed = ids[:3000:2]
    got = index.search(Q, 5, filter=allowed, ef=64).ids
    assert np.isin(got[got >= 0], allowed).all()
    index.add(X[3000:], ids=ids[3000:])
    assert len(index) == 4000 and max(index.shard_sizes()) - min(index.shard_sizes()) <= 1
    assert index.search(X[3500], 1, ef=64).ids.tolist() == [ids[3500]]
    with pytest.raises(ValueError, match="already in the index"):
        index.add(X[:2], ids=ids[:2])
    with pytest.raises(ValueError, match="nothing was deleted"):
        index.delete([ids[0], 10**9])
    assert len(index) == 4000
    index.delete(ids[:10])
    assert len(index) == 3990
    assert not np.isin(index.search(X[:10], 3, ef=64).ids, ids[:10]).any()


def test_bad_queries_are_refused_before_the_scatter(data):
    X, Q = data
    calls = []

    class Recording(SerialExecutor):
        def map(self, fn, items):
            calls.append(1)
            return super().map(fn, items)

    index = ShardedIndex("hnsw", 2, executor=Recording(), M=8, finger=False, default_recall=None).build(X)
    calls.clear()
    with pytest.raises(annlib.DimensionMismatchError):
        index.search(Q[:, :5], 10)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((2, 16), np.nan, np.float32), 10)
    with pytest.raises(ValueError):
        index.search(Q, 0)
    with pytest.raises(ValueError, match="unknown"):
        index.search(Q, 10, no_such_param=3)
    assert calls == []
    with pytest.raises(annlib.NotBuiltError):
        ShardedIndex("bruteforce", 2).search(Q, 10)
    with pytest.raises(ValueError, match="at least one vector per shard"):
        ShardedIndex("bruteforce", 5).build(X[:3])


def test_save_load_round_trip(data, tmp_path):
    X, Q = data
    index = ShardedIndex("partitioned", 2, partition="kmeans", default_recall=None).build(X)
    before = index.search(Q, 10, leaves=4, reorder=40)
    index.save(tmp_path / "sharded")
    back = ShardedIndex.load(tmp_path / "sharded")
    after = back.search(Q, 10, leaves=4, reorder=40)
    np.testing.assert_array_equal(after.ids, before.ids)
    assert back.search(Q, 10, shards_to_search=1).ids.shape == (len(Q), 10)
    (tmp_path / "sharded" / "sharded.json").write_text('{"format": 1, "method": "hnsw"}')
    with pytest.raises(annlib.IndexFormatError):
        ShardedIndex.load(tmp_path / "sharded")


def test_a_failed_add_on_one_local_shard_is_undone_on_the_others(data):
    X, Q = data
    from annlib.distributed import ShardUnavailableError

    index = ShardedIndex("hnsw", 3, M=8, finger=False, default_recall=None).build(X[:3000])
    before = index.search(Q, 10, ef=64)
    broken = index.handles[2]
    real_add = broken.index.add

    def failing_add(*args, **kwargs):
        raise MemoryError("no room")

    broken.index.add = failing_add
    with pytest.raises(ShardUnavailableError, match=r"add failed on shard\(s\) \[2\] \(MemoryError: no room\)"):
        index.add(X[3000:3300])
    broken.index.add = real_add
    assert len(index) == 3000  # shards 0 and 1 deleted their part again
    after = index.search(Q, 10, ef=64)
    np.testing.assert_array_equal(after.ids, before.ids)
    assert not np.isin(index.search(X[3000:3300], 1, ef=64).ids, np.arange(3000, 3300)).any()
    index.add(X[3300:3400])  # the undone ids stay taken (an annlib index never reuses one)
    assert len(index) == 3100 and index.search(X[3350], 1, ef=64).ids.min() >= 3300
    flat = ShardedIndex("bruteforce", 2).build(X[:3000])  # a family without delete cannot undo
    flat.handles[1].index.add = failing_add
    with pytest.raises(ShardUnavailableError, match=r"shard\(s\) \[0\] in this process kept their part"):
        flat.add(X[3000:3100])


def test_executor_names_and_allow_partial_locally(data):
    X, Q = data
    assert isinstance(ShardedIndex("bruteforce", 2, executor="serial").executor, SerialExecutor)
    with pytest.raises(ValueError, match="executor must be"):
        ShardedIndex("bruteforce", 2, executor="dask")
    with pytest.raises(ValueError, match="apply to executor='ray' only"):
        ShardedIndex("bruteforce", 2, storage="somewhere")
    res = ShardedIndex("bruteforce", 2).build(X).search(Q, 5, allow_partial=True)
    assert not res.partial and res.missing_shards == () and len(res.shard_seconds) == 2


def test_save_and_load_through_a_storage_uri(data):
    pytest.importorskip("fsspec", reason="storage URIs need fsspec")
    X, Q = data
    index = ShardedIndex("bruteforce", 2).build(X[:1000])
    index.save("memory://annlib-test/sharded")  # fsspec's in-process file system
    back = ShardedIndex.load("memory://annlib-test/sharded")
    np.testing.assert_array_equal(back.search(Q, 5).ids, index.search(Q, 5).ids)
    from annlib.distributed import storage

    storage.remove_tree("memory://annlib-test")
    assert not storage.exists("memory://annlib-test/sharded/sharded.json")
