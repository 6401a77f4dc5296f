"""The one-query path of ``Index.search`` (issue 11, item 2): a single valid float32 query without
a filter is answered by the family's one-query kernel, which checks and prepares the query itself.

Every family and metric: the one-query answer equals the batch path's (same ids; distances within
float tolerance), for 1-D and (1, d) queries, with external ids, after ``add`` and ``delete``, with
cached parameters; filtered single queries agree too; every bad input raises exactly what the
ordinary path raises; the short path is really taken (a spy on the family hook).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import annlib
from annlib.api import get_family

from conftest import family_metrics, small_index

FAMILIES = annlib.families()
CASES = [(f, m) for f in FAMILIES for m in family_metrics(f)]
N, D, NQ = 600, 16, 8


def _data(seed=0, n=N, d=D):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, d)).astype(np.float32), g.normal(size=(NQ, d)).astype(np.float32)


def _build(family, metric, X, **kw):
    if family == "hnsw":
        kw.setdefault("default_recall", None)
        kw.setdefault("finger", True)  # the small test sets would build none by default
    if family == "partitioned":
        kw.setdefault("default_recall", None)
    return small_index(family, X, metric=metric, **kw)


def _exact_params(family):
    # TPUKNN answers one query exactly on the CPU: compare it with its exact batch mode
    return {"recall_target": 1.0} if family == "tpuknn" else {}


class _Spy:
    """Counts the calls of an index's one-query hook and how many it answered."""

    def __init__(self, index):
        self.hook = type(index)._search_one.__get__(index)
        self.calls = self.answered = 0
        index._search_one = self

    def __call__(self, *args):
        self.calls += 1
        out = self.hook(*args)
        self.answered += out is not None
        return out


def _assert_same(one, batch_row, where=""):
    ids, dist = one
    assert ids.dtype == np.int64 and dist.dtype == np.float32, where
    np.testing.assert_array_equal(ids, batch_row.ids if hasattr(batch_row, "ids") else batch_row[0], err_msg=where)
    ref = batch_row.distances if hasattr(batch_row, "distances") else batch_row[1]
    np.testing.assert_allclose(dist, ref, rtol=1e-5, atol=1e-5, err_msg=where)


def _row(res, r):
    return res.ids[r], res.distances[r]


@pytest.mark.parametrize("family,metric", CASES)
def test_one_query_equals_the_batch_path(family, metric):
    X, Q = _data()
    index = _build(family, metric, X)
    params = _exact_params(family)
    batch = index.search(Q, 10, **params)
    spy = _Spy(index)
    for r in range(NQ):
        for q in (Q[r], Q[r:r + 1]):
            res = index.search(q, 10, **params)
            if q.ndim == 2:
                assert res.ids.shape == (1, 10) and res.distances.shape == (1, 10)
                res = (res.ids[0], res.distances[0])
            _assert_same(res, _row(batch, r), f"{family}/{metric} query {r} ndim {q.ndim}")
    assert spy.answered >= 2 * NQ - 2, (spy.calls, spy.answered)  # the first call validates params


@pytest.mark.parametrize("family", FAMILIES)
def test_one_query_with_ids_and_cached_parameters(family):
    X, Q = _data(1)
    ext = np.arange(N, dtype=np.int64) * 7 + 3
    index = _build(family, "l2", X, ids=ext)
    space = index.search_space()["search"]
    params = {**{name: values[len(values) // 2] for name, values in space.items()}, **_exact_params(family)}
    batch = index.search(Q, 5, **params)
    spy = _Spy(index)
    for r in range(NQ):
        res = index.search(Q[r], 5, **params)
        _assert_same(res, _row(batch, r), f"{family} query {r}")
        assert np.isin(res.ids, ext).all()
    assert spy.answered >= NQ - 1
    # the query itself is the nearest vector, under its external id
    res = index.search(X[11], 1, **_exact_params(family))
    assert res.ids[0] == ext[11]


@pytest.mark.parametrize("family,metric", CASES)
def test_one_query_with_a_filter_equals_the_batch_path(family, metric):
    X, Q = _data(2)
    index = _build(family, metric, X)
    params = _exact_params(family)
    g = np.random.default_rng(3)
    for allowed_share in (0.5, 0.02):
        mask = g.random(N) < allowed_share
        batch = index.search(Q, 10, filter=mask, **params)
        for r in range(NQ):
            res = index.search(Q[r], 10, filter=mask, **params)
            _assert_same(res, _row(batch, r), f"{family}/{metric} share {allowed_share} query {r}")
            real = res.ids[res.ids >= 0]
            assert mask[real].all()
        ids = np.flatnonzero(mask)[:5]
        res = index.search(Q[0], 3, filter=ids, **params)
        assert set(res.ids[res.ids >= 0].tolist()) <= set(ids.tolist())


@pytest.mark.parametrize("family,metric", CASES)
def test_one_query_after_add_and_delete(family, metric):
    cls = get_family(family)
    if not (cls.supports_add or cls.supports_delete):
        pytest.skip(f"{family} neither adds nor deletes")
    X, Q = _data(4)
    more = np.random.default_rng(5).normal(size=(200, D)).astype(np.float32)
    index = _build(family, metric, X, ids=np.arange(N))
    params = _exact_params(family)
    index.search(Q[0], 5, **params)  # the short path's state is made for this version
    spy = _Spy(index)
    if cls.supports_add:
        index.add(more, ids=10_000 + np.arange(200))
        # a new vector is found under its new id at once
        res = index.search(more[17], 1, **params)
        assert res.ids[0] == 10_017 and res.distances[0] < 1e-3
    if cls.supports_delete:
        victims = list(range(0, N, 3))
        index.delete(victims)
        res = index.search(X[3], 10, **params)
        assert not np.isin(res.ids, victims).any()
    for step in range(2):
        batch = index.search(Q, 10, **params)
        for r in range(NQ):
            _assert_same(index.search(Q[r], 10, **params), _row(batch, r), f"{family}/{metric} step {step} {r}")
        if step == 0 and cls.supports_delete:
            index.delete(list(range(1, 100, 3)))
        elif step == 0:
            index.add(more[:8] + 1.0, ids=20_000 + np.arange(8))
    assert spy.answered > NQ


@pytest.mark.parametrize("family", FAMILIES)
def test_one_query_after_a_rebuild_with_another_dimension(family):
    X, Q = _data(6)
    index = _build(family, "l2", X)
    index.search(Q[0], 3, **_exact_params(family))
    X2, Q2 = _data(7, n=300, d=24)
    index.build(X2)
    spy = _Spy(index)
    batch = index.search(Q2, 4, **_exact_params(family))
    for r in range(NQ):
        _assert_same(index.search(Q2[r], 4, **_exact_params(family)), _row(batch, r), f"{family} {r}")
    assert spy.answered >= NQ - 1
    with pytest.raises(annlib.errors.DimensionMismatchError):
        index.search(Q[0], 3)


def _error(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - compared by the test
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize("family", FAMILIES)
def test_one_query_raises_as_the_ordinary_path(family):
    X, Q = _data(8)
    index = _build(family, "l2", X)
    index.search(Q[0], 3)  # defaults validated: the short path is open
    spy = _Spy(index)
    q = Q[0].copy()
    big = index._metric.max_abs(D) * 4
    cases = {
        "nan": (np.where(np.arange(D) == 3, np.nan, q).astype(np.float32), 3, {}),
        "inf": (np.where(np.arange(D) == 0, -np.inf, q).astype(np.float32), 3, {}),
        "too large": (np.where(np.arange(D) == 5, big, q).astype(np.float32), 3, {}),
        "k=0": (q, 0, {}),
        "k>n": (q, N + 1, {}),
        "k bool": (q, True, {}),
        "k float": (q, 2.0, {}),
        "dimension": (np.zeros(D + 1, np.float32), 3, {}),
        "2 dims": (np.zeros((1, 1, D), np.float32), 3, {}),
        "threads=0": (q, 3, {"threads": 0}),
        "threads bool": (q, 3, {"threads": True}),
        "unknown parameter": (q, 3, {"bogus": 1}),
    }
    if family == "hnsw":
        cases["ef=0"] = (q, 3, {"ef": 0})
    if family == "partitioned":
        cases["reorder=0"] = (q, 3, {"reorder": 0})
    for name, (query, k, kw) in cases.items():
        fast = _error(lambda: index.search(query, k, **kw))
        # float64 (and a copy) never takes the short path: the ordinary path's own answer
        slow = _error(lambda: index.search(np.array(query, dtype=np.float64), k, **kw))
        assert fast is not None, f"{family} {name}: no error"
        assert fast == slow, f"{family} {name}: {fast} != {slow}"
    assert spy.calls > 0
    # and the index still answers
    np.testing.assert_array_equal(index.search(Q[1], 3).ids, index.search(Q[1:2].astype(np.float64), 3).ids[0])


@pytest.mark.parametrize("updates", [0, 3, 12])
def test_mahalanobis_one_query_under_a_metric_and_its_updates(updates):
    """A full metric, then low-rank updates (held back, then swept into the sketches)."""
    X, Q = _data(14)
    g = np.random.default_rng(15)
    A = g.normal(size=(D, D))
    index = annlib.MahalanobisSketch(M=A @ A.T / D, copies=6, votes=3, m=24, deferred=8, random_state=0).build(X)
    for _ in range(updates):
        index.update_metric(g.normal(size=D) * 0.3)
    index.search(Q[0], 5)
    spy = _Spy(index)
    batch = index.search(Q, 10)
    for r in range(NQ):
        _assert_same(index.search(Q[r], 10), _row(batch, r), f"{updates} updates, query {r}")
    assert spy.answered >= NQ - 1
    exact = index.exact_distances(Q[0])
    res = index.search(Q[0], 10, reorder=N)
    np.testing.assert_allclose(res.distances, np.sort(exact)[:10], rtol=1e-4)


def test_mahalanobis_query_form_limit_raises_as_the_ordinary_path():
    X, Q = _data(9)
    M = np.diag(np.linspace(1.0, 1e30, D))
    index = annlib.MahalanobisSketch(M=M, copies=4, m=16, random_state=0).build(X)
    index.search(Q[0], 3)
    q = np.full(D, 1e5, np.float32)  # q^T M q ~ 1e40, above the limit, every entry in range
    fast = _error(lambda: index.search(q, 3))
    slow = _error(lambda: index.search(q.astype(np.float64), 3))
    assert fast is not None and fast == slow
    assert "x^T M x" in fast[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_queries_the_short_path_does_not_take(family):
    """Arrays the kernels would have to compile again for (non-contiguous, read-only, unaligned,
    other dtypes, subclasses) go the ordinary way and answer the same."""
    X, Q = _data(10)
    index = _build(family, "l2", X)
    params = _exact_params(family)
    want = index.search(Q[2], 5, **params)
    spy = _Spy(index)
    wide = np.repeat(Q, 2, axis=1)
    ro = Q[2].copy()
    ro.flags.writeable = False
    unaligned = np.zeros(D * 4 + 1, np.uint8)[1:].view(np.float32)
    unaligned[:] = Q[2]
    assert not unaligned.flags.aligned
    sub = Q[2].view(type("Sub", (np.ndarray,), {}))
    for q in (wide[2, ::2], ro, unaligned, Q[2].astype(np.float64), Q[2].tolist(), sub):
        res = index.search(q, 5, **params)
        np.testing.assert_array_equal(np.asarray(res.ids).reshape(-1), want.ids)
    assert spy.answered == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_queries_with_another_dtype_object_take_the_short_path(family, tmp_path):
    """Arrays read from HDF5 (``np.array(f["test"])``, as the ann-benchmarks harness reads its
    queries) carry a float32 dtype equal to numpy's but not the same object; they are single
    valid float32 queries and take the short path (they once fell through to the batch path,
    at three times the cost per call)."""
    X, Q = _data(12)
    index = _build(family, "l2", X)
    params = _exact_params(family)
    want = index.search(Q[1], 5, **params)
    spy = _Spy(index)
    other = Q.view(np.dtype(np.float32).newbyteorder("="))  # equal dtype, another object
    assert other.dtype == np.float32 and other.dtype is not np.dtype(np.float32)
    got = index.search(other[1], 5, **params)
    _assert_same((got.ids, got.distances), want)
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "q.hdf5", "w") as f:
        f["test"] = Q
    with h5py.File(tmp_path / "q.hdf5", "r") as f:
        read = np.array(f["test"])
    got = index.search(read[1], 5, **params)
    _assert_same((got.ids, got.distances), want)
    assert spy.answered == 2
    swapped = Q[1].astype(np.dtype(np.float32).newbyteorder(">"))  # not native: the ordinary way
    np.testing.assert_array_equal(index.search(swapped, 5, **params).ids, want.ids)
    assert spy.answered == 2


def test_hnsw_search_stats_count_one_query_searches():
    X, Q = _data(11)
    index = _build("hnsw", "l2", X)
    index.search(Q[0], 5)
    index.reset_search_stats()
    for r in range(NQ):
        index.search(Q[r], 5)
    stats = index.search_stats()
    assert stats["queries"] == NQ and stats["exact_per_query"] > 0
    index.add(Q)  # the counts of the replaced state are kept
    assert index.search_stats()["queries"] == NQ
    index.reset_search_stats()
    assert index.search_stats()["queries"] == 0


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).supports_add])
def test_one_query_searches_while_another_thread_adds(family):
    """Short-path searches and adds in two threads: every answer is a valid row of the index as it
    was before or after an add (the new vectors' own ids, exact distances)."""
    X, Q = _data(12)
    more = np.random.default_rng(13).normal(size=(400, D)).astype(np.float32)
    index = _build(family, "l2", X, ids=np.arange(N))
    params = _exact_params(family)
    index.search(more[0], 1, **params)
    stop = threading.Event()
    errors = []
    added = [0]

    def writer():
        try:
            for lo in range(0, 400, 20):
                index.add(more[lo:lo + 20], ids=10_000 + np.arange(lo, lo + 20))
                added[0] = lo + 20
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))
        finally:
            stop.set()

    th = threading.Thread(target=writer)
    th.start()
    checked = 0
    while not stop.is_set() or checked < 50:
        j = checked % 400
        before = added[0]
        res = index.search(more[j], 1, **params)
        if j < before:  # added before the search began: it is its own nearest neighbour
            assert res.ids[0] == 10_000 + j and res.distances[0] < 1e-3, (family, j, res)
        else:
            assert res.ids[0] >= 0
        checked += 1
    th.join()
    assert not errors, errors


def test_the_read_lock_of_the_short_path():
    """call_read: a writer waits for the readers inside it; while a writer holds the lock or waits
    for it, call_read does not run its function (the caller takes the waiting path)."""
    from annlib._locks import ReadWriteLock

    rw = ReadWriteLock()
    inside, release = threading.Event(), threading.Event()
    order = []

    def reader():
        rw.call_read(lambda: (inside.set(), release.wait(10), order.append("read done")))

    def writer():
        with rw.write():
            order.append("write")

    r = threading.Thread(target=reader)
    r.start()
    assert inside.wait(10)
    w = threading.Thread(target=writer)
    w.start()
    for _ in range(200):  # the writer announces itself and waits for the reader
        if rw._writers_waiting:
            break
        threading.Event().wait(0.005)
    assert rw._writers_waiting == 1 and order == []
    assert rw.call_read(lambda: "ran") is None  # a waiting writer holds new readers back
    release.set()
    r.join(10)
    w.join(10)
    assert order == ["read done", "write"]
    assert rw.call_read(lambda: "ran") == "ran"
    with rw.write():
        assert rw.call_read(lambda: "ran") is None  # the writer's own thread: the nested way
        with rw.read():
            pass
    assert rw._quick == [] and rw._readers == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_one_query_hook_refuses_a_query_of_another_dimension(family):
    """The boundary compares the query's length with the dimension before it takes the lock; the
    kernels check again (a rebuild with another dimension may come in between)."""
    X, Q = _data(16)
    index = _build(family, "l2", X)
    index.search(Q[0], 3)
    sp = index._default_search_params()
    assert index._search_one(Q[0], 3, sp, None) is not None
    for d in (D - 1, D + 1):
        assert index._search_one(np.zeros(d, np.float32), 3, sp, None) is None
