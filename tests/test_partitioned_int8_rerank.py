"""Partitioned's int8 re-ranking (build parameter ``rerank="int8"``, issue 11 item 1).

Candidates are re-scored from an int8 copy of the vectors, the best ``k + margin`` then exactly
from the float32 vectors: recall stays that of float32 re-ranking, returned distances are the
exact ones, and the option survives save/load, add, filters and the one-query path. Seeded
synthetic data; one test reads a shared set and skips without it.
"""

from __future__ import annotations

import numpy as np
import pytest

import annlib
from annlib import io
from annlib.errors import IndexFormatError
from annlib.kernels import rerank_int8

from conftest import read_shared, synthetic_set, true_distances

METRICS = ("l2", "cosine", "ip")
K = 10
SEARCH = {"leaves": 6, "reorder": 60}


def _recall(ids, truth):
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / truth.shape[1] for a, b in zip(ids, truth)]))


@pytest.fixture(scope="module", params=METRICS)
def pair(request):
    """(metric, data, float32 index, int8 index) built with the same seed: same leaves and codes."""
    metric = request.param
    X, Q, gt, _, _ = synthetic_set(4000, 24, 60, metric, k=K, seed=3)
    built = {mode: annlib.Partitioned.build(X, metric=metric, num_leaves=60, rerank=mode, random_state=1,
                                            default_recall=None) for mode in ("float32", "int8")}
    return metric, (X, Q, gt), built["float32"], built["int8"]


def test_recall_matches_float32_reranking(pair):
    metric, (X, Q, gt), f32, i8 = pair
    r32 = _recall(f32.search(Q, K, **SEARCH).ids, gt)
    r8 = _recall(i8.search(Q, K, **SEARCH).ids, gt)
    assert r32 > 0.5
    assert abs(r8 - r32) <= 0.01, (metric, r8, r32)


@pytest.mark.parametrize("reorder", [60, 25])  # 25 <= 2 (k + margin): all scored exactly
def test_distances_are_exact(pair, reorder):
    metric, (X, Q, _), _, i8 = pair
    ids, dist = i8.search(Q, K, leaves=SEARCH["leaves"], reorder=reorder)
    assert (ids >= 0).all()
    exact = np.take_along_axis(true_distances(X, Q, metric), ids, axis=1)
    assert np.allclose(dist, exact, rtol=1e-4, atol=1e-4)
    # ordered by exact distance (ties allowed)
    assert (np.diff(exact, axis=1) >= -1e-5).all()


def test_results_equal_float32_reranking_up_to_ties(pair):
    metric, (X, Q, _), f32, i8 = pair
    a_ids, a_d = f32.search(Q, K, **SEARCH)
    b_ids, b_d = i8.search(Q, K, **SEARCH)
    # the int8 stage may drop a candidate only past the margin: the same answers here, and
    # where an id differs its distance ties with the one it replaces
    assert np.allclose(a_d, b_d, rtol=1e-5, atol=1e-6)
    assert np.mean(a_ids == b_ids) > 0.98


def test_one_query_path_equals_batch(pair):
    metric, (X, Q, _), _, i8 = pair
    ids, dist = i8.search(Q, K, **SEARCH)
    for r in range(12):
        one_ids, one_d = i8.search(Q[r], K, **SEARCH)  # the fused one-query kernel
        assert np.allclose(one_d, dist[r], rtol=1e-5, atol=1e-6)
        same = one_ids == ids[r]
        assert np.allclose(one_d[~same], dist[r][~same], rtol=1e-5, atol=1e-6)  # only ties differ
    # a few queries in one call take the fused few-query kernel; a large batch the serial steps
    few_ids, few_d = i8.search(Q[:3], K, **SEARCH)
    assert np.allclose(few_d, dist[:3], rtol=1e-5, atol=1e-6)


def test_memory_and_stats_count_the_int8_rows(pair):
    metric, (X, _, _), f32, i8 = pair
    n, d = X.shape
    extra = n * (d + 4 + (4 if metric == "l2" else 0))
    assert i8.memory_bytes() - f32.memory_bytes() == extra
    assert i8.stats()["bytes_per_vector_without_reorder"] == pytest.approx(
        f32.stats()["bytes_per_vector_without_reorder"])
    assert f32._st.rerank_int8_codes is None


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(pair, tmp_path, mmap):
    metric, (X, Q, _), _, i8 = pair
    path = tmp_path / "i8.annlib"
    i8.save(path)
    loaded = annlib.load(path, mmap=mmap)
    assert loaded.params["rerank"] == "int8"
    for name in ("rerank_int8_codes", "rerank_int8_scales", "rerank_int8_half_sqnorms"):
        np.testing.assert_array_equal(getattr(loaded._st, name), getattr(i8._st, name))
    a = i8.search(Q, K, **SEARCH)
    b = loaded.search(Q, K, **SEARCH)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.distances, b.distances, rtol=1e-6)


def test_file_written_before_the_option_loads_as_float32(pair, tmp_path):
    metric, (X, Q, _), f32, _ = pair
    path = tmp_path / "f32.annlib"
    f32.save(path)
    header = io.read_index_file(path)
    assert not any(k.startswith("rerank_int8") for k in header["arrays"])  # float32 files unchanged
    params = {k: v for k, v in header["params"].items() if k != "rerank"}  # as earlier releases wrote
    old = tmp_path / "old.annlib"
    io.write_index_file(old, family=header["family"], metric=header["metric"], params=params,
                        meta={k: v for k, v in header["meta"].items()}, arrays=dict(header["arrays"]),
                        library_version="test")
    loaded = annlib.load(old)
    assert loaded.params["rerank"] == "float32"
    np.testing.assert_array_equal(loaded.search(Q, K, **SEARCH).ids, f32.search(Q, K, **SEARCH).ids)


def _rewrite(path, tmp_path, arrays=None, drop=()):
    header = io.read_index_file(path)
    new_arrays = {k: np.array(v) for k, v in header["arrays"].items() if k not in drop}
    new_arrays.update(arrays or {})
    out = tmp_path / "mutated.annlib"
    io.write_index_file(out, family=header["family"], metric=header["metric"], params=header["params"],
                        meta=dict(header["meta"]), arrays=new_arrays, library_version="test")
    return out


@pytest.fixture(scope="module")
def saved_l2(tmp_path_factory):
    g = np.random.default_rng(7)
    X = g.normal(size=(500, 12)).astype(np.float32)
    index = annlib.Partitioned.build(X, num_leaves=10, rerank="int8", default_recall=None)
    path = tmp_path_factory.mktemp("i8") / "l2.annlib"
    index.save(path)
    return path, index


@pytest.mark.parametrize("field, change", [
    ("rerank_int8_codes", lambda a: a.astype(np.int16)),
    ("rerank_int8_codes", lambda a: a[:-1]),
    ("rerank_int8_scales", lambda a: np.where(np.arange(a.shape[0]) == 3, np.nan, a).astype(np.float32)),
    ("rerank_int8_scales", lambda a: -a),
    ("rerank_int8_scales", lambda a: a.astype(np.float64)),
    ("rerank_int8_half_sqnorms", lambda a: a[:0]),
    ("rerank_int8_half_sqnorms", lambda a: np.full_like(a, np.inf)),
])
def test_bad_int8_fields_are_refused_naming_them(saved_l2, tmp_path, field, change):
    path, _ = saved_l2
    arr = np.asarray(io.read_index_file(path)["arrays"][field])
    with pytest.raises(IndexFormatError, match=f"'{field}'"):
        annlib.load(_rewrite(path, tmp_path, arrays={field: change(arr)}))


@pytest.mark.parametrize("field", ["rerank_int8_codes", "rerank_int8_scales", "rerank_int8_half_sqnorms"])
def test_missing_int8_fields_are_named(saved_l2, tmp_path, field):
    path, _ = saved_l2
    with pytest.raises(IndexFormatError, match=f"'{field}'"):
        annlib.load(_rewrite(path, tmp_path, drop=(field,)))


def test_add_maintains_the_int8_rows(tmp_path):
    X, Q, _, _, _ = synthetic_set(3000, 16, 30, "l2", k=K, seed=4)
    first, more = X[:2000], X[2000:]
    index = annlib.Partitioned.build(first, num_leaves=40, rerank="int8", default_recall=None)
    index.add(more)
    fresh = rerank_int8.int8_rows(index._st.vectors, l2=True)
    for got, want in zip(index._st.rerank_rows, fresh):
        np.testing.assert_array_equal(got, want)  # each row coded on its own: add == encode all
    assert index._st.rerank_int8_codes.shape == (3000, 16)
    ids, dist = index.search(Q, K, leaves=10, reorder=80)
    exact = np.take_along_axis(true_distances(X, Q, "l2"), ids, axis=1)
    assert np.allclose(dist, exact, rtol=1e-4, atol=1e-4)
    # an added vector is found as its own nearest neighbour, from the batch and one-query paths
    assert (index.search(more[:20], 1, leaves=10, reorder=80).ids[:, 0] == np.arange(2000, 2020)).all()
    assert index.search(more[5], 1, leaves=10, reorder=80).ids[0] == 2005
    # a far-away added point (an outlier of the codes) keeps an int8 row coded to its own scale
    far = (np.ones((1, 16)) * 500).astype(np.float32)
    index.add(far)
    assert index.search(far[0], 1, leaves=40, reorder=80).ids[0] == 3000
    path = tmp_path / "added.annlib"
    index.save(path)
    np.testing.assert_array_equal(annlib.load(path).search(Q, K, leaves=10, reorder=80).ids,
                                  index.search(Q, K, leaves=10, reorder=80).ids)


def test_filter_keeps_working(pair):
    metric, (X, Q, _), f32, i8 = pair
    allowed = np.arange(X.shape[0]) % 3 == 0
    ids, dist = i8.search(Q, K, filter=allowed, **SEARCH)
    assert (ids >= 0).all() and allowed[ids].all()
    exact = np.take_along_axis(true_distances(X, Q, metric), ids, axis=1)
    assert np.allclose(dist, exact, rtol=1e-4, atol=1e-4)
    ref, _ = f32.search(Q, K, filter=allowed, **SEARCH)
    assert abs(_recall(ids, ref) - 1.0) <= 0.02
    one_ids, _ = i8.search(Q[0], K, filter=allowed, **SEARCH)
    assert allowed[one_ids].all()


@pytest.mark.parametrize("value", ["int4", "INT8", "float16", None, 8])
def test_invalid_rerank_is_refused(value):
    with pytest.raises(ValueError, match="unknown rerank .*accepted: float32, int8"):
        annlib.Partitioned(rerank=value)


def test_int8_quantizer_with_int8_reranking():
    X, Q, gt, _, _ = synthetic_set(2000, 16, 30, "ip", k=K, seed=6)
    a = annlib.Partitioned.build(X, metric="ip", num_leaves=30, quantizer="int8", default_recall=None)
    b = annlib.Partitioned.build(X, metric="ip", num_leaves=30, quantizer="int8", rerank="int8",
                                 default_recall=None)
    ra = _recall(a.search(Q, K, leaves=5, reorder=50).ids, gt)
    rb = _recall(b.search(Q, K, leaves=5, reorder=50).ids, gt)
    assert abs(ra - rb) <= 0.01


def test_recall_floor_on_a_shared_set():
    X, Q, gt, _, metric = read_shared("glove-50-angular-200k", n_queries=200)
    X = X[:50_000]
    exact = np.argsort(true_distances(X, Q, metric), axis=1, kind="stable")[:, :K]
    built = {mode: annlib.Partitioned.build(X, metric=metric, rerank=mode, default_recall=None)
             for mode in ("float32", "int8")}
    rec = {mode: _recall(ix.search(Q, K, leaves=16, reorder=100).ids, exact) for mode, ix in built.items()}
    assert rec["int8"] >= 0.85, rec
    assert abs(rec["int8"] - rec["float32"]) <= 0.01, rec


def test_self_tuned_build_and_threads():
    # the build's self-tune searches the int8 index; a batch split over threads gives the same
    X, Q, gt, _, _ = synthetic_set(3000, 16, 80, "cosine", k=K, seed=8)
    index = annlib.Partitioned.build(X, metric="cosine", rerank="int8", num_leaves=40)
    assert index.tuning is not None
    one = index.search(Q, K)
    two = index.search(Q, K, threads=2)
    np.testing.assert_array_equal(one.ids, two.ids)
    np.testing.assert_allclose(one.distances, two.distances, rtol=1e-6)
    assert _recall(one.ids, gt) >= 0.8
