"""Partitioned's anisotropic re-fit of leaf centres (build parameter ``avq``, ScaNN's tree AVQ).

The kernel (annlib.kernels.avq): the re-fit minimises the loss it is defined by (lower than the
k-means centres' on every leaf, zero gradient, the member means at eta = 1) and the global
rescale is one positive factor. The family: recall with the re-fit at least the baseline's minus
a small tolerance (synthetic; a floor on a shared set), save/load, add, parameter errors.
"""

from __future__ import annotations

import numpy as np
import pytest

import annlib
from annlib.kernels.avq import avq_loss, avq_refit
from annlib.kernels.cluster import assign_nearest, kmeans

from conftest import read_shared, synthetic_set, threshold_recall, true_distances


def build(X, **params):
    """Partitioned.build without the self-tuning of the default search parameters."""
    return annlib.Partitioned.build(X, **{"default_recall": None, **params})


def kth_true(X, Q, metric, k=10):
    return np.sort(true_distances(X, Q, metric), axis=1)[:, k - 1]


def clustered(n=6000, d=24, unit=False, seed=0):
    g = np.random.default_rng(seed)
    X = g.normal(size=(n, d)) + 2.0 * g.normal(size=(30, d))[g.integers(0, 30, n)]
    if unit:
        X /= np.linalg.norm(X, axis=1, keepdims=True)
    X = X.astype(np.float32)
    C = kmeans(X, 40, rng=np.random.default_rng(seed + 1), spherical=unit)
    primary, _ = assign_nearest(X, C)
    return X, C, primary


# ----------------------------------------------------------------------------------------- kernel
@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("eta", [0.5, 1.6, 2.5, 8.0])
def test_refit_lowers_the_anisotropic_loss(unit, eta):
    X, C, primary = clustered(unit=unit)
    before = avq_loss(X, C, primary, eta)
    after = avq_loss(X, avq_refit(X, C, primary, eta, rescale=False), primary, eta)
    # each leaf's re-fitted centre is that leaf's minimiser (float32 rounding aside)
    assert (after <= before * (1 + 1e-5)).all()
    assert after.sum() < before.sum() * 0.999


def test_refit_is_a_stationary_point_of_the_loss():
    X, C, primary = clustered(n=3000, d=12)
    eta = 2.5
    R = avq_refit(X, C, primary, eta, rescale=False).astype(np.float64)
    j = int(np.bincount(primary).argmax())
    base = avq_loss(X, R, primary, eta)[j]
    h = 1e-3 * float(np.linalg.norm(R[j]))
    grad = np.empty(R.shape[1])
    for i in range(R.shape[1]):
        Rp, Rm = R.copy(), R.copy()
        Rp[j, i] += h
        Rm[j, i] -= h
        grad[i] = (avq_loss(X, Rp, primary, eta)[j] - avq_loss(X, Rm, primary, eta)[j]) / (2 * h)
    # the gradient at the re-fit is tiny next to the loss per unit of centre movement
    assert np.abs(grad).max() * float(np.linalg.norm(R[j])) < 1e-3 * base


@pytest.mark.parametrize("eta", [0.4, 2.5])
def test_leaves_smaller_than_the_dimension_match_the_direct_solve(eta):
    # fewer members than dimensions takes the m x m (Woodbury) form of the system
    g = np.random.default_rng(5)
    d, L = 96, 6
    X = (g.normal(size=(200, d)) * g.uniform(0.5, 2.0, (200, 1))).astype(np.float32)
    C = X[:L].copy()
    primary = np.arange(len(X)) % L  # any assignment will do; about 33 members per leaf
    got = avq_refit(X, C, primary, eta, rescale=False)
    for j in range(L):
        Xj = X[primary == j].astype(np.float64)
        norms = np.linalg.norm(Xj, axis=1)
        w = norms ** (eta - 1.0)
        A = w.sum() * np.eye(d) + (eta - 1.0) * (Xj * (w / norms ** 2)[:, None]).T @ Xj
        ref = np.linalg.solve(A, eta * (w @ Xj))
        np.testing.assert_allclose(got[j], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    before = avq_loss(X, C, primary, eta)
    assert (avq_loss(X, got, primary, eta) <= before * (1 + 1e-5)).all()


def test_eta_one_gives_the_member_means():
    X, C, primary = clustered(n=3000, d=12)
    R = avq_refit(X, C, primary, 1.0, rescale=False)
    for j in range(C.shape[0]):
        members = X[primary == j]
        if len(members):
            np.testing.assert_allclose(R[j], members.astype(np.float64).mean(axis=0), rtol=1e-4, atol=1e-5)


def test_rescale_is_one_positive_factor_and_inputs_stay_untouched():
    X, C, primary = clustered(n=3000, d=12, unit=True)
    X0, C0, p0 = X.copy(), C.copy(), primary.copy()
    raw = avq_refit(X, C, primary, 2.0, rescale=False)
    scaled = avq_refit(X, C, primary, 2.0)
    s = float((raw.astype(np.float64) * scaled).sum() / (raw.astype(np.float64) ** 2).sum())
    assert s > 0
    np.testing.assert_allclose(scaled, s * raw, rtol=1e-4, atol=1e-6)
    # a global positive scale keeps every query's ranking of the leaves by <q, c>
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(C, C0)
    np.testing.assert_array_equal(primary, p0)


def test_empty_leaves_and_zero_vectors():
    X, C, primary = clustered(n=2000, d=8)
    X[:5] = 0.0
    C = np.concatenate([C, C[:1] + 1.0])  # a leaf nobody is assigned to
    R = avq_refit(X, C, primary, 2.0, rescale=False)
    assert np.isfinite(R).all()
    np.testing.assert_array_equal(R[-1], C[-1])


def test_thread_count_does_not_change_the_centres():
    X, C, primary = clustered(n=4000, d=16)
    one = avq_refit(X, C, primary, 2.0, threads=1)
    two = avq_refit(X, C, primary, 2.0, threads=2)
    np.testing.assert_allclose(one, two, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------- family
@pytest.fixture(scope="module")
def synth():
    X, Q, _, _, _ = synthetic_set(n=8000, d=32, n_queries=150, k=10, seed=3)
    return X, Q


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_recall_with_avq_is_not_below_the_baseline(synth, metric):
    X, Q = synth
    kth = kth_true(X, Q, metric)
    settings = [(2, 40), (4, 40), (8, 100)]

    def recall(**params):
        index = build(X, metric=metric, num_leaves=100, **params)
        return np.mean([threshold_recall(index.search(Q, 10, leaves=t, reorder=r).ids, X, Q, kth, metric)
                        for t, r in settings])

    base = recall()
    for eta in (1.6, 2.5):
        assert recall(avq=eta) >= base - 0.03


def test_avq_changes_the_centres_and_keeps_the_state_valid(synth):
    X, _ = synth
    off = build(X, metric="ip", num_leaves=50)
    on = build(X, metric="ip", num_leaves=50, avq=2.0)
    assert on.params["avq"] == 2.0 and off.params["avq"] is None
    assert not np.allclose(on._st.centres, off._st.centres)
    st = on._st
    st.validate(X.shape[1], len(X), l2=False)
    assert np.isfinite(st.centres).all()


@pytest.mark.shared_data
def test_recall_floor_sift_cosine():
    X, Q, _, _, _ = read_shared("sift-128-euclidean-10k", n_queries=60)
    kth = kth_true(X, Q, "cosine")
    rec = {}
    for avq in (None, 2.5):
        index = build(X, metric="cosine", num_leaves=100, avq=avq)
        rec[avq] = threshold_recall(index.search(Q, 10, leaves=20, reorder=200).ids, X, Q, kth, "cosine")
    assert rec[2.5] >= 0.97
    assert rec[2.5] >= rec[None] - 0.02


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(synth, tmp_path, mmap):
    X, Q = synth
    index = build(X, metric="cosine", num_leaves=60, avq=1.6)
    before = index.search(Q, 10, leaves=6, reorder=60)
    path = tmp_path / "avq.annlib"
    index.save(path)
    loaded = annlib.load(path, mmap=mmap)
    assert loaded.params["avq"] == 1.6
    np.testing.assert_array_equal(loaded._st.centres, index._st.centres)
    after = loaded.search(Q, 10, leaves=6, reorder=60)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.distances, before.distances)


def test_add_after_build(synth):
    X, Q = synth
    first, extra = X[:6000], X[6000:]
    index = build(first, metric="ip", num_leaves=60, avq=2.5)
    centres = index._st.centres.copy()
    index.add(extra)
    assert len(index) == len(X)
    # new points are placed with the re-fitted centres, which stay as they were
    np.testing.assert_array_equal(index._st.centres[:len(centres)], centres)
    index._st.validate(X.shape[1], len(X), l2=False)
    kth = kth_true(X, Q, "ip")
    got = threshold_recall(index.search(Q, 10, leaves=60, reorder=400).ids, X, Q, kth, "ip")
    assert got >= 0.97
    # the added points are found as neighbours of themselves (by inner product a point need not
    # be its own best match, so compare with the exact top 10 of each)
    kth_extra = kth_true(X, extra[:50], "ip")
    ids = index.search(extra[:50], 10, leaves=60, reorder=400).ids
    assert threshold_recall(ids, X, extra[:50], kth_extra, "ip") >= 0.97


@pytest.mark.parametrize("eta", [0.01, 2.5, 1000.0])
@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_extreme_eta_and_data_near_the_float32_limit(tmp_path, metric, eta):
    # a small eta can put a re-fitted centre beyond its members; such a leaf keeps its k-means
    # centre, so every centre stays in the metric's float32-safe range and the file loads
    g = np.random.default_rng(11)
    base = g.normal(size=(200, 16))
    big = annlib.metrics.get_metric(metric).max_abs(16)
    X = (base / np.abs(base).max() * 0.99 * min(big, 1e30)).astype(np.float32)
    index = build(X, metric=metric, avq=eta)
    assert np.abs(index._st.centres).max() <= big
    ids, dist = index.search(X[:5], 5)
    assert (ids >= 0).all() and np.isfinite(dist).all()
    index.save(tmp_path / "far.annlib")
    loaded = annlib.load(tmp_path / "far.annlib")
    np.testing.assert_array_equal(loaded.search(X[:5], 5).ids, ids)


@pytest.mark.parametrize("value, exc, match", [
    (0, ValueError, r"avq must be in \(0\.0, inf\); got 0\.0"),
    (-1.5, ValueError, r"avq must be in \(0\.0, inf\)"),
    (float("nan"), ValueError, "avq must be finite"),
    (float("inf"), ValueError, "avq must be finite"),
    ("2", TypeError, "avq must be a real number"),
    (True, TypeError, "avq must be a real number"),
])
def test_bad_avq_values(value, exc, match):
    with pytest.raises(exc, match=match):
        annlib.Partitioned(metric="cosine", avq=value)


def test_avq_with_l2_is_refused():
    with pytest.raises(ValueError, match=r"applies to metric 'cosine' or 'ip'; got metric 'l2'"):
        annlib.Partitioned(metric="l2", avq=2.0)
    with pytest.raises(ValueError, match="leave avq=None"):
        annlib.Index.build(np.ones((10, 4), np.float32), method="partitioned", metric="l2", avq=1.6)
    annlib.Partitioned(metric="l2", avq=None)  # off is fine for every metric
