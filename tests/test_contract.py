"""The contract every registered family must pass (docs/api.md: build, search, errors, persistence).

A new family is done when it passes this file: add an entry to CASES with small-data build
parameters, search parameters that give high recall, and parameters that must be refused.
"""

from __future__ import annotations

import numpy as np
import pytest

import annlib
from annlib.api import get_family

from conftest import true_distances

# family -> build params for 2,000 x 24 data, search params for high recall, the recall floor at
# those params, (build, search) parameter sets that must raise ValueError (the message must name
# the parameter), and the metrics the family supports.
CASES = {
    "bruteforce": dict(build={}, search={}, min_recall=1.0, bad_build=[], bad_search=[]),
    "mahalanobis": dict(build={"random_state": 0}, search={"reorder": 100}, min_recall=0.99,
                        bad_build=[{"eps": 0.0}, {"delta": 1.0}, {"copies": 0}, {"votes": 2}, {"m": 0}],
                        bad_search=[{"reorder": 0}], metrics=["l2"]),
    "hnsw": dict(build={"M": 12, "random_state": 0}, search={"ef": 96}, min_recall=0.98,
                 bad_build=[{"M": 1}, {"ef_construction": 0}, {"finger_rank": 65}],
                 bad_search=[{"ef": 0}]),
    "tpuknn": dict(build={}, search={"recall_target": 0.95}, min_recall=0.95,
                   bad_build=[{"recall_target": 0.0}, {"dtype": "float16"}, {"shards": 0}],
                   bad_search=[{"recall_target": 1.5}]),
    "partitioned": dict(build={"num_leaves": 20, "random_state": 0}, search={"leaves": 20, "reorder": 200},
                        min_recall=0.99, bad_build=[{"num_leaves": 0}, {"spill": "all"}, {"soar_lambda": -1.0}],
                        bad_search=[{"leaves": 0}, {"reorder": 0}]),
}
DEFAULT_CASE = dict(build={}, search={}, min_recall=0.9, bad_build=[], bad_search=[], metrics=["l2", "cosine", "ip"])
FAMILIES = annlib.families()
METRICS = ["l2", "cosine", "ip"]


def case(family):
    return {**DEFAULT_CASE, **CASES.get(family, {})}


def build(family, X, metric="l2", **kw):
    c = case(family)
    return annlib.Index.build(X, method=family, metric=metric, **c["build"], **kw)


def search(index, family, Q, k, **kw):
    return index.search(Q, k, **case(family)["search"], **kw)


@pytest.fixture(scope="module")
def built(blobs):
    X, _ = blobs
    return {(f, m): build(f, X, m) for f in FAMILIES for m in case(f)["metrics"]}


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("family", FAMILIES)
def test_build_and_search_shapes_recall(built, blobs, family, metric):
    X, Q = blobs
    if metric not in case(family)["metrics"]:
        with pytest.raises(ValueError, match="metric"):
            build(family, X, metric)
        return
    index = built[(family, metric)]
    assert len(index) == X.shape[0] and index.dim == X.shape[1] and index.metric == metric
    assert index.memory_bytes() >= X.nbytes // 8
    ids, dist = search(index, family, Q, 10)
    assert ids.dtype == np.int64 and dist.dtype == np.float32
    assert ids.shape == (len(Q), 10) and dist.shape == (len(Q), 10)
    assert np.all(np.diff(dist, axis=1) >= -1e-6), "distances not sorted best first"
    for row in ids:
        assert len(set(row.tolist())) == 10
    assert ids.min() >= 0 and ids.max() < len(X)
    true = true_distances(X, Q, metric)
    # the returned distances are the true distances of the returned ids
    np.testing.assert_allclose(dist, np.take_along_axis(true, ids, 1), rtol=1e-4, atol=2e-4)
    kth = np.sort(true, axis=1)[:, 9]
    recall = np.mean(np.take_along_axis(true, ids, 1) <= kth[:, None] + 1e-3)
    assert recall >= case(family)["min_recall"]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_dimensional_query(built, blobs, family):
    X, Q = blobs
    index = built[(family, "l2")]
    ids, dist = search(index, family, Q[3], 5)
    assert ids.shape == (5,) and dist.shape == (5,)
    ids_b, dist_b = search(index, family, Q[3:4], 5)
    np.testing.assert_array_equal(ids, ids_b[0])
    np.testing.assert_allclose(dist, dist_b[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_build_by_class_equals_build_by_name(blobs, family):
    X, Q = blobs
    cls = get_family(family)
    a = build(family, X, "l2")
    b = cls.build(X, metric="l2", **case(family)["build"])
    c = cls(metric="l2", **case(family)["build"]).build(X)
    ra, rb, rc = (search(i, family, Q, 5) for i in (a, b, c))
    np.testing.assert_array_equal(ra.ids, rb.ids)
    np.testing.assert_array_equal(ra.ids, rc.ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_filter_mask_and_ids(built, blobs, family):
    X, Q = blobs
    index = built[(family, "l2")]
    even = np.arange(len(X)) % 2 == 0
    ids, dist = search(index, family, Q, 10, filter=even)
    assert np.all(ids % 2 == 0)
    allowed = np.array([5, 17, 400, 1999, 10**9])  # an unknown id is ignored
    ids, dist = search(index, family, Q, 10, filter=allowed)
    assert ids.shape == (len(Q), 10)
    assert set(ids[:, :4].ravel().tolist()) <= {5, 17, 400, 1999}
    assert np.all(ids[:, 4:] == -1) and np.all(np.isinf(dist[:, 4:]))
    np.testing.assert_array_equal(np.sort(ids[:, :4], axis=1), np.tile([5, 17, 400, 1999], (len(Q), 1)))


@pytest.mark.parametrize("family", FAMILIES)
def test_external_ids(blobs, family):
    X, Q = blobs
    ext = 10_000 + 3 * np.arange(len(X))
    plain = build(family, X)
    with_ids = build(family, X, ids=ext)
    r0 = search(plain, family, Q, 10)
    r1 = search(with_ids, family, Q, 10)
    np.testing.assert_array_equal(r1.ids, ext[r0.ids])
    np.testing.assert_allclose(r1.distances, r0.distances)
    r2 = search(with_ids, family, Q, 10, filter=ext[:100])
    assert np.isin(r2.ids, ext[:100]).all()


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_identical(built, blobs, family, tmp_path, mmap):
    X, Q = blobs
    for metric in case(family)["metrics"]:
        index = built[(family, metric)]
        path = tmp_path / f"{family}-{metric}.annlib"
        index.save(path)
        loaded = annlib.load(path, mmap=mmap)
        assert type(loaded) is type(index)
        assert (len(loaded), loaded.dim, loaded.metric, loaded.params) == (len(index), index.dim, metric, index.params)
        a, b = search(index, family, Q, 10), search(loaded, family, Q, 10)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.distances, b.distances)


@pytest.mark.parametrize("family", FAMILIES)
def test_add_or_clear_refusal(blobs, family):
    X, Q = blobs
    index = build(family, X[:1500])
    if not get_family(family).supports_add:
        with pytest.raises(NotImplementedError, match="families that can add"):
            index.add(X[1500:])
        assert len(index) == 1500
        return
    index.add(X[1500:])
    assert len(index) == len(X)
    ids, dist = search(index, family, X[1500:1550], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(1500, 1550))


@pytest.mark.parametrize("family", FAMILIES)
def test_search_space_shape(blobs, family):
    X, _ = blobs
    cls = get_family(family)
    for space in (cls.search_space(), build(family, X).search_space()):
        assert set(space) == {"build", "search"}
        assert set(space["search"]) <= set(cls.search_defaults)
        assert set(space["build"]) <= set(cls.build_defaults)
        for values in list(space["build"].values()) + list(space["search"].values()):
            assert isinstance(values, list) and values


def _expect(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_error_row(built, blobs, family):
    """The error table of docs/api.md, every row, for this family; the index is unchanged afterwards."""
    X, Q = blobs
    index = built[(family, "l2")]
    before = search(index, family, Q, 5)
    bad = Q.copy()
    bad[2, 3] = np.nan
    _expect(ValueError, "NaN or inf; the first bad row is 2", index.search, bad, 5)
    bad[2, 3] = np.inf
    _expect(ValueError, "first bad row is 2", index.search, bad, 5)
    badX = X[:100].copy()
    badX[7, 0] = np.inf
    _expect(ValueError, "first bad row is 7", annlib.Index.build, badX, method=family, **case(family)["build"])
    _expect(ValueError, "2-D array", index.search, Q[None], 5)
    _expect(ValueError, "zero rows", index.search, np.zeros((0, X.shape[1]), np.float32), 5)
    _expect(ValueError, "zero columns", annlib.Index.build, np.zeros((10, 0), np.float32), method=family)
    _expect(ValueError, r"dimension 23 but the index holds vectors of dimension 24", index.search, Q[:, :23], 5)
    _expect(TypeError, "real numeric dtype", index.search, Q.astype(object), 5)
    _expect(TypeError, "real numeric dtype", index.search, Q.astype(np.complex64), 5)
    _expect(TypeError, "real numeric dtype", index.search, np.array([["a"] * 24]), 5)
    _expect(ValueError, r"k must be >= 1; got k=0", index.search, Q, 0)
    _expect(ValueError, rf"k=2001 is larger than the number of indexed vectors \({len(X)}\)", index.search, Q, 2001)
    _expect(ValueError, "unknown metric 'hamming'; accepted: ", annlib.Index.build, X, method=family, metric="hamming")
    _expect(ValueError, "unknown method 'annoy'; accepted: .*bruteforce", annlib.Index.build, X, method="annoy")
    _expect(ValueError, r"unknown parameter\(s\) bogus", annlib.Index.build, X, method=family, bogus=1)
    _expect(ValueError, r"unknown parameter\(s\) bogus", index.search, Q, 5, bogus=1)
    for params in case(family)["bad_build"]:
        _expect(ValueError, list(params)[0], annlib.Index.build, X, method=family, **{**case(family)["build"], **params})
    for params in case(family)["bad_search"]:
        _expect(ValueError, list(params)[0], index.search, Q, 5, **params)
    if get_family(family).supports_add:
        _expect(ValueError, "first bad row is 2", index.add, bad)
        _expect(ValueError, "dimension", index.add, X[:5, :10])
    after = search(index, family, Q, 5)
    assert len(index) == len(X)
    np.testing.assert_array_equal(before.ids, after.ids)


def test_add_refusal_names_capable_families(blobs):
    """A family without add() raises NotImplementedError naming the families that can."""
    X, _ = blobs

    class Frozen(annlib.BruteForce):
        supports_add = False

    index = Frozen().build(X)
    with pytest.raises(NotImplementedError, match="Frozen does not support add\\(\\); families that can add: .*bruteforce"):
        index.add(X[:3])
    assert len(index) == len(X)


def test_not_built_and_bad_ids(blobs):
    X, Q = blobs
    with pytest.raises(annlib.NotBuiltError, match="not been built"):
        annlib.BruteForce().search(Q, 3)
    _expect(ValueError, "distinct; id 4 is repeated", annlib.BruteForce.build, X[:3], ids=[4, 4, 5])
    _expect(ValueError, "ids must be >= 0", annlib.BruteForce.build, X[:3], ids=[-2, 4, 5])
    _expect(ValueError, r"one id per vector \(3\)", annlib.BruteForce.build, X[:3], ids=[1, 2])
    _expect(TypeError, "ids must be integers", annlib.BruteForce.build, X[:3], ids=[1.5, 2, 3])
    idx = annlib.BruteForce.build(X[:3], ids=[10, 11, 12])
    _expect(ValueError, "ids already in the index: 11", idx.add, X[3:5], ids=[11, 13])
    _expect(ValueError, "needs ids", idx.add, X[3:5])
    assert len(idx) == 3
    idx.add(X[3:5], ids=[20, 21])
    np.testing.assert_array_equal(idx.search(X[4], 1).ids, [21])
    _expect(ValueError, "one entry per indexed vector", idx.search, X[:2], 2, filter=np.ones(3, bool))
    _expect(TypeError, "boolean mask or an integer array", idx.search, X[:2], 2, filter=np.ones(5, float))
    _expect(ValueError, "threads must be >= 1", idx.search, X[:2], 2, threads=0)
    _expect(TypeError, "progress must be", annlib.BruteForce.build, X[:3], progress="yes")
