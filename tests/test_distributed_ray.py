"""ShardedIndex on the Ray executor: one actor per shard, on a local Ray started here (num_cpus=2)
and shut down after. Sharded exact search equals unsharded, HNSW and Partitioned recall within
0.01 of unsharded, save/load round trip, an actor killed in the middle of a stream of searches is
restarted with no lost or wrong result, allow_partial, and writes that reach every shard or none.
Synthetic data only; the module keeps to a few indexes so it runs in well under a minute."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from conftest import synthetic_set

ray = pytest.importorskip("ray", reason="Ray cannot be imported here (pip install 'annlib[distributed]')")

import annlib  # noqa: E402
from annlib.distributed import RayExecutor, ShardedIndex, ShardUnavailableError  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def data():
    X, Q, _, _, _ = synthetic_set(3000, 16, 100, seed=7)
    return X, Q


def recall(ids, true_ids):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, true_ids)]))


@pytest.fixture(scope="module")
def exact(data):
    """One exact sharded index for the fault tests (they leave it whole for the next)."""
    X, _ = data
    index = ShardedIndex("bruteforce", 2, executor="ray").build(X)
    yield index
    index.close()


def test_sharded_exact_search_equals_unsharded(data, exact):
    X, Q = data
    whole = annlib.Index.build(X, method="bruteforce").search(Q, 10)
    got = exact.search(Q, 10)
    assert isinstance(exact.executor, RayExecutor) and len(exact) == len(X)
    assert got.ids.shape == (len(Q), 10) and not got.partial
    np.testing.assert_allclose(got.distances, whole.distances, rtol=1e-4, atol=1e-4)
    assert recall(got.ids, whole.ids) >= 0.999  # ids equal where distances are not tied
    one = exact.search(Q[3], 5)
    assert one.ids.shape == (5,) and one.ids[0] == whole.ids[3, 0]
    with pytest.raises(ValueError, match="unknown"):  # refused before the scatter, message as raised
        exact.search(Q, 10, no_such_param=1)


def test_kill_an_actor_in_a_stream_of_searches(data, exact):
    X, Q = data
    expected = annlib.Index.build(X, method="bruteforce").search(Q, 10)
    victim = exact.handles[1]
    before_pid, restarts = ray.get(victim.actor.pid.remote()), victim.restarts
    reached = threading.Event()

    def kill_when_reached():
        reached.wait(30)
        ray.kill(victim.actor)

    killer = threading.Thread(target=kill_when_reached)
    killer.start()
    results = []
    for i in range(30):
        if i == 8:
            reached.set()
        results.append(exact.search(Q, 10))
    killer.join()
    for got in results:  # every search answered, by both shards, correctly
        assert not got.partial
        np.testing.assert_allclose(got.distances, expected.distances, rtol=1e-4, atol=1e-4)
        assert recall(got.ids, expected.ids) >= 0.999
    assert victim.restarts == restarts + 1 and victim.last_recovery_seconds > 0
    assert ray.get(victim.actor.pid.remote()) != before_pid


def test_add_after_a_kill_is_retried_on_the_restarted_shard(data, exact):
    X, _ = data
    rng = np.random.default_rng(1)
    extra = rng.normal(size=(40, 16)).astype(np.float32) * 3
    ids = np.arange(10_000, 10_040)
    ray.kill(exact.handles[1].actor)
    exact.add(extra, ids=ids)
    assert len(exact) == len(X) + 40 and sum(exact.shard_sizes()) == len(X) + 40
    got = exact.search(extra, 1)
    assert got.ids[:, 0].tolist() == ids.tolist() and exact.handles[1].holds(ids).any()
    # a restart replays the committed batch: the shard keeps it
    ray.kill(exact.handles[1].actor)
    assert exact.search(extra, 1).ids[:, 0].tolist() == ids.tolist()


def _hide(handle):
    """Kill a shard's actor and move its artefact away, so a restart fails; returns the undo."""
    os.replace(handle.base, handle.base + ".away")
    ray.kill(handle.actor)
    return lambda: os.replace(handle.base + ".away", handle.base)


def test_a_shard_that_cannot_restart_raises_or_is_reported_partial(data, exact):
    X, Q = data
    full = exact.search(Q, 10)
    kept = exact.handles[0].holds(np.arange(100_000))
    want = exact.search(Q, 10, filter=np.flatnonzero(kept))  # shard 0's vectors only
    restore = _hide(exact.handles[1])
    try:
        with pytest.raises(ShardUnavailableError, match="shard 1 is unavailable"):
            exact.search(Q, 10)
        part = exact.search(Q, 10, allow_partial=True)
        assert part.partial and part.missing_shards == (1,)
        np.testing.assert_array_equal(part.ids, want.ids)  # the best of shard 0 alone
        np.testing.assert_allclose(part.distances, want.distances, rtol=1e-5, atol=1e-5)
    finally:
        restore()
    again = exact.search(Q, 10)  # the next call restarts the shard from the artefact
    assert not again.partial
    np.testing.assert_allclose(again.distances, full.distances, rtol=1e-4, atol=1e-4)


def test_a_failed_add_leaves_every_shard_as_it_was(data, exact):
    X, Q = data
    n, sizes = len(exact), exact.shard_sizes()
    before = exact.search(Q, 10)
    new = np.random.default_rng(2).normal(size=(30, 16)).astype(np.float32)
    ids = np.arange(20_000, 20_030)
    restore = _hide(exact.handles[1])
    try:
        with pytest.raises(ShardUnavailableError, match=r"add failed on shard\(s\) \[1\]"):
            exact.add(new, ids=ids)
        assert not exact.handles[0].holds(ids).any()  # shard 0 was returned to its state
    finally:
        restore()
    assert len(exact) == n and exact.shard_sizes() == sizes
    after = exact.search(Q, 10)
    np.testing.assert_allclose(after.distances, before.distances, rtol=1e-4, atol=1e-4)
    exact.add(new, ids=ids)  # the ids were not taken: the same batch goes in now
    assert exact.search(new, 1).ids[:, 0].tolist() == ids.tolist()


def test_partitioned_recall_close_to_unsharded(data):
    X, Q = data
    truth = annlib.Index.build(X, method="bruteforce").search(Q, 10).ids
    params, search = dict(default_recall=None), dict(leaves=4, reorder=40)
    whole = annlib.Index.build(X, method="partitioned", **params).search(Q, 10, **search).ids
    with ShardedIndex("partitioned", 2, executor="ray", **params).build(X) as index:
        got = index.search(Q, 10, **search)
        assert recall(got.ids, truth) >= recall(whole, truth) - 0.01


def test_hnsw_recall_close_to_unsharded_and_save_load(data, tmp_path):
    X, Q = data
    truth = annlib.Index.build(X, method="bruteforce").search(Q, 10).ids
    params, search = dict(M=12, ef_construction=64, finger=False, default_recall=None), dict(ef=32)
    whole = annlib.Index.build(X, method="hnsw", **params).search(Q, 10, **search).ids
    with ShardedIndex("hnsw", 2, executor="ray", partition="kmeans", **params).build(X) as index:
        got = index.search(Q, 10, **search)
        assert recall(got.ids, truth) >= recall(whole, truth) - 0.01
        routed = index.search(Q, 10, shards_to_search=1, **search)  # each query to one actor
        assert recall(routed.ids, truth) >= 0.8  # clustered data: most neighbours share a shard
        index.save(tmp_path / "sharded")
    local = ShardedIndex.load(tmp_path / "sharded")  # the same files, shards in this process
    np.testing.assert_array_equal(local.search(Q, 10, **search).ids, got.ids)
    with ShardedIndex.load(tmp_path / "sharded", executor=RayExecutor(mmap=True)) as back:  # actors map the files
        again = back.search(Q, 10, **search)
        np.testing.assert_array_equal(again.ids, got.ids)
        np.testing.assert_allclose(again.distances, got.distances, rtol=1e-5, atol=1e-5)
        extra = X[:5] + 100.0
        back.add(extra, ids=np.arange(50_000, 50_005))
        assert back.search(extra, 1, **search).ids[:, 0].tolist() == list(range(50_000, 50_005))
