"""Typed state of BruteForce, TPUKNN and MahalanobisSketch: load validation, ownership, failed
writes, and searches concurrent with writers (issue 9, items 1-5).

Every test builds small seeded data; nothing here needs ../shared.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import annlib
from annlib import io

FAMILIES = ["bruteforce", "tpuknn", "mahalanobis"]
BUILD = {"bruteforce": {}, "tpuknn": {}, "mahalanobis": {"random_state": 0, "copies": 6, "deferred": 3}}


def needs(family):
    if family == "tpuknn":
        pytest.importorskip("jax")


def build(family, X, **kw):
    needs(family)
    return annlib.Index.build(X, method=family, **{**BUILD[family], **kw})


def data(n=600, d=8, seed=0):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, d)).astype(np.float32)


# ----------------------------------------------------------------------------- tampered files
def rewrite(src, dst, *, arrays=None, meta=None, params=None, drop=()):
    """Copy an index file with some fields changed; the checksums stay valid."""
    h = io.read_index_file(src)
    arrs = {k: np.array(v) for k, v in h["arrays"].items() if k not in drop}
    arrs.update(arrays or {})
    io.write_index_file(dst, family=h["family"], metric=h["metric"], params={**h["params"], **(params or {})},
                        meta={**h["meta"], **(meta or {})}, arrays=arrs, library_version="test")
    return dst


def nan_at(a, where):
    a = np.array(a)
    a[where] = np.nan
    return a


# (name, change(arrays, meta) -> kwargs of rewrite, field the error must name)
PLAIN_CASES = [
    ("too few rows", lambda a, m: {"arrays": {"vectors": a["vectors"][:-1]}}, "vectors"),
    ("extra column", lambda a, m: {"arrays": {"vectors": np.pad(a["vectors"], ((0, 0), (0, 1)))}}, "vectors"),
    ("float64 vectors", lambda a, m: {"arrays": {"vectors": a["vectors"].astype(np.float64)}}, "vectors"),
    ("1-d vectors", lambda a, m: {"arrays": {"vectors": a["vectors"].ravel()}}, "vectors"),
    ("NaN vector", lambda a, m: {"arrays": {"vectors": nan_at(a["vectors"], (3, 2))}}, "vectors"),
    ("overflowing entry", lambda a, m: {"arrays": {"vectors": np.where(np.arange(a["vectors"].size).reshape(
        a["vectors"].shape) == 5, np.float32(1e30), a["vectors"])}}, "vectors"),
    ("header count", lambda a, m: {"meta": {"__n_positions__": m["__n_positions__"] + 1}}, "vectors"),
    ("header dim", lambda a, m: {"meta": {"__dim__": m["__dim__"] - 1}}, "vectors"),
    ("sqnorms length", lambda a, m: {"arrays": {"sqnorms": a["sqnorms"][:-1]}}, "sqnorms"),
    ("sqnorms inf", lambda a, m: {"arrays": {"sqnorms": np.where(np.arange(a["sqnorms"].size) == 7, np.inf,
                                                                  a["sqnorms"]).astype(np.float32)}}, "sqnorms"),
    ("stale sqnorms", lambda a, m: {"arrays": {"sqnorms": a["sqnorms"] * np.float32(2)}}, "sqnorms"),
    ("missing sqnorms", lambda a, m: {"drop": ("sqnorms",)}, "sqnorms"),
    ("int sqnorms", lambda a, m: {"arrays": {"sqnorms": a["sqnorms"].astype(np.int32)}}, "sqnorms"),
]


@pytest.mark.parametrize("family", ["bruteforce", "tpuknn"])
@pytest.mark.parametrize("name, change, field", PLAIN_CASES, ids=[c[0] for c in PLAIN_CASES])
def test_plain_state_refuses_inconsistent_files(tmp_path, family, name, change, field):
    X = data()
    index = build(family, X)
    index.save(tmp_path / "ok.annlib")
    h = io.read_index_file(tmp_path / "ok.annlib")
    bad = rewrite(tmp_path / "ok.annlib", tmp_path / "bad.annlib", **change(h["arrays"], h["meta"]))
    with pytest.raises(annlib.IndexFormatError, match=f"field '{field}'"):
        annlib.load(bad)
    # the untouched file still loads and answers as before
    loaded = annlib.load(tmp_path / "ok.annlib")
    np.testing.assert_array_equal(loaded.search(X[:3], 4).ids, index.search(X[:3], 4).ids)


@pytest.mark.parametrize("family", ["bruteforce", "tpuknn"])
def test_cosine_rows_must_be_unit_vectors(tmp_path, family):
    index = build(family, data(), metric="cosine")
    index.save(tmp_path / "ok.annlib")
    h = io.read_index_file(tmp_path / "ok.annlib")
    vec = np.array(h["arrays"]["vectors"]) * np.float32(3)
    bad = rewrite(tmp_path / "ok.annlib", tmp_path / "bad.annlib",
                  arrays={"vectors": vec, "sqnorms": (vec.astype(np.float64) ** 2).sum(1).astype(np.float32)})
    with pytest.raises(annlib.IndexFormatError, match="field 'vectors': row 0 of a cosine index is not a unit"):
        annlib.load(bad)


def with_byte(a, value):
    b = np.array(a)
    b.view(np.uint8)[0] = value
    return b


def scaled(a, name, factor):
    return {"arrays": {name: np.array(a[name]) * np.asarray(factor, dtype=a[name].dtype)}}


SKETCH_CASES = [
    ("sketches: one copy less", lambda a, m: {"arrays": {"sketches": a["sketches"][:-1]}}, "sketches"),
    ("sketches: one point less", lambda a, m: {"arrays": {"sketches": a["sketches"][:, :, :-1]}}, "sketches"),
    ("sketches: rows", lambda a, m: {"arrays": {"sketches": a["sketches"][:, :-1]}}, "sketches"),
    ("sketches: NaN", lambda a, m: {"arrays": {"sketches": nan_at(a["sketches"], (1, 2, 3))}}, "sketches"),
    ("sketch norms: shape", lambda a, m: {"arrays": {"sketch_sqnorms": a["sketch_sqnorms"][:, :-1]}},
     "sketch_sqnorms"),
    ("sketch norms: inf", lambda a, m: scaled(a, "sketch_sqnorms", np.inf), "sketch_sqnorms"),
    ("maps: dimension", lambda a, m: {"arrays": {"maps": a["maps"][:, :, :-1]}}, "maps"),
    ("maps: rows", lambda a, m: {"arrays": {"maps": a["maps"][:, :-1]}}, "sketch_rows"),
    ("maps: NaN", lambda a, m: {"arrays": {"maps": nan_at(a["maps"], (0, 0, 0))}}, "maps"),
    ("factor: dimension", lambda a, m: {"arrays": {"factor": a["factor"][:, :-1]}}, "factor"),
    ("factor: float32", lambda a, m: {"arrays": {"factor": a["factor"].astype(np.float32)}}, "factor"),
    ("factor: no rows", lambda a, m: {"arrays": {"factor": a["factor"][:0]}}, "factor"),
    ("matrix: shape", lambda a, m: {"arrays": {"matrix": a["matrix"][:, :-1]}}, "matrix"),
    ("matrix: not U^T U", lambda a, m: scaled(a, "matrix", 1.5), "matrix"),
    ("matrix: NaN", lambda a, m: {"arrays": {"matrix": nan_at(a["matrix"], (1, 1))}}, "matrix"),
    ("quadforms: length", lambda a, m: {"arrays": {"quadforms": a["quadforms"][:-1]}}, "quadforms"),
    ("quadforms: negative", lambda a, m: scaled(a, "quadforms", -1.0), "quadforms"),
    ("quadforms: overflow", lambda a, m: scaled(a, "quadforms", 1e40), "quadforms"),
    ("deleted: length", lambda a, m: {"arrays": {"deleted": a["deleted"][:-1]}}, "deleted"),
    ("deleted: byte 2", lambda a, m: {"arrays": {"deleted": with_byte(a["deleted"], 2)}}, "deleted"),
    ("deleted: uint8", lambda a, m: {"arrays": {"deleted": a["deleted"].astype(np.uint8)}}, "deleted"),
    ("deleted count", lambda a, m: {"meta": {"deleted_count": m["deleted_count"] + 1}}, "deleted_count"),
    ("pending above room", lambda a, m: {"meta": {"pending": 4}}, "pending"),
    ("pending negative", lambda a, m: {"meta": {"pending": -1}}, "pending"),
    ("pending text", lambda a, m: {"meta": {"pending": "1"}}, "pending"),
    ("pending bool", lambda a, m: {"meta": {"pending": True}}, "pending"),
    ("pending columns", lambda a, m: {"arrays": {"pending_columns": a["pending_columns"][:, :, :-1]}},
     "pending_columns"),
    ("sketch rows text", lambda a, m: {"meta": {"sketch_rows": str(m["sketch_rows"])}}, "sketch_rows"),
    ("identity claimed", lambda a, m: {"meta": {"identity": True}}, "factor"),
    ("l2 name with a metric", lambda a, m: {"meta": {"mahalanobis": False}}, "mahalanobis"),
    ("identity text", lambda a, m: {"meta": {"identity": "no"}}, "identity"),
    ("seed differs", lambda a, m: {"meta": {"seed": m["seed"] + 1}}, "seed"),
    ("seed lost", lambda a, m: {"params": {"random_state": None}}, "seed"),
    ("seed missing", lambda a, m: {"meta": {"seed": None}}, "seed"),
    ("copies changed", lambda a, m: {"params": {"copies": 5}}, "maps"),
    ("deferred changed", lambda a, m: {"params": {"deferred": 2}}, "sketches"),
    ("vectors overflow", lambda a, m: scaled(a, "vectors", 1e30), "vectors"),
    ("missing maps", lambda a, m: {"drop": ("maps",)}, "maps"),
]


@pytest.fixture(scope="module")
def sketch_file(tmp_path_factory):
    """A MahalanobisSketch with a deletion and a pending metric update, saved."""
    X = data(400, 6, seed=3)
    g = np.random.default_rng(1)
    A = g.normal(size=(6, 6))
    index = annlib.MahalanobisSketch(M=A @ A.T, **BUILD["mahalanobis"]).build(X)
    index.delete([5])
    index.update_metric(g.normal(size=6) * 0.1)
    assert index._st.pending == 1 and index._st.deleted_count == 1
    path = tmp_path_factory.mktemp("sketch") / "ok.annlib"
    index.save(path)
    return index, path, X


@pytest.mark.parametrize("name, change, field", SKETCH_CASES, ids=[c[0] for c in SKETCH_CASES])
def test_sketch_state_refuses_inconsistent_files(tmp_path, sketch_file, name, change, field):
    index, path, X = sketch_file
    h = io.read_index_file(path)
    bad = rewrite(path, tmp_path / "bad.annlib", **change(h["arrays"], h["meta"]))
    with pytest.raises(annlib.IndexFormatError, match=f"field '{field}'"):
        annlib.load(bad)


def test_sketch_file_round_trip(sketch_file):
    index, path, X = sketch_file
    for mmap in (False, True):
        loaded = annlib.load(path, mmap=mmap)
        assert loaded._st.pending == 1 and len(loaded) == len(index) and loaded.seed == index.seed
        np.testing.assert_array_equal(loaded.search(X[:5], 4).ids, index.search(X[:5], 4).ids)
        np.testing.assert_array_equal(loaded.estimate(X[:2]), index.estimate(X[:2]))


# ----------------------------------------------------------------------------- ownership (item 4)
@pytest.mark.parametrize("family", FAMILIES)
def test_changing_the_callers_array_changes_nothing(family):
    X = data()
    Q = X[:6].copy()
    index = build(family, X)
    before = index.search(Q, 5)
    extra = data(50, seed=9)
    index.add(extra)
    after_add = index.search(Q, 5)
    X[:] = 0.0  # the caller reuses both buffers
    extra[:] = 7.0
    now = index.search(Q, 5)
    np.testing.assert_array_equal(now.ids, after_add.ids)
    np.testing.assert_array_equal(now.distances, after_add.distances)
    np.testing.assert_array_equal(before.ids[:, 0], np.arange(6))


@pytest.mark.parametrize("family", FAMILIES)
def test_read_only_and_memory_mapped_inputs(tmp_path, family):
    X = data()
    path = tmp_path / "x.f32"
    X.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)
    ro = X.copy()
    ro.setflags(write=False)
    ref = build(family, X).search(X[:4], 3)
    for given in (ro, mapped):
        index = build(family, given)
        index.add(given[:10])
        got = index.search(X[:4], 3)
        np.testing.assert_allclose(got.distances[:, 0], 0.0, atol=1e-3)
        assert set(got.ids[:, 0].tolist()) | set(got.ids[:, 1].tolist()) >= set(ref.ids[:, 0].tolist())
    assert not ro.flags.writeable and np.array_equal(np.asarray(mapped), X)


# ----------------------------------------------------------------------------- failed writes (item 3)
def snapshot(index, Q):
    r = index.search(Q, 4)
    return len(index), index.n_positions, r.ids.copy(), r.distances.copy()


def assert_same(a, b):
    assert a[:2] == b[:2]
    np.testing.assert_array_equal(a[2], b[2])
    np.testing.assert_array_equal(a[3], b[3])


class Boom(RuntimeError):
    pass


def boom(*args, **kwargs):
    raise Boom("simulated failure (e.g. out of memory)")


@pytest.mark.parametrize("family", FAMILIES)
def test_failed_build_and_add_leave_the_index_unchanged(monkeypatch, family):
    X = data()
    index = build(family, X)
    before = snapshot(index, X[:3])
    # where each family computes what it stores (the vector states share annlib._state)
    module, target = {"bruteforce": ("annlib._state", "_sqnorms"), "tpuknn": ("annlib._state", "_sqnorms"),
                      "mahalanobis": (type(index).__module__, "sketch_points")}[family]
    with monkeypatch.context() as mp:
        mp.setattr(f"{module}.{target}", boom)
        with pytest.raises(Boom):
            index.build(data(300, seed=4))
        with pytest.raises(Boom):
            index.add(data(20, seed=5))
    assert_same(snapshot(index, X[:3]), before)
    if family == "tpuknn":  # the device copy is replaced, not modified: a failed append keeps it
        from annlib.accel.sharding import DeviceDatabase

        db = index._db
        with monkeypatch.context() as mp:
            mp.setattr(DeviceDatabase, "appended", boom)
            with pytest.raises(Boom):
                index.add(data(20, seed=5))
        assert index._db is db
        assert_same(snapshot(index, X[:3]), before)
    index.add(data(20, seed=5))  # and it still works
    assert len(index) == len(X) + 20


def test_failed_sketch_updates_leave_the_index_unchanged(monkeypatch):
    X = data()
    index = build("mahalanobis", X)
    before = snapshot(index, X[:3])
    est = index.estimate(X[:2])
    state = index._st
    module = "annlib.indexes.mahalanobis"
    with monkeypatch.context() as mp:
        mp.setattr(f"{module}.sketch_points", boom)
        with pytest.raises(Boom):
            index.update_point([1, 2], X[3:5] * 2)
        mp.setattr(f"{module}.gaussian_columns", boom)
        with pytest.raises(Boom):
            index.update_metric(np.ones(8))
        mp.setattr(f"{module}.row_combinations", boom)  # after the new metric is computed
        with pytest.raises(Boom):
            index.update_metric(np.ones(8), row=0)
    assert index._st is state
    assert_same(snapshot(index, X[:3]), before)
    np.testing.assert_array_equal(index.estimate(X[:2]), est)


# ----------------------------------------------------------------------------- concurrency (items 1-3)
DURATION = 3.0


def check_rows(ids, dist, k, where):
    """Shape, -1 only as padding, unique ids, ascending distances; returns the real ids per row."""
    assert ids.shape == dist.shape and ids.shape[1] == k, where
    for r in range(ids.shape[0]):
        real = ids[r][ids[r] >= 0]
        assert (ids[r][real.size:] == -1).all(), (where, ids[r])
        assert len(set(real.tolist())) == real.size, (where, ids[r])
        d = dist[r][: real.size].astype(np.float64)
        assert np.isfinite(d).all(), (where, dist[r])
        assert (np.diff(d) >= -1e-6 * np.abs(d[1:]) - 1e-6).all(), (where, dist[r])


def run_threads(searcher, writer, n_searchers=3, writer_done=None, min_writes=20, min_searches=30):
    """Run ``n_searchers`` threads calling ``searcher(rng, t)`` while one calls ``writer(rng)`` for
    :data:`DURATION` seconds, longer (up to 10x) on a machine so busy that fewer than
    ``min_writes`` writes or ``min_searches`` searches overlapped; re-raise the first error.
    ``writer_done`` is set when the writer stops. Returns (searches per thread, writes)."""
    errors, stop = [], threading.Event()
    counts = [0] * n_searchers
    writes = [0]

    def guard(fn, *args):
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            stop.set()

    def search_loop(t):
        g = np.random.default_rng(100 + t)
        while not stop.is_set():
            searcher(g, t)
            counts[t] += 1

    def write_loop():
        g = np.random.default_rng(7)
        start = time.monotonic()
        try:
            while not stop.is_set():
                elapsed = time.monotonic() - start
                enough = writes[0] >= min_writes and sum(counts) >= min_searches
                if elapsed > 10 * DURATION or (elapsed > DURATION and enough):
                    break
                writer(g)
                writes[0] += 1
        finally:
            stop.set()
            if writer_done is not None:
                writer_done.set()

    threads = [threading.Thread(target=guard, args=(search_loop, t)) for t in range(n_searchers)]
    threads.append(threading.Thread(target=guard, args=(write_loop,)))
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    if errors:
        raise errors[0]
    assert min(counts) > 0, counts
    assert writes[0] >= min_writes and sum(counts) >= min_searches, (writes, counts)
    return counts, writes[0]


@pytest.mark.parametrize("family", ["bruteforce", "tpuknn"])
def test_searches_while_adding(family):
    """3 searchers and 1 writer adding batches (with ids): every row valid and exact-scored."""
    d, n0, k = 12, 1500, 10
    pool = data(n0 + 3000, d, seed=11)
    index = build(family, pool[:n0], ids=np.arange(n0) * 3)
    added = [n0]
    base_kth = {}

    def searcher(g, t):
        rows = g.integers(0, n0, size=int(g.choice([1, 4, 9])))
        Q = pool[rows] + g.normal(size=(rows.size, d)).astype(np.float32) * 0.1
        ids, dist = index.search(Q, k)
        check_rows(ids, dist, k, family)
        assert (ids % 3 == 0).all() and ids.max() < 3 * len(pool), ids
        X = pool[ids // 3].astype(np.float64)
        true = np.sqrt(((X - Q[:, None, :].astype(np.float64)) ** 2).sum(-1))
        np.testing.assert_allclose(dist, true, rtol=1e-4, atol=1e-4)
        if family == "bruteforce":  # exact: never worse than the first n0 points alone
            for r, row in enumerate(rows):
                key = (int(row), Q[r].tobytes())
                if key not in base_kth:
                    D = np.sqrt(((pool[:n0].astype(np.float64) - Q[r].astype(np.float64)) ** 2).sum(-1))
                    base_kth[key] = np.sort(D)[k - 1]
                assert dist[r, -1] <= base_kth[key] * (1 + 1e-5) + 1e-5

    def writer(g):
        m = int(g.integers(1, 40))
        a = added[0]
        if a + m > len(pool):
            time.sleep(0.01)
            return
        index.add(pool[a:a + m], ids=np.arange(a, a + m) * 3)
        added[0] = a + m
        time.sleep(0.002)

    run_threads(searcher, writer, min_writes=10)
    assert len(index) == added[0] and index.n_positions == added[0]
    ids, _ = index.search(pool[added[0] - 1], 1)
    assert ids[0] == 3 * (added[0] - 1)


def test_mahalanobis_searches_estimates_and_updates_concurrently():
    """3 readers (search, exact_distances, estimate) and 1 writer (add, delete, update_point,
    update_metric). Each reader result must match one of the index versions that existed while
    it ran: ids live in it, distances equal to that version's exact Mahalanobis distances."""
    d, n0, k = 8, 800, 8
    g0 = np.random.default_rng(3)
    X0 = g0.normal(size=(n0, d)).astype(np.float32)
    A = g0.normal(size=(d, d)) / np.sqrt(d)
    index = annlib.MahalanobisSketch(M=A @ A.T + 0.1 * np.eye(d), random_state=0, copies=6, deferred=2).build(X0)
    history = [(X0.copy(), index.M, np.ones(n0, bool))]  # version v = history[v]
    writer_done = threading.Event()

    def versions(v0, v1):
        out = []
        for v in range(v0, v1 + 2):
            while len(history) <= v and not writer_done.is_set():
                time.sleep(0.001)
            if v < len(history):
                out.append(history[v])
        return out

    def exact(Xv, Mv, Q, cols):
        diff = Q[:, None, :].astype(np.float64) - Xv[cols].astype(np.float64)
        return np.sqrt(np.maximum(np.einsum("qcd,de,qce->qc", diff, Mv, diff), 0.0))

    def fits(Xv, Mv, live, Q, ids, dist):
        if ids.max() >= len(live) or not live[ids].all():
            return False
        want = exact(Xv, Mv, Q, ids)
        return bool(np.allclose(dist, want, rtol=1e-4, atol=1e-4 * max(1.0, float(want.max()))))

    def searcher(g, t):
        Q = g.normal(size=(int(g.choice([1, 3])), d)).astype(np.float32)
        v0 = len(history) - 1
        if t == 0:
            ids, dist = index.search(Q, k, reorder=40)
            v1 = len(history) - 1
            check_rows(ids, dist, k, "search")
            assert (ids >= 0).all()
            assert any(fits(Xv, Mv, live, Q, ids, dist) for Xv, Mv, live in versions(v0, v1)), "search"
        elif t == 1:
            out = index.exact_distances(Q)
            v1 = len(history) - 1
            ok = False
            for Xv, Mv, live in versions(v0, v1):
                if out.shape[1] != len(live) or not np.isinf(out[:, ~live]).all():
                    continue
                cols = np.flatnonzero(live)
                want = exact(Xv, Mv, Q, np.broadcast_to(cols, (Q.shape[0], cols.size)))
                ok = ok or bool(np.allclose(out[:, cols], want, rtol=1e-6, atol=1e-6 * max(1.0, float(want.max()))))
            assert ok, "exact_distances"
        else:
            est = index.estimate(Q)
            v1 = len(history) - 1
            ok = False
            for Xv, Mv, live in versions(v0, v1):
                if est.shape[1] == len(live) and np.isinf(est[:, ~live]).all() and np.isfinite(est[:, live]).all():
                    ok = True
            assert ok, "estimate"

    def writer(g):
        Xv, Mv, live = history[-1]
        Xv, live = Xv.copy(), live.copy()
        step = len(history) % 4
        alive = np.flatnonzero(live)
        if step == 0:
            new = g.normal(size=(5, d)).astype(np.float32)
            index.add(new)
            Xv, live = np.concatenate([Xv, new]), np.concatenate([live, np.ones(5, bool)])
        elif step == 1:
            gone = g.choice(alive, 2, replace=False)
            index.delete(gone)
            live[gone] = False
        elif step == 2:
            pos = g.choice(alive, 2, replace=False)
            new = g.normal(size=(2, d)).astype(np.float32)
            index.update_point(pos, new)
            Xv[pos] = new
        elif len(history) % 8 == 3:
            index.update_metric(g.normal(size=d) * 0.05)
        else:
            index.update_metric(g.normal(size=d) * 0.05, row=int(g.integers(0, d)))
        history.append((Xv, index.M, live))
        time.sleep(0.001)

    counts, writes = run_threads(searcher, writer, writer_done=writer_done)
    assert len(history) == writes + 1
    Xv, Mv, live = history[-1]
    assert len(index) == live.sum() and index.n_positions == len(live)
