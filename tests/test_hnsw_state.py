"""HNSW state: validation of loaded files, concurrency, ownership of input, failure atomicity,
reproducible load-then-add, deletion bookkeeping and the filter policy (issue 9).

All on small seeded data; nothing here needs ../shared.
Builds pass ``default_recall=None`` (no self-tuning: not what these tests are about).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import annlib
from annlib import io
from annlib.errors import IndexFormatError
from annlib.indexes import hnsw as hnsw_module
from annlib.indexes.hnsw import HNSW, HNSWGraph

from conftest import synthetic_set, true_distances


@pytest.fixture(scope="module")
def data():
    X, Q, _, _, _ = synthetic_set(2400, 16, 40, k=10, seed=21)
    return X, Q


def _copy_state(index):
    meta, arrays = index._state()
    return meta, {k: np.array(v) for k, v in arrays.items()}


def _assert_same_state(a, b):
    (ma, sa), (mb, sb) = a, b
    assert ma == mb
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


# ============================================================================ typed state
@pytest.mark.parametrize("finger", [False, True])
def test_state_is_typed_and_valid_after_every_change(data, finger):
    X, Q = data
    index = HNSW(default_recall=None, M=8, finger=finger, random_state=1).build(X[:1500])
    g = index._graph
    assert isinstance(g, HNSWGraph) and (g.finger is not None) == finger
    g.validate(index.dim, index.n_positions)
    index.add(X[1500:1700])
    index._graph.validate(index.dim, index.n_positions)
    index.delete(np.arange(0, 1700, 5))
    index._graph.validate(index.dim, index.n_positions)
    meta, arrays = index._graph.to_file()
    back = HNSWGraph.from_file(meta, arrays, M=8, seed=0)
    back.validate(index.dim, index.n_positions)
    assert back.n == index._graph.n and back.entry == index._graph.entry
    assert back.rng.bit_generator.state == index._graph.rng.bit_generator.state


# ============================================================================ item 3: load
def _write(path, header, meta=None, arrays=None):
    io.write_index_file(path, family=header["family"], metric=header["metric"], params=header["params"],
                        meta=header["meta"] if meta is None else meta,
                        arrays=header["arrays"] if arrays is None else arrays, library_version="test")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data):
    """A saved index (FINGER rank 8, some deletions, ids) and its header as read back."""
    X, _ = data
    index = HNSW(finger=True, default_recall=None, M=6, finger_rank=8, random_state=2).build(X[:600], ids=np.arange(600) * 3)
    index.delete(np.arange(0, 1800, 21))
    path = tmp_path_factory.mktemp("hnsw") / "ok.annlib"
    index.save(path)
    return path, io.read_index_file(path)


def _mutations(meta, arrays):
    """(field named by the error, mutated meta, mutated arrays) for every invariant."""
    n = meta["n"]
    M = 6
    lv = arrays["levels"]
    entry = meta["entry"]
    dead = np.flatnonzero(arrays["deleted"])
    live = np.flatnonzero(~arrays["deleted"])
    up = arrays["upper"]
    rows = meta["rows"]
    # an upper row of a level-1 list, and a node that only lives on layer 0
    low_node = int(np.flatnonzero(lv == 0)[0])
    row1 = int(np.flatnonzero(up[:rows, 0] > 0)[0])

    def a(name, fn):
        out = {k: np.array(v) for k, v in arrays.items()}
        fn(out[name]) if name in out else None
        return out

    def setv(idx, value):
        def fn(arr):
            arr[idx] = value
        return fn

    yield "links0", meta, a("links0", setv((5, 1), n))                 # neighbour id out of range
    yield "links0", meta, a("links0", setv((5, 1), -1))
    yield "links0", meta, a("links0", setv((7, 0), 2 * M + 1))         # count beyond capacity
    yield "links0", meta, a("links0", setv((7, 0), -3))
    yield "upper", meta, a("upper", setv((row1, 1), n + 5))            # upper neighbour out of range
    yield "upper", meta, a("upper", setv((row1, 0), M + 1))            # upper count beyond capacity
    yield "upper", meta, a("upper", setv((row1, 1), low_node))         # neighbour not on that layer
    yield "entry", {**meta, "entry": n}, arrays                        # entry out of range
    yield "entry", {**meta, "entry": -1}, arrays
    yield "entry", {**meta, "entry": int(dead[0])}, arrays             # entry deleted
    yield "max_level", {**meta, "max_level": meta["max_level"] + 1}, arrays
    other = int(live[lv[live] < lv[entry]][0])
    yield "max_level", {**meta, "entry": other}, arrays                # entry not on the top level
    yield "levels", meta, a("levels", setv(3, 31))                     # level out of range
    yield "levels", meta, a("levels", setv(3, -1))
    yield "ustart", meta, a("ustart", setv(int(np.argmax(arrays["ustart"])), rows + 40))  # past the end
    yield "ustart", meta, a("ustart", setv(slice(None), 0))
    yield "rows", {**meta, "rows": rows - 1}, a("upper", lambda arr: None) | {"upper": up[:rows - 1]}
    yield "upper", {**meta, "rows": rows + 3}, arrays                  # upper shorter than rows
    yield "n", {**meta, "n": n + 1}, arrays                            # meta n vs arrays
    yield "vectors", meta, {**arrays, "vectors": arrays["vectors"][:-1]}
    yield "levels", meta, {**arrays, "levels": arrays["levels"][:-2]}
    yield "deleted", meta, {**arrays, "deleted": arrays["deleted"][:-1]}
    yield "links0", meta, {**arrays, "links0": arrays["links0"].astype(np.int64)}
    yield "links0", meta, {**arrays, "links0": arrays["links0"][:, :-1]}
    yield "vectors", meta, a("vectors", setv((2, 3), np.nan))
    yield "vectors", meta, {**arrays, "vectors": arrays["vectors"][:, :-1]}
    yield "node_positions", meta, a("node_positions", setv(0, 1))     # not a permutation
    yield "node_positions", meta, a("node_positions", setv(0, n))
    yield "node_positions", meta, {**arrays, "node_positions": arrays["node_positions"][:-1]}
    yield "n_deleted", {**meta, "n_deleted": meta["n_deleted"] + 1}, arrays
    yield "deleted", meta, {**arrays, "deleted": np.where(arrays["deleted"], 2, 0).astype(np.uint8).view(np.bool_)}
    yield "finger_basis", meta, a("finger_basis", setv((0, 0), np.inf))
    yield "finger_basis", meta, {**arrays, "finger_basis": arrays["finger_basis"][:, :-1]}
    yield "finger_basis", meta, {**arrays, "finger_basis": np.zeros((0, arrays["vectors"].shape[1]), np.float32)}
    yield "finger_table", meta, a("finger_table", setv(2, np.nan))
    yield "finger_table", meta, {**arrays, "finger_table": arrays["finger_table"][:-1]}
    yield "finger_payload", meta, {**arrays, "finger_payload": arrays["finger_payload"][:, :-1]}
    yield "finger_payload", meta, {**arrays, "finger_payload": arrays["finger_payload"][:-1]}
    yield "finger_payload", meta, a("finger_payload", setv((4, 0), np.uint64(1) << np.uint64(40)))  # bit >= rank
    nan_bits = np.array([np.nan, np.nan], np.float32).view(np.uint64)[0]
    yield "finger_payload", meta, a("finger_payload", setv((4, 2 * M), nan_bits))  # NaN edge term
    yield "finger_payload", meta, {k: v for k, v in arrays.items() if k != "finger_payload"}
    yield "finger_dm", {**meta, "finger_dm": [1.0, float("nan"), 0.0, 1.0]}, arrays
    yield "finger_dm", {**meta, "finger_dm": "x"}, arrays
    yield "level_rng_state", {**meta, "level_rng_state": {"bit_generator": "MT19937"}}, arrays
    yield "level_rng_state", {**meta, "level_rng_state": {"bit_generator": "PCG64", "state": 3}}, arrays
    yield "entry", {k: v for k, v in meta.items() if k != "entry"}, arrays
    yield "rows", {**meta, "rows": "12"}, arrays


def test_every_invariant_is_checked_on_load(saved, tmp_path):
    """Item 3: a file with valid checksums whose contents disagree is refused naming the field
    (before, such files segfaulted or returned garbage on the first search)."""
    path, header = saved
    loaded = annlib.load(path)
    assert len(loaded) == 600 - len(range(0, 600, 7))
    meta, arrays = header["meta"], header["arrays"]
    count = 0
    for field_name, m, arrs in _mutations(meta, arrays):
        bad = tmp_path / f"bad{count}.annlib"
        _write(bad, header, m, arrs)
        count += 1
        with pytest.raises(IndexFormatError) as err:
            annlib.load(bad)
        assert repr(field_name) in str(err.value), (count, field_name, str(err.value))
    assert count >= 40


def test_unmodified_rewrite_loads(saved, tmp_path):
    """The rewriting itself is faithful (so the refusals above are about the mutations)."""
    path, header = saved
    again = tmp_path / "same.annlib"
    _write(again, header)
    a, b = annlib.load(path), annlib.load(again)
    Q = header["arrays"]["vectors"][:20]
    np.testing.assert_array_equal(a.search(Q, 5).ids, b.search(Q, 5).ids)


def test_file_without_finger_or_generator_state_loads(saved, tmp_path):
    """Files of earlier releases (no saved generator) and indexes without FINGER load."""
    path, header = saved
    meta = {k: v for k, v in header["meta"].items() if k != "level_rng_state"}
    arrays = {k: v for k, v in header["arrays"].items() if not k.startswith("finger_")}
    plain = tmp_path / "plain.annlib"
    _write(plain, header, meta, arrays)
    index = annlib.load(plain)
    Q = header["arrays"]["vectors"][:20]
    assert index._graph.finger is None
    assert (index.search(Q, 5, finger=True).ids >= 0).all()
    index.add(Q + 0.1, ids=np.arange(20) + 10_000)


# ============================================================================ item 1: concurrency
def _check_rows(ids, dist, Q, vectors, limit, dead_before, allowed=None):
    """Every row: ids known when the search ended and not deleted before it started, unique,
    -1 only as trailing padding, distances ascending and equal to recomputed ones."""
    for r in range(ids.shape[0]):
        row, drow = ids[r], dist[r]
        valid = row >= 0
        n_valid = int(valid.sum())
        assert valid[:n_valid].all(), f"-1 inside a row: {row}"
        row, drow = row[:n_valid], drow[:n_valid]
        assert (row < limit).all(), f"garbage id {row.max()} (only {limit} ever added)"
        assert len(set(row.tolist())) == n_valid, f"duplicate ids {row}"
        assert not set(row.tolist()) & dead_before, "an id deleted before the search was returned"
        if allowed is not None:
            assert set(row.tolist()) <= allowed
        assert (np.diff(drow) >= -1e-5 * (1 + np.abs(drow[1:]))).all(), f"distances not sorted {drow}"
        true = np.sqrt(((vectors[row].astype(np.float64) - Q[r].astype(np.float64)) ** 2).sum(1))
        np.testing.assert_allclose(drow, true, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("finger", [False, True])
def test_search_while_adding_and_deleting(finger):
    """Item 1: 4 searcher threads and one writer (add + delete) for ~3 s; every row checked.

    Before the reader-writer lock, a search could read arrays that add reallocated: SIGSEGV,
    or KeyError / IndexError inside search."""
    rng = np.random.default_rng(5)
    pool, Qs, _, _, _ = synthetic_set(9000, 16, 64, k=10, seed=22)
    n0 = 1500
    index = HNSW(default_recall=None, M=8, ef_construction=64, finger=finger, random_state=3).build(pool[:n0])
    state = {"added": n0, "dead": set(), "stop": False, "searches": 0, "rows": 0, "writes": 0}
    lock = threading.Lock()
    errors = []

    def writer():
        try:
            nxt = n0
            while not state["stop"] and nxt + 150 <= len(pool):
                with lock:
                    state["added"] = nxt + 150  # ids this add may publish
                index.add(pool[nxt:nxt + 150])
                nxt += 150
                with lock:
                    alive = np.setdiff1d(np.arange(nxt), np.fromiter(state["dead"], np.int64, len(state["dead"])))
                gone = rng.choice(alive, 60, replace=False)
                index.delete(gone)
                with lock:
                    state["dead"].update(int(v) for v in gone)
                    state["writes"] += 1
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(f"writer: {exc!r}")

    def searcher(t):
        g = np.random.default_rng(100 + t)
        try:
            while not state["stop"]:
                nq = int(g.choice([1, 3, 16]))
                Q = Qs[g.integers(0, len(Qs), nq)]
                with lock:
                    dead_before = set(state["dead"])
                    known = state["added"]
                use_filter = g.random() < 0.25
                allowed = None
                kwargs = {}
                if use_filter:
                    allowed_ids = g.choice(known, max(10, known // int(g.choice([2, 50]))), replace=False)
                    allowed = set(allowed_ids.tolist())
                    kwargs["filter"] = allowed_ids
                ids, dist = index.search(Q, 10, ef=int(g.choice([10, 32, 64])), finger=finger, **kwargs)
                with lock:
                    limit = state["added"]
                _check_rows(np.atleast_2d(ids), np.atleast_2d(dist), Q, pool, limit, dead_before, allowed)
                with lock:
                    state["searches"] += 1
                    state["rows"] += nq
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(f"searcher {t}: {exc!r}")

    threads = [threading.Thread(target=searcher, args=(t,)) for t in range(4)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    # at least 3 s, and on a slow or busy machine (kernels compiling) until enough work overlapped
    start = time.monotonic()
    while time.monotonic() - start < 3.0 or (
            (state["writes"] < 3 or state["searches"] < 40) and time.monotonic() - start < 90.0 and not errors):
        time.sleep(0.05)
    state["stop"] = True
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert state["writes"] >= 3 and state["searches"] >= 40, state
    # the index is consistent afterwards
    index._graph.validate(index.dim, index.n_positions)
    ids, _ = index.search(Qs, 10)
    assert not set(ids.ravel().tolist()) & state["dead"]


def test_concurrent_searches_share_the_scratch_pool_safely(data):
    """Searches from several threads at once give exactly the single-threaded answers, and the
    statistics count every query once."""
    X, Q = data
    index = HNSW(finger=True, default_recall=None, M=8, random_state=4).build(X)
    expected = {ef: index.search(Q, 10, ef=ef) for ef in (16, 48)}
    single = {ef: [index.search(Q[i], 10, ef=ef).ids for i in range(8)] for ef in (16, 48)}
    index.reset_search_stats()
    errors = []

    def run(t):
        try:
            for it in range(15):
                ef = (16, 48)[(t + it) % 2]
                got = index.search(Q, 10, ef=ef)
                np.testing.assert_array_equal(got.ids, expected[ef].ids)
                np.testing.assert_array_equal(got.distances, expected[ef].distances)
                i = (t * 3 + it) % 8
                np.testing.assert_array_equal(index.search(Q[i], 10, ef=ef).ids, single[ef][i])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    assert index.search_stats()["queries"] == 4 * 15 * (len(Q) + 1)


# ============================================================================ item 4: ownership
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_build_never_writes_or_keeps_the_callers_array(data, tmp_path, metric):
    """Item 4: a read-only array and a read-only memmap build (and add) fine; the caller's array
    is never written, and changing it afterwards does not change the index."""
    X, Q = data
    X = X[:800]
    reference = HNSW(finger=True, default_recall=None, metric=metric, M=8, random_state=6).build(X.copy())
    ro = X.copy()
    ro.setflags(write=False)
    a = HNSW(finger=True, default_recall=None, metric=metric, M=8, random_state=6).build(ro)
    path = tmp_path / "x.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=X.shape)
    mm[:] = X
    mm.flush()
    del mm
    ro_map = np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)
    b = HNSW(finger=True, default_recall=None, metric=metric, M=8, random_state=6).build(ro_map)
    np.testing.assert_array_equal(np.asarray(ro_map), X)
    want = reference.search(Q, 10, ef=32)
    for index in (a, b):
        got = index.search(Q, 10, ef=32)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.distances, want.distances)
    a.add(ro[:50])
    b.add(ro_map[:50])
    # a writable input: untouched by build, and later changes to it do not reach the index
    w = X.copy()
    c = HNSW(finger=True, default_recall=None, metric=metric, M=8, random_state=6).build(w)
    np.testing.assert_array_equal(w, X)
    w[:] = 0.0
    np.testing.assert_array_equal(c.search(Q, 10, ef=32).ids, want.ids)


def test_failed_rebuild_keeps_the_old_index(data):
    """Item 4: a rebuild that raises (here from the progress callback) leaves the old index
    searchable and unchanged."""
    X, Q = data
    index = HNSW(finger=True, default_recall=None, M=8, random_state=7).build(X[:1000])
    before = _copy_state(index)
    want = index.search(Q, 10, ef=32)

    def boom(done, total):
        if done > 200:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        index.build(X[1000:2400], progress=boom)
    assert len(index) == 1000
    _assert_same_state(_copy_state(index), before)
    np.testing.assert_array_equal(index.search(Q, 10, ef=32).ids, want.ids)


@pytest.mark.parametrize("finger", [False, True])
def test_failed_add_leaves_the_index_unchanged(data, finger):
    """An add that raises part-way (after rows of existing nodes were rewritten in place)
    restores them: same state, same answers, and the next add equals one never interrupted."""
    X, Q = data
    a = HNSW(default_recall=None, M=8, finger=finger, random_state=8).build(X[:1000])
    a.add(X[1000:1100])  # leaves spare capacity, so the next add works in place
    b = HNSW(default_recall=None, M=8, finger=finger, random_state=8).build(X[:1000])
    b.add(X[1000:1100])
    shared = a._graph
    before = _copy_state(a)
    want = a.search(Q, 10, ef=32)
    calls = []

    def boom(done, total):
        calls.append(done)
        if len(calls) == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        a.add(X[1100:1300], progress=boom)
    assert len(a) == 1100 and a.n_positions == 1100
    _assert_same_state(_copy_state(a), before)
    np.testing.assert_array_equal(a.search(Q, 10, ef=32).ids, want.ids)
    a.add(X[1100:1300])
    # the add ran in place (both link arrays had room), the case the row backup is for
    assert a._graph.links_layer0 is shared.links_layer0 and a._graph.links_upper is shared.links_upper
    b.add(X[1100:1300])
    _assert_same_state(_copy_state(a), _copy_state(b))


@pytest.mark.parametrize("kernel", ["repair_deleted", "edge_payload"])
def test_failed_delete_leaves_the_index_unchanged(data, monkeypatch, kernel):
    X, Q = data
    index = HNSW(finger=True, default_recall=None, M=8, random_state=9).build(X[:1200])
    before = _copy_state(index)
    want = index.search(Q, 10, ef=32)
    real = getattr(hnsw_module, kernel)
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2 or kernel == "edge_payload":
            raise MemoryError("simulated")
        return real(*args)

    monkeypatch.setattr(hnsw_module, kernel, failing)
    gone = np.arange(0, 1200, 3)
    with pytest.raises(MemoryError):
        index.delete(gone)
    monkeypatch.setattr(hnsw_module, kernel, real)
    assert len(index) == 1200
    _assert_same_state(_copy_state(index), before)
    np.testing.assert_array_equal(index.search(Q, 10, ef=32).ids, want.ids)
    index.delete(gone)  # nothing was marked deleted by the failed call
    assert len(index) == 800


# ============================================================================ item 7
@pytest.mark.parametrize("random_state", [13, None, "generator"])
@pytest.mark.parametrize("mmap", [False, True])
def test_load_then_add_equals_add(data, tmp_path, random_state, mmap):
    """Item 7: build -> save -> load -> add gives the graph and answers of build -> add (the
    level generator's state travels in the file)."""
    X, Q = data
    rs = np.random.default_rng(3) if random_state == "generator" else random_state
    a = HNSW(finger=True, default_recall=None, M=8, random_state=rs).build(X[:1000])
    path = tmp_path / "a.annlib"
    a.save(path)
    b = annlib.load(path, mmap=mmap)
    for lo, hi in ((1000, 1300), (1300, 1310)):
        a.add(X[lo:hi])
        b.add(X[lo:hi])
    a.delete([5, 1200])
    b.delete([5, 1200])
    _assert_same_state(_copy_state(a), _copy_state(b))
    ra, rb = a.search(Q, 10, ef=32), b.search(Q, 10, ef=32)
    np.testing.assert_array_equal(ra.ids, rb.ids)
    np.testing.assert_array_equal(ra.distances, rb.distances)


# ============================================================================ deletion rule
def test_delete_twice_raises_in_node_order(data):
    """_is_deleted translates positions to nodes (the build renumbers nodes breadth-first):
    every deleted id is refused a second time, every live one is still accepted."""
    X, _ = data
    ext = np.arange(1000) * 5 + 1
    index = HNSW(finger=True, default_recall=None, M=8, random_state=10).build(X[:1000], ids=ext)
    g = index._graph
    assert g.node_positions is not None and (g.node_positions != np.arange(1000)).any()
    gone = ext[np.random.default_rng(0).choice(1000, 50, replace=False)]
    index.delete(gone)
    for v in gone[:10]:
        with pytest.raises(ValueError, match=f"id {v} was already deleted"):
            index.delete([v])
    with pytest.raises(ValueError, match="already deleted"):
        index.delete([ext[0] if ext[0] not in gone else ext[1], gone[20]])
    assert len(index) == 950  # the mixed call deleted nothing
    survivors = np.setdiff1d(ext, gone)[:10]
    index.delete(survivors)
    assert len(index) == 940
    index.delete([])  # an empty set of ids is a no-op


# ============================================================================ filter policy
def test_filter_policy_scan_and_walk(data):
    """Very selective filters are answered by the base's exact scan (so exactly), wider ones by
    the walk, which still never returns a disallowed or deleted id."""
    X, Q = data
    index = HNSW(finger=True, default_recall=None, M=8, random_state=11).build(X)
    n = len(X)
    assert index._scan_is_cheaper(40, 10, {"ef": 64, "finger": True})  # 40^2 <= 3*64*n
    assert not index._scan_is_cheaper(n // 2, 10, {"ef": 64, "finger": True})
    few = np.random.default_rng(1).choice(n, 7, replace=False)
    ids, dist = index.search(Q, 10, ef=64, filter=few)
    D = true_distances(X[few], Q, "l2")
    order = np.argsort(D, axis=1)
    np.testing.assert_array_equal(ids[:, :7], few[order])
    assert (ids[:, 7:] == -1).all() and np.isinf(dist[:, 7:]).all()
    half = np.zeros(n, bool)
    half[::2] = True
    index.delete(np.arange(0, n, 4))
    assert not index._scan_is_cheaper(n // 4, 10, {"ef": 10, "finger": True})  # the walk
    ids, _ = index.search(Q, 10, ef=10, filter=half)
    assert (ids >= 0).all() and (ids % 2 == 0).all() and not (ids % 4 == 0).any()
    live = index._live_mask()
    assert live.shape == (n,) and live.sum() == n - len(range(0, n, 4)) and not live[::4].any()
    np.testing.assert_array_equal(index._vectors_at(np.array([3, 7])), X[[3, 7]])
