"""Two threads give the results of one: builds and batch searches of every family, and the
kernels whose work is split over worker threads. No timing here (bench/threads_bench.py measures)."""

import numpy as np
import pytest

import annlib
from annlib.kernels.cluster import assign_nearest, assign_top2, kmeans, kmeans_small
from annlib.kernels.quantization import encode_anisotropic, encode_nearest, train_codebooks
from annlib.kernels.soar import soar_assign
from annlib.kernels.threads import run_split, split_ranges


@pytest.fixture(scope="module")
def data():
    g = np.random.default_rng(7)
    centres = g.normal(size=(40, 16)) * 3
    X = (centres[g.integers(0, 40, 6000)] + g.normal(size=(6000, 16))).astype(np.float32)
    Q = (centres[g.integers(0, 40, 300)] + g.normal(size=(300, 16))).astype(np.float32)
    return X, Q


def _both(make, X, Q, **search):
    out = []
    for t in (1, 2):
        index = make().build(X, threads=t)
        res = index.search(Q, k=10, threads=t, **search)
        out.append((np.asarray(res.ids), np.asarray(res.distances)))
    return out


@pytest.mark.parametrize("make, search", [
    (lambda: annlib.BruteForce(metric="l2"), {}),
    (lambda: annlib.HNSW(metric="l2", M=8, ef_construction=40, random_state=0), {"ef": 30}),
    (lambda: annlib.Partitioned(metric="l2", num_leaves=40, random_state=0), {"leaves": 6, "reorder": 40}),
    (lambda: annlib.Partitioned(metric="cosine", num_leaves=40, random_state=0), {"leaves": 6, "reorder": 40}),
    (lambda: annlib.Partitioned(metric="l2", num_leaves=40, quantizer="int8", random_state=0), {"leaves": 6}),
    (lambda: annlib.MahalanobisSketch(M=np.diag(np.linspace(0.5, 2.0, 16)), copies=6, random_state=0), {}),
], ids=["bruteforce", "hnsw", "partitioned-l2", "partitioned-cosine", "partitioned-int8", "mahalanobis"])
def test_two_threads_build_and_search_as_one(data, make, search):
    X, Q = data
    (i1, d1), (i2, d2) = _both(make, X, Q, **search)
    # GEMM blocks of other shapes per thread round differently in the last bit, which may flip a
    # near-tie in a build; everything else is the same computation
    same = i1 == i2
    assert same.mean() >= 0.99, same.mean()
    np.testing.assert_allclose(d1[same], d2[same], rtol=1e-5, atol=1e-5)


def test_two_threads_tpuknn_as_one(data):
    pytest.importorskip("jax")
    X, Q = data
    (i1, d1), (i2, d2) = _both(lambda: annlib.TPUKNN(metric="l2"), X, Q)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_split_kernels_do_not_depend_on_threads(data):
    X, _ = data
    rng = np.random.default_rng(0)
    # GEMM-based steps agree up to rounding (near-ties may flip); the numba-only ones exactly
    C = kmeans(X, 50, iters=3, rng=np.random.default_rng(1))
    np.testing.assert_allclose(kmeans(X, 50, iters=3, rng=np.random.default_rng(1), threads=2), C, rtol=1e-4,
                               atol=1e-4)
    # the distances come from GEMMs of other shapes per thread: equal up to rounding, not bitwise
    (ia, da), (ib, db) = assign_nearest(X, C, block=700), assign_nearest(X, C, block=700, threads=2)
    assert (ia == ib).mean() > 0.999
    np.testing.assert_allclose(da, db, rtol=1e-5, atol=1e-4)
    assert (assign_top2(X, C) == assign_top2(X, C, threads=2)).mean() > 0.999
    prim, _ = assign_nearest(X, C)
    assert (soar_assign(X, C, prim, 1.0, spills=2, block=500)
            == soar_assign(X, C, prim, 1.0, spills=2, block=500, threads=2)).mean() > 0.999
    cb = train_codebooks(X, 2, iters=4, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(cb, train_codebooks(X, 2, iters=4, rng=np.random.default_rng(2), threads=2))
    Xs = np.ascontiguousarray(X[:2000].reshape(2000, 8, 2).transpose(1, 0, 2))
    init = np.ascontiguousarray(Xs[:, :16, :])
    np.testing.assert_array_equal(kmeans_small(Xs, init, 3), kmeans_small(Xs, init, 3, threads=2))
    np.testing.assert_array_equal(encode_nearest(X, cb), encode_nearest(X, cb, threads=2))
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    eta = rng.uniform(1.0, 5.0, len(X)).astype(np.float32)
    np.testing.assert_array_equal(encode_anisotropic(X, U, cb, eta, 4), encode_anisotropic(X, U, cb, eta, 4, threads=2))


def test_fastscan_kernels_do_not_depend_on_threads(data):
    # the 4-bit scan's stages with threads= (one range of queries per worker) against one thread
    from annlib.kernels import fastscan
    from annlib.kernels.quantization import build_luts, pad_columns

    X, Q = data
    index = annlib.Partitioned(metric="l2", num_leaves=40, random_state=0).build(X)
    st = index._st
    D = st.centre_sqnorms[None, :] - 2.0 * (Q @ st.centres.T)
    one = fastscan.select_leaves(D, 6)
    two = fastscan.select_leaves(D, 6, threads=2)
    np.testing.assert_array_equal(one[1], two[1])
    probes = fastscan.Probes(one[1], np.ascontiguousarray(-np.take_along_axis(Q @ st.centres.T, one[1], 1),
                                                          dtype=np.float32))
    Qp = pad_columns(Q, st.padded_dim)
    t1, t2 = build_luts(Qp, st.codebooks), build_luts(Qp, st.codebooks, threads=2)
    for a, b in zip(t1, t2):
        np.testing.assert_array_equal(a, b)
    no_mask = np.zeros(0, dtype=bool)
    c1 = fastscan.scan_pq(t1, probes, st.packed, no_mask, 40, st.num_vectors)
    c2 = fastscan.scan_pq(t1, probes, st.packed, no_mask, 40, st.num_vectors, threads=2)
    np.testing.assert_array_equal(c1[1], c2[1])
    r1 = fastscan.rerank(Q, st.vectors, c1[1], 10, 0)
    r2 = fastscan.rerank(Q, st.vectors, c1[1], 10, 0, threads=2)
    np.testing.assert_array_equal(r1[1], r2[1])
    np.testing.assert_array_equal(r1[0], r2[0])  # the same kernel on the same rows: same sums


def test_run_split_ranges_and_nesting():
    assert split_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert run_split(lambda lo, hi: (lo, hi), 10, 4, min_part=4) == [(0, 5), (5, 10)]
    assert run_split(lambda lo, hi: (lo, hi), 10, 1) == [(0, 10)]
    # a split inside a worker runs on that worker (waiting on its own pool could never finish)
    inner = run_split(lambda lo, hi: run_split(lambda a, b: (a, b), hi - lo, 2), 100, 2)
    assert inner == [[(0, 50)], [(0, 50)]]


def test_hnsw_build_inside_a_worker_thread_runs_its_parts_inline(data):
    # a two-thread HNSW build started from a thread of the worker pool must not wait on the
    # pool it is running in: its parts run on the calling thread instead
    X, Q = data
    ref = annlib.HNSW(metric="l2", M=8, ef_construction=40, random_state=0).build(X[:2000], threads=2)
    import threading

    box = []
    runner = threading.Thread(target=lambda: box.append(run_split(
        lambda lo, hi: annlib.HNSW(metric="l2", M=8, ef_construction=40, random_state=0).build(X[lo:hi], threads=2),
        4000, 2)), daemon=True)
    runner.start()
    runner.join(300)
    assert box, "a build inside a worker thread waited on its own pool"
    out = box[0]
    assert len(out) == 2
    res = out[0].search(Q, k=5, ef=40)
    truth = ref.search(Q, k=5, ef=40)
    assert (np.asarray(res.ids) == np.asarray(truth.ids)).mean() > 0.9


@pytest.mark.parametrize("votes", [1, 3, 2])
def test_median_search_column_split_as_one_thread(votes):
    # two threads share every database block (the products by column ranges, the folds by query
    # ranges): the candidates must be one thread's, across several query and database blocks,
    # with a mask and with duplicated points (exact ties, whose order decides what a heap keeps)
    from annlib.kernels.sketch import MIN_SPLIT_COLUMNS, Sketches, median_search

    g = np.random.default_rng(3)
    L, m, d, n = 6, 8, 12, 3 * MIN_SPLIT_COLUMNS + 517
    P = g.normal(size=(L, m, d)).astype(np.float32)
    X = g.normal(size=(n, d)).astype(np.float32)
    X[1::7] = X[0::7][: X[1::7].shape[0]]  # duplicates
    S = np.ascontiguousarray(np.einsum("jad,nd->jan", P, X), dtype=np.float32)
    sn = np.einsum("jan,jan->jn", S, S).astype(np.float32)
    sk = Sketches(P, S, sn, np.zeros((L, m, 0), np.float32))
    Q = g.normal(size=(150, d)).astype(np.float32)
    sel = np.stack([g.choice(L, votes, replace=False) for _ in range(len(Q))]).astype(np.int64)
    mask = g.random(n) < 0.8
    for kw in ({}, {"mask": mask}):
        one = median_search(Q, sk, sel, 25, query_block=64, db_block=2 * MIN_SPLIT_COLUMNS + 100, **kw)
        two = median_search(Q, sk, sel, 25, query_block=64, db_block=2 * MIN_SPLIT_COLUMNS + 100, threads=2, **kw)
        # the products come from GEMMs over other column ranges: equal up to rounding
        assert (one[1] == two[1]).mean() > 0.99
        np.testing.assert_allclose(one[0], two[0], rtol=1e-5, atol=1e-5)
        if "mask" in kw:
            assert mask[two[1][two[1] >= 0]].all()


def test_hnsw_graph_and_self_tune_independent_of_threads(data, monkeypatch):
    # every reverse-link batch split over the threads (one target row per group is written by
    # one thread), the self-tune's exact truth computed on the threads: the same graph and the
    # same tuned defaults as one thread
    import annlib.kernels.graph as graph_kernels

    monkeypatch.setattr(graph_kernels, "_MIN_GROUPS_PER_CHUNK", 1)
    X, _ = data
    built = [annlib.HNSW(metric="l2", M=8, ef_construction=40, random_state=0).build(X, threads=t) for t in (1, 2)]
    (_, one), (_, two) = (index._state() for index in built)
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)
    assert built[0].default_search_params == built[1].default_search_params


def test_run_split_caller_runs_the_first_range_and_waits_on_failure():
    import threading
    import time

    caller = threading.get_ident()
    seen = run_split(lambda lo, hi: (lo, threading.get_ident()), 10, 2)
    assert [lo for lo, _ in seen] == [0, 5]
    assert seen[0][1] == caller and seen[1][1] != caller
    finished = []

    def part(lo, hi):
        if lo == 0:
            raise RuntimeError("first range")
        time.sleep(0.05)
        finished.append(lo)

    with pytest.raises(RuntimeError, match="first range"):
        run_split(part, 10, 2)
    assert finished == [5]  # the other range was done before the error reached the caller


def test_exact_search_threads_as_one(data):
    # exact_search (the self-tune's truth) splits its scan over the call's threads
    X, Q = data
    index = annlib.HNSW(metric="l2", M=8, ef_construction=40, random_state=0, default_recall=None).build(X)
    one, two = index.exact_search(Q, 10, threads=1), index.exact_search(Q, 10, threads=2)
    same = np.asarray(one.ids) == np.asarray(two.ids)
    assert same.mean() >= 0.999  # GEMMs of other shapes may flip a near-tie
    np.testing.assert_allclose(one.distances, two.distances, rtol=1e-5, atol=1e-5)
