"""TPU-KNN (docs/tpuknn.md): the bin rule, the bin-wise reduction, recall, exactness, sharding."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import annlib

pytest.importorskip("jax")

from annlib.accel import tpuknn as accel  # noqa: E402
from annlib.accel.binning import expected_recall, num_bins, reduction_output_size  # noqa: E402
from annlib.accel.sharding import DeviceDatabase  # noqa: E402

from conftest import read_shared, synthetic_set, threshold_recall  # noqa: E402

TARGETS = [0.8, 0.9, 0.95, 0.99]


def gaussian(n, d, q, seed=0):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, d)).astype(np.float32), g.normal(size=(q, d)).astype(np.float32)


def reference_bins(X, Q, k, bins):
    """The bin-wise reduction in float64 numpy: bin j mod L, best of each bin, top-k of the winners."""
    t = 0.5 * (X.astype(np.float64) ** 2).sum(1)
    s = t[None] - Q.astype(np.float64) @ X.T.astype(np.float64)
    pad = (-X.shape[0]) % bins
    s = np.concatenate([s, np.full((len(Q), pad), np.inf)], 1).reshape(len(Q), -1, bins)
    winner, value = s.argmin(1), s.min(1)
    top = np.argsort(value, 1, kind="stable")[:, :k]
    return np.take_along_axis(winner, top, 1) * bins + top


# ----------------------------------------------------------------------------- the bin rule
def test_bin_rule_worked_examples():
    # XLA's sizing for k = 10 / 64 at targets 0.90 / 0.95, and the rule's corner cases.
    assert reduction_output_size(4096, 10, 0.95) == (256, 4)
    assert reduction_output_size(4096, 64, 0.95) == (2048, 1)
    assert reduction_output_size(8192, 10, 0.90) == (128, 6)
    assert reduction_output_size(100_000, 10, 1.0) == (100_000, 0)  # exact
    assert reduction_output_size(128, 10, 0.5) == (128, 0)  # no larger than one tile
    assert reduction_output_size(1000, 1, 0.95) == (128, 3)  # k = 1: one bin per lane
    assert reduction_output_size(1024, 10, 0.95, input_size_override=4096) == (128, 3)
    assert num_bins(100_000, 1000, 0.1) == 1000  # raised to k: each result needs its own bin
    with pytest.raises(ValueError, match="recall_target"):
        reduction_output_size(4096, 10, 0.0)


def test_bin_rule_equals_xla():
    """Our rule returns XLA's (L, log2 reduction) for a grid of (N, K, r, rank, override)."""
    try:
        from jax._src.lib import _jax
        xla = _jax.approx_top_k_reduction_output_size
    except (ImportError, AttributeError):
        pytest.skip("this jaxlib does not expose approx_top_k_reduction_output_size")
    sizes = [129, 200, 257, 1000, 1025, 4097, 10_000, 65_536, 100_000, 1_000_000]
    grid = itertools.product(sizes, [1, 2, 10, 100, 129], [0.1, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0], [1, 2])
    for n, k, r, rank in grid:
        for override in (-1, n, 4 * n):
            ours = reduction_output_size(n, k, r, rank=rank, input_size_override=override)
            assert ours == tuple(xla(n, rank, k, r, False, override)), (n, k, r, rank, override)


def test_expected_recall_formula():
    assert expected_recall(256, 10) == pytest.approx(0.9826, abs=1e-4)  # (L/K)(1 - (1 - 1/L)^K)
    assert expected_recall(1, 1) == 1.0
    for r in TARGETS:  # the rule is conservative: the expectation always meets the target
        for n in (10_000, 200_000):
            assert expected_recall(num_bins(n, 10, r), 10) >= r


# ----------------------------------------------------------------------------- the reduction
@pytest.mark.parametrize("n, k, r, block", [
    (10_000, 10, 0.95, 1024),  # L = 384 does not divide the block: bins rotate per block
    (10_000, 10, 0.99, 1024),  # L = 1280 > block
    (7_000, 20, 0.99, 256),
    (5_000, 10, 0.9, 1024),  # L = 256 divides the block
])
def test_bins_equal_numpy_reference(n, k, r, block):
    X, Q = gaussian(n, 8, 37, seed=n)
    db = DeviceDatabase(X, 0.5 * (X ** 2).sum(1), block=block)
    _, rows = accel.search(db, Q, k, r)
    np.testing.assert_array_equal(rows, reference_bins(X, Q, k, num_bins(n, k, r)))


def test_index_uses_the_rule_for_its_bins():
    """The index's result set is the reference's with L = num_bins(n, k, r)."""
    X, Q = gaussian(6_000, 12, 20, seed=3)
    index = annlib.TPUKNN.build(X)
    for r in (0.8, 0.99):
        ids, _ = index.search(Q, 10, recall_target=r)
        expect = reference_bins(X, Q, 10, num_bins(len(X), 10, r))
        np.testing.assert_array_equal(np.sort(ids, 1), np.sort(expect, 1))


def test_random_scores_mean_recall_meets_target():
    """The guarantee is an average: i.i.d. data, 300 queries, mean recall >= target (not the minimum)."""
    X, Q = gaussian(20_000, 16, 300, seed=5)
    truth = annlib.BruteForce.build(X).search(Q, 10).ids
    index = annlib.TPUKNN.build(X)
    for r in TARGETS:
        ids = index.search(Q, 10, recall_target=r).ids
        hits = [len(set(a) & set(b)) for a, b in zip(ids, truth)]
        assert np.mean(hits) / 10 >= r


# ----------------------------------------------------------------------------- recall
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_recall_meets_target_on_a_clustered_set(metric):
    """Clustered synthetic data (neighbours come in runs of one cluster, not i.i.d.)."""
    train, test, _, dist, metric = synthetic_set(n=12_000, d=48, n_queries=100, metric=metric, k=10, seed=8)
    index = annlib.TPUKNN.build(train, metric=metric)
    for r in TARGETS:
        ids, _ = index.search(test, 10, recall_target=r)
        assert threshold_recall(ids, train, test, dist[:, 9], metric) >= r - 0.01, r


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["sift-128-euclidean-10k", "mnist-784-euclidean-10k"])
def test_recall_meets_target_on_shared_sets(name):
    train, test, _, dist, metric = read_shared(name, n_queries=100)
    index = annlib.TPUKNN.build(train, metric=metric)
    for r in TARGETS:
        ids, _ = index.search(test, 10, recall_target=r)
        assert threshold_recall(ids, train, test, dist[:, 9], metric) >= r - 0.01, r


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["glove-50-angular-200k", "wordnet-minilm-384-angular"])
def test_recall_meets_target_on_large_shared_sets(name):
    train, test, _, dist, metric = read_shared(name, n_queries=100)
    index = annlib.TPUKNN.build(train, metric=metric)
    for r in TARGETS:
        ids, _ = index.search(test, 10, recall_target=r)
        assert threshold_recall(ids, train, test, dist[:, 9], metric) >= r - 0.01, r


def test_bfloat16_recall_and_float32_distances():
    train, test, _, dist, metric = synthetic_set(n=10_000, d=64, n_queries=100, k=10, seed=9)
    index = annlib.TPUKNN.build(train, metric=metric, dtype="bfloat16")
    ids, d = index.search(test, 10, recall_target=0.95)
    assert threshold_recall(ids, train, test, dist[:, 9], metric) >= 0.94
    exact = np.linalg.norm(test[:, None, :] - train[ids], axis=2)  # re-scored in float32
    np.testing.assert_allclose(d, exact, rtol=1e-5, atol=1e-3)


@pytest.mark.shared_data
def test_bfloat16_recall_on_sift():
    train, test, _, dist, metric = read_shared("sift-128-euclidean-10k", n_queries=100)
    index = annlib.TPUKNN.build(train, metric=metric, dtype="bfloat16")
    ids, d = index.search(test, 10, recall_target=0.95)
    assert threshold_recall(ids, train, test, dist[:, 9], metric) >= 0.94


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_exact_mode_equals_bruteforce(blobs, metric):
    X, Q = blobs
    exact = annlib.BruteForce.build(X, metric=metric)
    index = annlib.TPUKNN.build(X, metric=metric, recall_target=1.0)
    for kw in ({}, {"filter": np.arange(len(X)) % 3 == 0}, {"filter": np.array([4, 9, 1500])}):
        a, b = exact.search(Q, 10, **kw), index.search(Q, 10, **kw)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.distances, b.distances)


@pytest.mark.parametrize("mode", ["exact", "native"])
def test_device_exact_modes_match_bruteforce(mode):
    """The accelerator exact path, and lax.approx_min_k, which off TPU falls back to an exact
    sort (jax-ml/jax#24414): both return BruteForce's neighbours on this backend."""
    X, Q = gaussian(5_000, 16, 40, seed=11)
    truth = annlib.BruteForce.build(X).search(Q, 10)
    db = DeviceDatabase(X, 0.5 * (X ** 2).sum(1), block=1024)
    _, rows = accel.search(db, Q, 10, 0.9, mode=mode)
    np.testing.assert_array_equal(np.sort(rows, 1), np.sort(truth.ids, 1))


def test_cpu_never_chooses_native_approx_min_k():
    assert accel.choose_mode(100_000, 10, 0.95, platform="cpu") == "bins"
    assert accel.choose_mode(100_000, 10, 0.95, platform="gpu") == "bins"
    assert accel.choose_mode(100_000, 10, 0.95, platform="tpu") == "native"
    assert accel.choose_mode(100_000, 10, 1.0, platform="tpu") == "exact"
    assert accel.choose_mode(200, 10, 0.95, platform="cpu") == "exact"


# ----------------------------------------------------------------------------- API behaviour
def test_query_batches_are_independent():
    """Chunking and bucket padding do not change any row's result."""
    X, Q = gaussian(8_000, 16, 600, seed=2)
    index = annlib.TPUKNN.build(X)
    whole = index.search(Q, 10)
    for lo, hi in ((0, 1), (3, 12), (100, 170), (0, 600)):
        part = index.search(Q[lo:hi], 10)
        np.testing.assert_array_equal(part.ids, whole.ids[lo:hi])
        np.testing.assert_array_equal(part.distances, whole.distances[lo:hi])


def test_add_appends_to_last_block_and_equals_fresh_build():
    X, Q = gaussian(9_000, 16, 50, seed=4)
    grown = annlib.TPUKNN.build(X[:5_000])
    layout = grown._db.layout
    grown.add(X[5_000:5_100])  # fits the spare rows of the last block
    assert grown._db.layout.capacity == layout.capacity and grown._db.layout.n == 5_100
    grown.add(X[5_100:])  # needs more blocks than were allocated: laid out again
    fresh = annlib.TPUKNN.build(X)
    assert len(grown) == len(X)
    for r in (0.9, 0.99):
        a, b = grown.search(Q, 10, recall_target=r), fresh.search(Q, 10, recall_target=r)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.distances, b.distances)


def test_save_load_rebuilds_device_copy(tmp_path):
    X, Q = gaussian(3_000, 8, 20, seed=6)
    index = annlib.TPUKNN.build(X, metric="cosine", recall_target=0.9, dtype="bfloat16")
    index.save(tmp_path / "t.annlib")
    loaded = annlib.load(tmp_path / "t.annlib", mmap=True)
    assert loaded.params == index.params and loaded._db is None
    a, b = index.search(Q, 7), loaded.search(Q, 7)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.distances, b.distances)
    loaded.add(X[:10] * 2)
    assert len(loaded) == 3_010


def test_search_space_and_defaults():
    space = annlib.TPUKNN.search_space()
    assert space["search"]["recall_target"][-1] == 1.0
    assert space["search"]["recall_target"] == sorted(space["search"]["recall_target"])
    X, Q = gaussian(3_000, 8, 5)
    index = annlib.TPUKNN.build(X, recall_target=0.8)
    np.testing.assert_array_equal(index.search(Q, 5).ids, index.search(Q, 5, recall_target=0.8).ids)


@pytest.mark.parametrize("params, exc, match", [
    ({"recall_target": 0.0}, ValueError, r"recall_target must be in \(0.0, 1.0\]; got 0.0"),
    ({"recall_target": 1.01}, ValueError, "recall_target must be in"),
    ({"recall_target": "high"}, TypeError, "recall_target must be a real number"),
    ({"dtype": "float16"}, ValueError, "unknown dtype 'float16'; accepted: float32, bfloat16"),
    ({"shards": 0}, ValueError, "shards must be >= 1; got 0"),
    ({"shards": 2.5}, TypeError, "shards must be an integer"),
    ({"shards": 4096}, ValueError, "shards=4096 but only"),
])
def test_bad_build_parameters(params, exc, match):
    X, _ = gaussian(300, 4, 1)
    with pytest.raises(exc, match=match):
        annlib.TPUKNN.build(X, **params)


def test_bad_search_parameters_leave_index_unchanged():
    X, Q = gaussian(3_000, 8, 5)
    index = annlib.TPUKNN.build(X)
    before = index.search(Q, 5)
    with pytest.raises(ValueError, match=r"recall_target must be in \(0.0, 1.0\]; got -0.5"):
        index.search(Q, 5, recall_target=-0.5)
    with pytest.raises(TypeError, match="recall_target must be a real number"):
        index.search(Q, 5, recall_target="0.9")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) ef"):
        index.search(Q, 5, ef=10)
    np.testing.assert_array_equal(index.search(Q, 5).ids, before.ids)


def test_empty_filter_returns_padding():
    X, Q = gaussian(3_000, 8, 4)
    ids, dist = annlib.TPUKNN.build(X).search(Q, 5, filter=np.zeros(len(X), bool))
    assert (ids == -1).all() and np.isinf(dist).all()


# ----------------------------------------------------------------------------- sharding
SHARDED = textwrap.dedent("""
    import numpy as np, jax, annlib
    from annlib.accel import tpuknn as accel
    from annlib.accel.sharding import DeviceDatabase
    assert len(jax.devices()) == 4, jax.devices()
    g = np.random.default_rng(0)
    X = g.normal(size=(12_000, 16)).astype(np.float32)
    Q = g.normal(size=(60, 16)).astype(np.float32)
    mask = g.random(len(X)) < 0.4
    one = annlib.TPUKNN.build(X[:9_000], shards=1)
    many = [annlib.TPUKNN.build(X[:9_000], shards=s) for s in (3, 4)]
    assert [i._db.mesh.devices.size for i in many] == [3, 4]
    for step in ("built", "added"):
        for r in (0.9, 0.99):  # L = 256 divides the blocks, L = 1280 does not
            for kw in ({}, {"filter": mask[: len(one)]}):
                a = one.search(Q, 10, recall_target=r, **kw)
                for idx in many:
                    b = idx.search(Q, 10, recall_target=r, **kw)
                    np.testing.assert_array_equal(a.ids, b.ids)
                    np.testing.assert_array_equal(a.distances, b.distances)
        for idx in [one, *many]:
            idx.add(X[9_000:])
    t = 0.5 * (X ** 2).sum(1)
    exact1 = accel.search(DeviceDatabase(X, t, shards=1, block=1024), Q, 10, 1.0, mode="exact")[1]
    exact4 = accel.search(DeviceDatabase(X, t, shards=4, block=1024), Q, 10, 1.0, mode="exact")[1]
    np.testing.assert_array_equal(np.sort(exact1, 1), np.sort(exact4, 1))
    print("ok")
""")


def test_sharded_equals_single_device():
    """Four simulated CPU devices: every shard count gives the single-device result, exactly."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
