"""annlib.Partitioned: recall against exact ground truth, equivalences, persistence, bad input."""

from __future__ import annotations

import numpy as np
import pytest

import annlib

from conftest import read_shared, threshold_recall, true_distances


@pytest.fixture(scope="module")
def sift():
    X, Q, _, _, _ = read_shared("sift-128-euclidean-10k", n_queries=60)
    return X, Q


def kth_true(X, Q, metric, k=10):
    return np.sort(true_distances(X, Q, metric), axis=1)[:, k - 1]


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_recall_floor_sift(sift, metric):
    X, Q = sift
    index = annlib.Partitioned.build(X, metric=metric, num_leaves=100)
    kth = kth_true(X, Q, metric)
    low = threshold_recall(index.search(Q, 10, leaves=4, reorder=40).ids, X, Q, kth, metric)
    high = threshold_recall(index.search(Q, 10, leaves=20, reorder=200).ids, X, Q, kth, metric)
    assert high >= 0.97
    assert low >= 0.6 and high >= low


@pytest.mark.parametrize("quantizer", ["pq4", "int8"])
def test_all_leaves_and_full_reorder_is_exact(sift, quantizer):
    X, Q = sift
    index = annlib.Partitioned.build(X, metric="l2", num_leaves=30, quantizer=quantizer)
    ids, dist = index.search(Q, 10, leaves=30, reorder=len(X))
    exact = annlib.BruteForce.build(X).search(Q, 10)
    np.testing.assert_allclose(dist, exact.distances, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spill", ["none", "nearest", "soar"])
def test_spill_modes_store_each_point_once_per_leaf(sift, spill):
    X, Q = sift
    index = annlib.Partitioned.build(X[:3000], metric="cosine", num_leaves=40, spill=spill, spills=2,
                                     soar_exclude_primary=True)
    leaf, pos, _ = index._entries()
    pairs = leaf * len(X) + pos
    assert len(np.unique(pairs)) == len(pairs), "a point stored twice in one leaf"
    assert np.array_equal(np.unique(pos), np.arange(3000))
    expected = {"none": 0.0, "nearest": 2.0, "soar": 2.0}[spill]
    assert index.stats()["spill_fraction"] == pytest.approx(expected)
    ids = index.search(Q, 10, leaves=8).ids
    for row in ids:
        assert len(set(row.tolist())) == 10  # spilled copies de-duplicated


def test_soar_beats_no_spill_at_equal_leaves(sift):
    X, Q = sift
    kth = kth_true(X, Q, "cosine")
    rec = {}
    for spill in ("none", "soar"):
        index = annlib.Partitioned.build(X, metric="cosine", num_leaves=100, spill=spill)
        rec[spill] = threshold_recall(index.search(Q, 10, leaves=3, reorder=100).ids, X, Q, kth, "cosine")
    assert rec["soar"] > rec["none"]


def test_anisotropic_option_and_plain(sift):
    X, Q = sift
    kth = kth_true(X, Q, "cosine")
    for t in (None, 0.2):
        index = annlib.Partitioned.build(X, metric="cosine", num_leaves=50, anisotropic_threshold=t)
        assert threshold_recall(index.search(Q, 10, leaves=10, reorder=100).ids, X, Q, kth, "cosine") >= 0.95


def test_single_and_batch_queries_agree(sift):
    X, Q = sift
    index = annlib.Partitioned.build(X, metric="l2", num_leaves=60)
    batch = index.search(Q[:20], 10, leaves=5)
    single = np.stack([index.search(q, 10, leaves=5).ids for q in Q[:20]])
    np.testing.assert_array_equal(batch.ids, single)
    par = index.search(Q[:20], 10, leaves=5, threads=2)
    np.testing.assert_array_equal(batch.ids, par.ids)


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_and_add(sift, tmp_path, mmap):
    X, Q = sift
    index = annlib.Partitioned.build(X[:8000], metric="l2", num_leaves=60)
    index.add(X[8000:])
    assert len(index) == len(X)
    kth = kth_true(X, Q, "l2")
    res = index.search(Q, 10, leaves=12, reorder=100)
    assert threshold_recall(res.ids, X, Q, kth, "l2") >= 0.95
    path = tmp_path / "p.annlib"
    index.save(path)
    loaded = annlib.load(path, mmap=mmap)
    again = loaded.search(Q, 10, leaves=12, reorder=100)
    np.testing.assert_array_equal(res.ids, again.ids)
    np.testing.assert_array_equal(res.distances, again.distances)
    loaded.add(X[:5] + 1.0)  # adding to a memory-mapped index copies
    assert len(loaded) == len(X) + 5


def test_identical_seeds_identical_index(sift):
    X, Q = sift
    a = annlib.Partitioned.build(X, num_leaves=40, random_state=5)
    b = annlib.Partitioned.build(X, num_leaves=40, random_state=5)
    for name, arr in a._state()[1].items():
        np.testing.assert_array_equal(arr, b._state()[1][name], err_msg=name)


def test_restrictive_filter_is_exact(sift):
    X, Q = sift
    index = annlib.Partitioned.build(X, num_leaves=50)
    allowed = np.arange(0, len(X), 97)
    ids, dist = index.search(Q, 10, leaves=1, filter=allowed)
    exact = annlib.BruteForce.build(X).search(Q, 10, filter=allowed)
    np.testing.assert_array_equal(ids, exact.ids)


def test_stats_bytes(sift):
    X, _ = sift
    index = annlib.Partitioned.build(X, num_leaves=50, spill="none")
    s = index.stats()
    assert s["bytes_per_vector"] - s["bytes_per_vector_without_reorder"] == pytest.approx(4 * X.shape[1])
    assert s["bytes_per_vector_without_reorder"] < 60  # 32 code bytes + position + norm term + padding


BAD_BUILD = [
    (dict(num_leaves=0), ValueError, "num_leaves must be >= 1; got 0"),
    (dict(num_leaves=20_000), ValueError, r"num_leaves=20000 is larger than the number of vectors \(10000\)"),
    (dict(num_leaves=2.5), TypeError, "num_leaves must be an integer"),
    (dict(spill="all"), ValueError, "unknown spill 'all'; accepted: soar, nearest, none"),
    (dict(soar_lambda=-1.0), ValueError, r"soar_lambda must be in \[0.0, inf\); got -1.0"),
    (dict(spills=0), ValueError, r"spills must be in \[1, 4\]; got 0"),
    (dict(soar_exclude_primary="yes"), TypeError, "soar_exclude_primary must be True or False"),
    (dict(quantizer="pq8"), ValueError, "unknown quantizer 'pq8'; accepted: pq4, int8"),
    (dict(dims_per_block=0), ValueError, r"dims_per_block must be in \[1, 8\]; got 0"),
    (dict(anisotropic_threshold=1.5), ValueError, "anisotropic_threshold must be in"),
    (dict(training_sample=0), ValueError, "training_sample must be >= 1"),
    (dict(kmeans_iters=0), ValueError, "kmeans_iters must be in"),
    (dict(random_state=-3), ValueError, "random_state must be a non-negative integer seed"),
    (dict(random_state=np.random.default_rng(0)), TypeError, "random_state of Partitioned must be an int"),
]


@pytest.mark.parametrize("params, exc, match", BAD_BUILD, ids=[str(b[0]) for b in BAD_BUILD])
def test_bad_build_parameters(sift, params, exc, match):
    X, _ = sift
    with pytest.raises(exc, match=match):
        annlib.Partitioned.build(X, **params)


def test_bad_search_parameters_leave_index_unchanged(sift):
    X, Q = sift
    index = annlib.Partitioned.build(X, num_leaves=30)
    before = index.search(Q, 5, leaves=3)
    for params, match in ((dict(leaves=0), "leaves must be >= 1; got 0"),
                          (dict(reorder=0), "reorder must be >= 1; got 0"),
                          (dict(reorder=-5), "reorder must be >= 1"),
                          (dict(nprobe=3), r"unknown parameter\(s\) nprobe")):
        with pytest.raises(ValueError, match=match):
            index.search(Q, 5, **params)
    with pytest.raises(TypeError, match="leaves must be an integer"):
        index.search(Q, 5, leaves=2.0)
    with pytest.raises(ValueError, match="first bad row is 1"):
        index.add(np.vstack([X[:1], np.full((1, X.shape[1]), np.nan)]))
    assert len(index) == len(X)
    after = index.search(Q, 5, leaves=3)
    np.testing.assert_array_equal(before.ids, after.ids)


def test_search_space(sift):
    X, _ = sift
    space = annlib.Partitioned.build(X, num_leaves=30).search_space()
    assert set(space["search"]) == {"leaves", "reorder"}
    assert max(space["search"]["leaves"]) <= 200  # clipped to the default 2 sqrt(n) leaves
    assert annlib.Partitioned.search_space(n=40_000, dim=50)["build"] == {"num_leaves": [400]}
