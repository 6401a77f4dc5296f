"""annlib.Partitioned: recall against exact ground truth, full rows, outliers, equivalences,
persistence, bad input, progress, concurrency.

Everything runs on seeded synthetic data except the recall floors on real sets
(``@pytest.mark.shared_data``, skipped without ../shared/data).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import annlib
from annlib.indexes import partitioned as P
from annlib.kernels.quantization import pad_columns, split_residual_error, unpack_codes

from conftest import assert_valid_rows, read_shared, synthetic_set, threshold_recall, true_distances


@pytest.fixture(scope="module")
def synth():
    X, Q, _, _, _ = synthetic_set(n=4000, d=32, n_queries=60, k=10, seed=1)
    return X, Q


@pytest.fixture(scope="module")
def sift():
    X, Q, _, _, _ = read_shared("sift-128-euclidean-10k", n_queries=60)
    return X, Q


def build(X, **params):
    """Partitioned.build without the self-tuning of the default search parameters (which these
    tests do not exercise, and which would triple their build time)."""
    return annlib.Partitioned.build(X, **{"default_recall": None, **params})


def kth_true(X, Q, metric, k=10):
    return np.sort(true_distances(X, Q, metric), axis=1)[:, k - 1]


def recompute(X, Q, ids, metric):
    """Exact distances of the returned ids (float64), +inf where the id is -1."""
    out = np.full(ids.shape, np.inf)
    for r in range(len(Q)):
        ok = ids[r] >= 0
        out[r, ok] = true_distances(X[ids[r][ok]], Q[r:r + 1], metric)[0]
    return out


# ----------------------------------------------------------------------------------------- recall
@pytest.mark.shared_data
@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_recall_floor_sift(sift, metric):
    X, Q = sift
    index = build(X, metric=metric, num_leaves=100)
    kth = kth_true(X, Q, metric)
    low = threshold_recall(index.search(Q, 10, leaves=4, reorder=40).ids, X, Q, kth, metric)
    high = threshold_recall(index.search(Q, 10, leaves=20, reorder=200).ids, X, Q, kth, metric)
    assert high >= 0.97
    assert low >= 0.6 and high >= low


@pytest.mark.shared_data
def test_soar_beats_no_spill_at_equal_leaves(sift):
    X, Q = sift
    kth = kth_true(X, Q, "cosine")
    rec = {}
    for spill in ("none", "soar"):
        index = build(X, metric="cosine", num_leaves=100, spill=spill)
        rec[spill] = threshold_recall(index.search(Q, 10, leaves=3, reorder=100).ids, X, Q, kth, "cosine")
    assert rec["soar"] > rec["none"]


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_recall_grows_with_leaves_synthetic(synth, metric):
    X, Q = synth
    index = build(X, metric=metric, num_leaves=60)
    kth = kth_true(X, Q, metric)
    low = threshold_recall(index.search(Q, 10, leaves=2, reorder=30).ids, X, Q, kth, metric)
    high = threshold_recall(index.search(Q, 10, leaves=20, reorder=200).ids, X, Q, kth, metric)
    assert high >= 0.95 and high > low


@pytest.mark.parametrize("quantizer", ["pq4", "int8"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_all_leaves_and_full_reorder_is_exact(synth, quantizer, metric):
    X, Q = synth
    index = build(X, metric=metric, num_leaves=30, quantizer=quantizer)
    ids, dist = index.search(Q, 10, leaves=30, reorder=len(X))
    exact = annlib.BruteForce.build(X, metric=metric).search(Q, 10)
    np.testing.assert_allclose(dist, exact.distances, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------------------- full rows (issue 9, item 6)
@pytest.mark.parametrize("quantizer", ["pq4", "int8"])
@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
@pytest.mark.parametrize("n, k", [(300, 300), (40, 10), (300, 50), (1000, 1)])
def test_rows_are_full_when_enough_vectors_exist(n, k, metric, quantizer):
    """Before: k = n on 300 points returned mostly -1 with the default search (and n=40, k=10
    some -1), because only ceil(L / 20) leaves were probed."""
    X = np.random.default_rng(n + k).normal(size=(n, 16)).astype(np.float32)
    index = build(X, metric=metric, quantizer=quantizer)
    Q = X[:7] + 0.01
    for params in ({}, {"reorder": 1}, {"leaves": 1, "reorder": 5}):
        ids, dist = index.search(Q, k, **params)
        assert_valid_rows(ids, dist, k, valid_ids=set(range(n)), allow_padding=False, where=str(params))
        np.testing.assert_allclose(dist, recompute(X, Q, ids, metric), rtol=1e-4, atol=1e-4)
    if k == n:  # every vector, in exact order
        exact = annlib.BruteForce.build(X, metric=metric).search(Q, k)
        np.testing.assert_allclose(index.search(Q, k).distances, exact.distances, rtol=1e-4, atol=1e-4)


def test_rows_are_full_under_a_filter(synth):
    X, Q = synth
    index = build(X, num_leaves=80)
    allowed = np.zeros(len(X), bool)
    allowed[np.random.default_rng(0).choice(len(X), 600, replace=False)] = True  # past the exact-scan cut
    assert not index._scan_is_cheaper(600, 10, index._default_search_params())
    ids, dist = index.search(Q, 10, leaves=1, reorder=20, filter=allowed)
    assert_valid_rows(ids, dist, 10, valid_ids=lambda i: bool(allowed[i]), allow_padding=False)


def test_reorder_below_k_is_raised_to_k(synth):
    X, Q = synth
    index = build(X, num_leaves=40)
    a = index.search(Q, 25, leaves=40, reorder=1)
    b = index.search(Q, 25, leaves=40, reorder=25)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert (a.ids >= 0).all()


# ----------------------------------------------------------------------------------------- outliers (issue 9, item 6)
@pytest.mark.parametrize("quantizer", ["pq4", "int8"])
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_point_added_far_outside_is_found(metric, quantizer):
    """Before: a point added far from the build data kept a saturated 4-bit code scored against
    a distant centre, so its approximate score was meaningless (l2: 0 of 20 found with every
    leaf probed and reorder=500 of 2020)."""
    g = np.random.default_rng(0)
    X = g.normal(size=(2000, 16)).astype(np.float32)
    index = build(X, metric=metric, num_leaves=20, quantizer=quantizer)
    scattered = (g.normal(size=(20, 16)) * 50 + 100).astype(np.float32)
    cluster = (g.normal(size=(300, 16)) + 60).astype(np.float32)
    index.add(scattered)
    index.add(cluster)
    allX = np.vstack([X, scattered, cluster])
    Q = np.vstack([scattered, cluster[:20]]) + 0.01
    if metric == "cosine":
        # normalised, the cluster is a cone of width 1/240 rad: beyond what 4 bits per two
        # dimensions resolve, and not a question of outliers
        Q = Q[:20]
    exact = annlib.BruteForce.build(allX, metric=metric).search(Q, 10)
    # each query's own point first: with every leaf probed and a modest reorder, and (where
    # the points are outside the build's range) with the default search too
    for params in ({"leaves": len(allX), "reorder": 50}, {}) if metric != "cosine" else ({"leaves": 20, "reorder": 50},):
        res = index.search(Q, 10, **params)
        assert (res.ids[:, 0] == exact.ids[:, 0]).mean() >= 0.95, params
        np.testing.assert_allclose(res.distances, recompute(allX, Q, res.ids, metric), rtol=1e-4, atol=1e-3)
    # and the exact answer once every vector is re-ranked
    res = index.search(Q, 10, leaves=len(allX), reorder=len(allX))
    np.testing.assert_allclose(res.distances, exact.distances, rtol=1e-4, atol=1e-3)
    stats = index.stats()
    if metric != "cosine":  # normalised, these points are not outside the build's range
        assert stats["num_leaves"] > 20 or stats["exact_points"] > 0


def test_outlier_placement_survives_save_load_and_more_adds(tmp_path):
    g = np.random.default_rng(3)
    X = g.normal(size=(1500, 8)).astype(np.float32)
    far = (g.normal(size=(5, 8)) * 40 + 80).astype(np.float32)
    index = build(X, num_leaves=15).add(far)
    assert index.stats()["exact_points"] + index.stats()["num_leaves"] > 15
    index.save(tmp_path / "p.annlib")
    loaded = annlib.load(tmp_path / "p.annlib")
    Q = far + 0.01
    np.testing.assert_array_equal(index.search(Q, 5).ids, loaded.search(Q, 5).ids)
    more = (g.normal(size=(3, 8)) * 40 - 80).astype(np.float32)
    index.add(more)
    loaded.add(more)
    Q2 = np.vstack([Q, more])
    np.testing.assert_array_equal(index.search(Q2, 5).ids, loaded.search(Q2, 5).ids)
    assert (index.search(more, 1).ids[:, 0] == np.arange(1505, 1508)).all()


# ----------------------------------------------------------------------------------------- structure and options
@pytest.mark.parametrize("spill", ["none", "nearest", "soar"])
def test_spill_modes_store_each_point_once_per_leaf(synth, spill):
    X, Q = synth
    Xs = X[:3000]
    index = build(Xs, metric="cosine", num_leaves=40, spill=spill, spills=2, soar_exclude_primary=True)
    leaf, pos, _, _ = index._st.entries()
    pairs = leaf * len(Xs) + pos
    assert len(np.unique(pairs)) == len(pairs), "a point stored twice in one leaf"
    assert np.array_equal(np.unique(pos), np.arange(3000))
    expected = {"none": 0.0, "nearest": 2.0, "soar": 2.0}[spill]
    assert index.stats()["spill_fraction"] == pytest.approx(expected, abs=0.01)
    ids = index.search(Q, 10, leaves=8).ids
    for row in ids:
        assert len(set(row.tolist())) == 10  # spilled copies de-duplicated


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_padding_repeats_its_leafs_last_entry(synth, metric):
    """Each leaf's padding entries carry the codes of the leaf's last real entry (all-zero codes
    passed the scan's bar together for some queries), after an add too; they stay unreal
    (position -1), so the search stays exact with every leaf and candidate."""
    X, Q = synth
    index = build(X[:2500], metric=metric, num_leaves=30)
    index.add(X[2500:3000])
    st = index._st
    codes = unpack_codes(np.asarray(st.codes))
    offsets = st.leaf_block_offsets * 32
    real = st.entry_positions >= 0
    padded = 0
    for leaf in range(st.num_leaves):
        n_real = int(real[offsets[leaf]:offsets[leaf + 1]].sum())
        last = offsets[leaf] + n_real - 1
        for e in range(last + 1, offsets[leaf + 1]):
            np.testing.assert_array_equal(codes[e], codes[last])
            padded += 1
    assert padded > 0
    exact = annlib.BruteForce.build(X[:3000], metric=metric).search(Q, 10)
    got = index.search(Q, 10, leaves=30, reorder=3000)
    np.testing.assert_array_equal(np.sort(got.ids, axis=1), np.sort(exact.ids, axis=1))


def test_l2_entries_ascend_by_point_term_within_each_leaf(synth):
    """Squared L2 lays each leaf's entries out by ||x||^2 / 2 (the scan's per-block bar is then
    tight), after an add too; each block's bar term is its smallest real entry's, padding left
    out; the search stays exact with every leaf and candidate."""
    X, Q = synth
    index = build(X[:2500], metric="l2", num_leaves=30)
    index.add(X[2500:3000])
    st = index._st
    offsets = st.leaf_block_offsets * 32
    real = st.entry_positions >= 0
    for leaf in range(st.num_leaves):
        part = slice(offsets[leaf], offsets[leaf + 1])
        terms = st.point_terms[part][real[part]]
        assert (np.diff(terms) >= 0).all(), leaf
        assert real[part][:terms.shape[0]].all()  # padding last
    want = np.where(real, st.point_terms, np.inf).reshape(-1, 32).min(axis=1)
    np.testing.assert_array_equal(st.packed.point_term_block_min, want)
    exact = annlib.BruteForce.build(X[:3000], metric="l2").search(Q, 10)
    got = index.search(Q, 10, leaves=30, reorder=3000)
    np.testing.assert_array_equal(np.sort(got.ids, axis=1), np.sort(exact.ids, axis=1))


def test_anisotropic_threshold_is_applied():
    """The threshold must change the codes: anisotropic codes have a smaller error along the
    vector (the part that changes inner products) at the price of a larger orthogonal one. This
    fails if the parameter were ignored (the two indexes would hold the same codes)."""
    X, _, _, _, _ = synthetic_set(n=3000, d=32, n_queries=1, metric="cosine", seed=4)
    errors = {}
    for t in (None, 0.2):
        index = build(X, metric="cosine", num_leaves=20, spill="none", anisotropic_threshold=t)
        st = index._st
        assert (st.anisotropic_scale_threshold is None) == (t is None)
        leaf, pos, codes, _ = st.entries()
        Xn = st.vectors[pos]
        R = pad_columns(Xn - st.centres[leaf], st.padded_dim)
        U = pad_columns(Xn, st.padded_dim)  # unit vectors (cosine)
        errors[t] = split_residual_error(R, codes, st.codebooks, U)
    (par_plain, perp_plain), (par_aniso, perp_aniso) = errors[None], errors[0.2]
    assert par_aniso < 0.8 * par_plain
    assert perp_aniso > perp_plain


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_single_and_batch_queries_agree(synth, metric):
    X, Q = synth
    index = build(X, metric=metric, num_leaves=60)
    batch = index.search(Q[:20], 10, leaves=5)  # > FEW_QUERIES: the batch path
    single = np.stack([index.search(q, 10, leaves=5).ids for q in Q[:20]])  # the fused path
    assert (batch.ids == single).mean() >= 0.99  # same candidates; float ties aside
    par = index.search(Q[:20], 10, leaves=5, threads=2)
    np.testing.assert_array_equal(batch.ids, par.ids)


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_and_add(synth, tmp_path, mmap):
    X, Q = synth
    index = build(X[:3000], metric="l2", num_leaves=50)
    index.add(X[3000:])
    assert len(index) == len(X)
    kth = kth_true(X, Q, "l2")
    res = index.search(Q, 10, leaves=12, reorder=100)
    assert threshold_recall(res.ids, X, Q, kth, "l2") >= 0.9
    path = tmp_path / "p.annlib"
    index.save(path)
    loaded = annlib.load(path, mmap=mmap)
    again = loaded.search(Q, 10, leaves=12, reorder=100)
    np.testing.assert_array_equal(res.ids, again.ids)
    np.testing.assert_allclose(res.distances, again.distances, rtol=1e-6)
    loaded.add(X[:5] + 1.0)  # adding to a memory-mapped index copies
    assert len(loaded) == len(X) + 5
    assert loaded.memory_bytes() > index.memory_bytes()


def test_identical_seeds_identical_index_and_generators_accepted(synth):
    X, _ = synth
    a = build(X, num_leaves=40, random_state=5)
    b = build(X, num_leaves=40, random_state=5)
    for name, arr in a._state()[1].items():
        np.testing.assert_array_equal(arr, b._state()[1][name], err_msg=name)
    g = build(X, num_leaves=40, random_state=np.random.default_rng(7))
    assert isinstance(g.params["random_state"], int)
    again = build(X, num_leaves=40, random_state=g.params["random_state"])
    np.testing.assert_array_equal(g._st.centres, again._st.centres)


def test_load_then_add_equals_add(synth, tmp_path):
    X, Q = synth
    far = (np.random.default_rng(1).normal(size=(40, X.shape[1])) * 30 + 50).astype(np.float32)
    a = build(X[:3000], num_leaves=40)
    a.save(tmp_path / "a.annlib")
    b = annlib.load(tmp_path / "a.annlib")
    for index in (a, b):
        index.add(np.vstack([X[3000:], far]))
    for name, arr in a._state()[1].items():
        np.testing.assert_array_equal(arr, b._state()[1][name], err_msg=name)


def test_restrictive_filter_is_exact(synth):
    X, Q = synth
    index = build(X, num_leaves=50)
    allowed = np.arange(0, len(X), 97)
    ids, dist = index.search(Q, 10, leaves=1, filter=allowed)
    exact = annlib.BruteForce.build(X).search(Q, 10, filter=allowed)
    np.testing.assert_array_equal(ids, exact.ids)
    np.testing.assert_allclose(dist, exact.distances, rtol=1e-5, atol=1e-5)


def test_stats_bytes(synth):
    X, _ = synth
    index = build(X, num_leaves=50, spill="none")
    s = index.stats()
    assert s["bytes_per_vector"] - s["bytes_per_vector_without_reorder"] == pytest.approx(4 * X.shape[1])
    # 8 code bytes (32 dims, 2 per 4-bit code) + position + norm term, and block padding
    assert s["bytes_per_vector_without_reorder"] < 40
    assert s["copies"] == len(X) and s["exact_points"] == 0


def test_progress_is_reported_for_build_and_add(synth):
    X, _ = synth
    calls = []
    index = annlib.Partitioned(num_leaves=30, default_recall=None).build(
        X[:2000], progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1] and all(t == calls[0][1] for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    calls.clear()
    index.add(X[2000:2500], progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1] == (500, 500)


# ----------------------------------------------------------------------------------------- search space (hollow test fixed)
def test_search_space_uses_the_built_leaf_count(synth):
    """Before: the instance's space came from a class method of (n, dim) and offered leaves up
    to 2 sqrt(n) = 126 for an index built with 30 leaves."""
    X, _ = synth
    built = build(X, num_leaves=30).search_space()
    assert set(built["search"]) == {"leaves", "reorder"}
    assert built["build"] == {"num_leaves": [30]}
    assert max(built["search"]["leaves"]) == 30
    by_class = annlib.Partitioned.search_space(n=len(X), dim=X.shape[1])
    assert max(by_class["search"]["leaves"]) > 30  # what the instance would have said before
    assert annlib.Partitioned.search_space(n=40_000, dim=50)["build"] == {"num_leaves": [400]}
    assert annlib.Partitioned(num_leaves=30).search_space()["build"] == {}  # not built


# ----------------------------------------------------------------------------------------- bad input and magnitudes
BAD_BUILD = [
    (dict(num_leaves=0), ValueError, "num_leaves must be >= 1; got 0"),
    (dict(num_leaves=20_000), ValueError, r"num_leaves=20000 is larger than the number of vectors \(4000\)"),
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
    (dict(random_state=-3), ValueError, "random_state must be an integer seed"),
    (dict(random_state="x"), TypeError, "random_state must be None, an int seed"),
]


@pytest.mark.parametrize("params, exc, match", BAD_BUILD, ids=[str(b[0]) for b in BAD_BUILD])
def test_bad_build_parameters(synth, params, exc, match):
    X, _ = synth
    with pytest.raises(exc, match=match):
        annlib.Partitioned.build(X, **params)


def test_bad_search_parameters_leave_index_unchanged(synth):
    X, Q = synth
    index = build(X, num_leaves=30)
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


def _magnitude_cases(d=16):
    g = np.random.default_rng(11)
    base = g.normal(size=(200, d))
    big = annlib.metrics.get_metric("l2").max_abs(d)
    return {
        "near_float32_limit": (base / np.abs(base).max() * 0.99 * big).astype(np.float32),
        "tiny": (base * 1e-20).astype(np.float32),
        "all_equal": np.full((50, d), 3.0, np.float32),
        "duplicates": np.repeat(base[:20], 10, axis=0).astype(np.float32),
        "n_1": base[:1].astype(np.float32),
        "n_3": base[:3].astype(np.float32),
        "zeros": np.zeros((30, d), np.float32),
    }


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
@pytest.mark.parametrize("case", list(_magnitude_cases()))
def test_extreme_data_gives_valid_rows(metric, case):
    """Before: a bare ZeroDivisionError at large magnitudes. Now every case builds, adds and
    answers with valid rows (ids unique, ascending finite distances, full rows)."""
    X = _magnitude_cases()[case]
    n = len(X)
    index = annlib.Partitioned.build(X, metric=metric)  # the defaults, self-tuning included
    index.add(X[: max(1, n // 4)])
    n_all = n + max(1, n // 4)
    k = min(5, n_all)
    Q = X[: min(4, n)]
    for params in ({}, {"leaves": 10**6, "reorder": 10**6}):
        for q in (Q, np.repeat(Q, 3, axis=0)):  # fused few-query path and batch path
            ids, dist = index.search(q, k, **params)
            assert_valid_rows(ids, dist, k, valid_ids=set(range(n_all)), allow_padding=False, where=case)


def test_values_above_the_float32_limit_raise_clearly():
    d = 16
    big = annlib.metrics.get_metric("l2").max_abs(d)
    X = np.full((20, d), 2 * big, np.float32)
    with pytest.raises(ValueError, match="entries must be at most"):
        annlib.Partitioned.build(X)


# ----------------------------------------------------------------------------------------- failures leave the index unchanged
def test_failed_build_and_add_leave_the_index_unchanged(synth, monkeypatch):
    X, Q = synth
    index = build(X[:2000], num_leaves=30)
    before = index.search(Q, 10)
    state = index._st

    def boom(*a, **k):
        raise MemoryError("simulated")

    monkeypatch.setattr(P._Coder, "encode", boom)
    with pytest.raises(MemoryError):
        index.build(X)  # rebuild fails half-way (after k-means)
    with pytest.raises(MemoryError):
        index.add(X[2000:2100])
    monkeypatch.undo()
    assert index._st is state and len(index) == 2000 and index.n_positions == 2000
    after = index.search(Q, 10)
    np.testing.assert_array_equal(before.ids, after.ids)
    index.add(X[2000:2100])
    assert len(index) == 2100


# ----------------------------------------------------------------------------------------- concurrency
def test_concurrent_searches_during_adds():
    """3 searcher threads and 1 writer adding for about 3 s: every row valid, unique, ascending,
    and its distances equal to recomputed exact ones."""
    X, Q, _, _, _ = synthetic_set(n=6000, d=24, n_queries=40, k=10, seed=9)
    start = 2000
    index = build(X[:start], num_leaves=40)
    stop = threading.Event()
    errors: list[str] = []
    checked = [0]
    lock = threading.Lock()

    def searcher(seed):
        g = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                rows = g.choice(len(Q), int(g.integers(1, 9)), replace=False)
                q = Q[rows]
                n_seen = len(index)  # a lower bound; rows may come from a later state
                ids, dist = index.search(q, 10, leaves=int(g.integers(1, 12)), reorder=int(g.integers(10, 80)))
                n_now = len(index)
                assert_valid_rows(ids, dist, 10, valid_ids=lambda i: 0 <= i < n_now, allow_padding=False)
                assert n_now >= n_seen
                want = recompute(X, q, ids, "l2")
                np.testing.assert_allclose(dist, want, rtol=1e-4, atol=1e-3)
                with lock:
                    checked[0] += len(rows)
        except Exception as exc:  # reported by the main thread
            errors.append(f"searcher {seed}: {type(exc).__name__}: {exc}")
            stop.set()

    def writer():
        try:
            at = start
            deadline = time.monotonic() + 3.0
            while at < len(X) and time.monotonic() < deadline and not stop.is_set():
                index.add(X[at:at + 100])
                at += 100
        except Exception as exc:
            errors.append(f"writer: {type(exc).__name__}: {exc}")
        finally:
            stop.set()

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert checked[0] > 0
    assert len(index) > start
    ids = index.search(X[:len(index)][-5:], 1, leaves=40, reorder=50).ids[:, 0]
    np.testing.assert_array_equal(ids, np.arange(len(index) - 5, len(index)))
