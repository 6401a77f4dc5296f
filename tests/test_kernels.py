"""Kernels against plain numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from annlib.kernels import distances as D
from annlib.kernels.blockwise import exact_search
from annlib.kernels.topk import merge_topk, topk_rows


def ref_proxy(Q, X, proxy):
    Q64, X64 = Q.astype(np.float64), X.astype(np.float64)
    if proxy == 0:
        return ((Q64[:, None] - X64[None]) ** 2).sum(-1)
    return -(Q64 @ X64.T)


@pytest.mark.parametrize("proxy", [0, 1])
def test_distance_kernels_match_numpy(rng, proxy):
    X = rng.normal(size=(300, 37)).astype(np.float32)
    Q = rng.normal(size=(11, 37)).astype(np.float32)
    ref = ref_proxy(Q, X, proxy)
    np.testing.assert_allclose(D.many_to_many(Q, X, proxy), ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(D.one_to_many(Q[0], X, proxy), ref[0], rtol=1e-4, atol=1e-3)
    ids = rng.integers(-1, 300, size=(11, 9))
    got = D.rows_proxy(Q, X, ids, proxy)
    want = np.where(ids >= 0, np.take_along_axis(ref, np.maximum(ids, 0), 1), np.inf)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(D.sqnorms(X), (X.astype(np.float64) ** 2).sum(1), rtol=1e-5)


def test_topk_rows_matches_sort(rng):
    S = rng.normal(size=(40, 500)).astype(np.float32)
    S[3, :] = np.inf
    S[4, 5:] = np.inf
    d, i = topk_rows(S, 10)
    order = np.argsort(S, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(d[5:], np.take_along_axis(S, order, 1)[5:])
    np.testing.assert_array_equal(i[:3], order[:3])
    assert np.all(i[3] == -1) and np.all(np.isinf(d[3]))
    assert sorted(i[4, :5].tolist()) == [0, 1, 2, 3, 4] and np.all(i[4, 5:] == -1)


def test_merge_topk_and_dedup(rng):
    Da = np.sort(rng.random((6, 8)).astype(np.float32), 1)
    Db = np.sort(rng.random((6, 8)).astype(np.float32), 1)
    Ia = rng.permutation(100)[:48].reshape(6, 8).astype(np.int64)
    Ib = 100 + rng.permutation(100)[:48].reshape(6, 8).astype(np.int64)
    d, i = merge_topk(Da, Ia, Db, Ib, 5)
    allD = np.concatenate([Da, Db], 1)
    allI = np.concatenate([Ia, Ib], 1)
    order = np.argsort(allD, 1)[:, :5]
    np.testing.assert_array_equal(i, np.take_along_axis(allI, order, 1))
    # the same id from two sources is kept once with dedup
    d2, i2 = merge_topk(Da, Ia, Da, Ia, 8, dedup=True)
    np.testing.assert_array_equal(i2, Ia)
    d3, i3 = merge_topk(Da, Ia, Da, Ia, 8, dedup=False)
    assert (i3[:, 0] == i3[:, 1]).all()


@pytest.mark.parametrize("nq", [17, 3, 1])  # GEMM path and the fused scan for few queries
@pytest.mark.parametrize("proxy", [0, 1])
@pytest.mark.parametrize("blocks", [(7, 13), (256, 4096), (1, 1)])
def test_exact_search_blocking_and_mask(rng, proxy, blocks, nq):
    X = rng.normal(size=(333, 20)).astype(np.float32)
    Q = rng.normal(size=(nq, 20)).astype(np.float32)
    mask = rng.random(333) < 0.3
    norms = D.sqnorms(X)
    ref = ref_proxy(Q, X, proxy)
    d, i = exact_search(Q, X, norms, 5, proxy, query_block=blocks[0], db_block=blocks[1])
    np.testing.assert_array_equal(i, np.argsort(ref, 1, kind="stable")[:, :5])
    np.testing.assert_allclose(d, np.sort(ref, 1)[:, :5], rtol=1e-5, atol=1e-4)
    d, i = exact_search(Q, X, norms, 5, proxy, mask, query_block=blocks[0], db_block=blocks[1])
    masked = np.where(mask[None], ref, np.inf)
    np.testing.assert_array_equal(i, np.argsort(masked, 1, kind="stable")[:, :5])
    d, i = exact_search(Q, X, norms, 5, proxy, exact_distances=False, query_block=blocks[0], db_block=blocks[1])
    np.testing.assert_allclose(d, np.sort(ref, 1)[:, :5], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("nq", [1, 3, 40, 300])  # scan + row split, GEMM + row split, query split
@pytest.mark.parametrize("workers", [2, 3])
def test_exact_search_workers_equal_one_thread(rng, nq, workers):
    X = rng.normal(size=(2_500, 16)).astype(np.float32)
    Q = rng.normal(size=(nq, 16)).astype(np.float32)
    norms = D.sqnorms(X)
    mask = rng.random(2_500) < 0.5
    for m in (None, mask):
        d1, i1 = exact_search(Q, X, norms, 7, 0, m, db_block=128)
        dw, iw = exact_search(Q, X, norms, 7, 0, m, db_block=128, workers=workers)
        np.testing.assert_array_equal(i1, iw)
        np.testing.assert_array_equal(d1, dw)


@pytest.mark.parametrize("L,t", [(894, 24), (100, 1), (50, 50), (10, 16), (1, 1), (2000, 300)])
def test_smallest_sorted_matches_a_stable_sort(L, t):
    from annlib.kernels.topk import smallest_sorted

    g = np.random.default_rng(L + t)
    for case in range(6):
        row = g.standard_normal(L).astype(np.float32)
        if case == 1:
            row = np.round(row * 3).astype(np.float32)  # many ties
        elif case == 2:
            row[:] = 1.5  # all equal
        elif case == 3:
            row[g.random(L) < 0.2] = np.inf
            row[g.random(L) < 0.1] = np.nan
        elif case == 4:
            row[g.random(L) < 0.2] = -np.inf
        elif case == 5:
            row *= np.float32(1e-30)  # a range the bisection cannot split far
        out_d = np.empty(t, np.float32)
        out_i = np.empty(t, np.int64)
        smallest_sorted(row, t, out_d, out_i)
        finite_or_neg = np.flatnonzero(row < np.inf)
        order = finite_or_neg[np.argsort(row[finite_or_neg], kind="stable")][:t]
        n = len(order)
        np.testing.assert_array_equal(out_i[:n], order)
        np.testing.assert_array_equal(out_d[:n], row[order])
        assert (out_i[n:] == -1).all() and np.isinf(out_d[n:]).all()


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 216, 894])
def test_finite_range_skips_inf_and_nan(n):
    from annlib.kernels.topk import finite_range

    g = np.random.default_rng(n)
    for case in range(4):
        row = g.standard_normal(n + 5).astype(np.float32)  # entries past n must not count
        row[n:] = np.float32(-100.0)
        if case >= 1:
            row[:n][g.random(n) < 0.3] = np.inf
            row[:n][g.random(n) < 0.2] = np.nan
        if case == 2:
            row[:n][g.random(n) < 0.2] = -np.inf
        if case == 3:
            row[:n] = np.inf
        lo, high = finite_range(row, n)
        ok = row[:n][row[:n] < np.inf]
        if ok.size == 0:
            assert lo == np.inf and high == -np.inf
        else:
            assert lo == ok.min() and high == ok.max()


@pytest.mark.parametrize("keep", [1, 7, 100, 250])
def test_candidate_buffer_shrink_keeps_every_entry_at_or_below_its_bar(keep):
    from annlib.kernels.fastscan import _shrink

    g = np.random.default_rng(keep)
    for case in range(4):
        n = 2 * keep + g.integers(0, 33)
        bd = g.standard_normal(n + 5).astype(np.float32)
        if case == 1:
            bd = np.round(bd * 2).astype(np.float32)  # ties
        elif case == 2:
            bd[:] = 0.25  # all equal: the exact fallback
        bi = g.permutation(10 * n)[: n + 5].astype(np.int64)
        slots = np.zeros(10 * n, dtype=np.int32)
        slots[bi[:n]] = np.arange(1, n + 1)
        before_d, before_i = bd[:n].copy(), bi[:n].copy()
        bar, kept = _shrink(bd, bi, n, keep, slots)
        assert keep <= kept <= keep + keep // 4
        kept_i = bi[:kept]
        # every entry better than the kept worst survives, and the best `keep` are among them
        assert set(before_i[np.argsort(before_d, kind="stable")[:keep]]) <= set(kept_i.tolist()) or \
            np.sort(bd[:kept])[:keep].tolist() == np.sort(before_d)[:keep].tolist()
        assert (bd[:kept] <= bar).all() and (before_d[~np.isin(before_i, kept_i)] >= bd[:kept].max()).all()
        np.testing.assert_array_equal(slots[kept_i], np.arange(1, kept + 1))
        gone = np.setdiff1d(before_i, kept_i)
        assert (slots[gone] == 0).all()


@pytest.mark.parametrize("keep", [1, 7, 100, 250])
def test_final_candidate_selection_keeps_exactly_the_best(keep):
    """fastscan._select_best keeps the `keep` smallest (any of equal ones at the boundary), in the
    buffer's order when no tie straddles the boundary, returns the worst kept and keeps the slot
    map right."""
    from annlib.kernels.fastscan import _select_best

    g = np.random.default_rng(keep + 1)
    for case in range(4):
        n = keep + 1 + g.integers(0, keep + 33)
        bd = g.standard_normal(n + 5).astype(np.float32)
        if case == 1:
            bd = np.round(bd * 2).astype(np.float32)  # ties: the quickselect fallback
        elif case == 2:
            bd[:] = 0.25
        elif case == 3:
            bd *= np.float32(1e-30)  # a range the bisection cannot split far
        bi = g.permutation(10 * n)[: n + 5].astype(np.int64)
        slots = np.zeros(10 * n, dtype=np.int32)
        slots[bi[:n]] = np.arange(1, n + 1)
        before_d, before_i = bd[:n].copy(), bi[:n].copy()
        worst = _select_best(bd, bi, n, keep, slots)
        best = np.sort(before_d)[:keep]
        np.testing.assert_array_equal(np.sort(bd[:keep]), best)
        assert worst == best[-1]
        kept_i = bi[:keep]
        lookup = dict(zip(before_i.tolist(), before_d.tolist()))
        assert [lookup[i] for i in kept_i.tolist()] == bd[:keep].tolist()  # ids travel with values
        if case == 0:  # no ties: the buffer's order
            order = np.flatnonzero(before_d <= best[-1])
            np.testing.assert_array_equal(kept_i, before_i[order])
        np.testing.assert_array_equal(slots[kept_i], np.arange(1, keep + 1))
        assert (slots[np.setdiff1d(before_i, kept_i)] == 0).all()


@pytest.mark.parametrize("proxy", [0, 1])
@pytest.mark.parametrize("exact", [True, False])
def test_small_batches_answered_by_numpy_match_the_fold(proxy, exact):
    from annlib.kernels import blockwise
    from annlib.kernels.distances import sqnorms

    rng = np.random.default_rng(7)
    X = rng.standard_normal((500, 12)).astype(np.float32)
    X[250:260] = X[0]  # exact ties
    Q = rng.standard_normal((30, 12)).astype(np.float32)
    mask = rng.random(500) < 0.5
    for k, m in ((10, None), (10, mask), (500, mask), (500, None)):
        assert Q.shape[0] * X.shape[0] <= blockwise.NUMPY_EXACT_WORK
        d_np, i_np = blockwise.exact_search(Q, X, None, k, proxy, m, exact_distances=exact, small_by_numpy=True)
        d_fold, i_fold = blockwise.exact_search(Q, X, sqnorms(X), k, proxy, m, exact_distances=exact)
        assert d_np.dtype == np.float32 and i_np.dtype == np.int64 and d_np.shape == (30, k)
        np.testing.assert_allclose(d_np, d_fold, rtol=1e-4, atol=1e-3)
        assert ((i_np < 0) == (i_fold < 0)).all() and (np.isinf(d_np) == (i_np < 0)).all()
        assert (np.diff(np.where(np.isinf(d_np), np.float32(3e38), d_np), axis=1) >= 0).all()
        # same ids wherever the distance is not tied (within rounding) with a neighbour in the row
        close = np.isclose(d_np[:, 1:], d_np[:, :-1], rtol=1e-4, atol=1e-3)
        tied = np.zeros(d_np.shape, bool)
        tied[:, 1:] |= close
        tied[:, :-1] |= close
        assert (i_np[~tied] == i_fold[~tied]).all()
        if m is not None:
            assert m[i_np[i_np >= 0]].all()
