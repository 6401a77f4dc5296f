"""FINGER: the decomposition identity, the estimator's quality, and equivalences with plain HNSW."""

from __future__ import annotations

import numpy as np
import pytest

from annlib.indexes.hnsw import HNSW
from annlib.kernels.finger import cos_table, edge_payload, estimates_at, new_payload

from conftest import read_shared


@pytest.fixture(scope="module")
def sift():
    X, Q, _, _, metric = read_shared("sift-128-euclidean-10k")
    return X, Q, HNSW(metric=metric, M=16, finger=True, finger_rank=64).build(X)


def _payload(index):
    g = index._g
    n, M0 = g["n"], 2 * g["M"]
    r = g["fB"].shape[0]
    pay = g["fpay"][:n]
    return g, n, M0, r, pay


def test_stored_edge_terms_reproduce_the_distance(sift):
    """|q-e|^2 = (t_q - t_e)^2 |c|^2 + |q_res|^2 + |e_res|^2 - 2 <q_res, e_res> with stored t_e, |e_res|."""
    X, Q, index = sift
    g, n, M0, r, pay = _payload(index)
    rng = np.random.default_rng(0)
    X = g["X"][:n]  # node order (the build renumbers nodes for locality)
    for c in rng.choice(n, 40, replace=False):
        q = Q[rng.integers(len(Q))].astype(np.float64)
        xc = X[c].astype(np.float64)
        cc = xc @ xc
        assert pay[c, 4 * M0 + r] == pytest.approx(cc, rel=1e-5)
        tq = (q @ xc) / cc
        q_res = q - tq * xc
        for s in range(g["links0"][c, 0]):
            e = X[g["links0"][c, 1 + s]].astype(np.float64)
            te, ne = float(pay[c, 2 * M0 + 2 * s]), float(pay[c, 2 * M0 + 2 * s + 1])
            e_res = e - te * xc
            assert np.linalg.norm(e_res) == pytest.approx(ne, rel=1e-3, abs=1e-2)
            rhs = (tq - te) ** 2 * cc + q_res @ q_res + ne * ne - 2 * q_res @ e_res
            assert rhs == pytest.approx(((q - e) ** 2).sum(), rel=1e-3)


def _correlation(index, X, Q, table, fB=None, payload=None):
    """ALGORITHMS §1.9 protocol: the 6 nodes nearest each query as centres, all their edges."""
    g = index._g
    n = g["n"]
    X = g["X"][:n]  # node order
    fB = g["fB"] if fB is None else fB
    codes, pay = (g["fcode"][:n], g["fpay"][:n]) if payload is None else payload
    d2 = ((Q[:, None, :].astype(np.float64) - X[None]) ** 2).sum(-1)
    centres = np.argsort(d2, axis=1)[:, :6]
    Qr = np.repeat(Q, 6, axis=0)
    est, true = estimates_at(Qr, X, g["links0"][:n], centres.ravel().astype(np.int64), 0, fB,
                             codes, pay, table)
    ok = np.isfinite(est) & np.isfinite(true)
    return np.corrcoef(est[ok], true[ok])[0, 1]


def test_estimate_correlates_with_true_distance_sift(sift):
    X, Q, index = sift
    g, n, M0, r, _ = _payload(index)
    assert r == 64
    # the protocol's estimate (distribution matching, without the search-time safety margin)
    corr_svd = _correlation(index, X, Q, cos_table(r, g["fdm"]))
    assert corr_svd >= 0.87  # ALGORITHMS §1.9 measured 0.89-0.90
    # a random orthonormal basis of the same rank, same graph, no distribution matching
    G = np.linalg.qr(np.random.default_rng(1).normal(size=(X.shape[1], r)))[0].T.astype(np.float32)
    codes, pay = new_payload(n, M0, r)
    Xn = g["X"][:n]
    P = np.ascontiguousarray(Xn @ G.T, dtype=np.float32)
    edge_payload(Xn, g["links0"][:n], P, np.arange(n, dtype=np.int64), codes, pay)
    corr_rand = _correlation(index, X, Q, cos_table(r, None), fB=G, payload=(codes, pay))
    assert corr_svd > corr_rand + 0.01, (corr_svd, corr_rand)


def test_lower_bound_table_is_exactly_plain_hnsw(sift):
    """With every cosine estimated as 1 the estimate is a lower bound, so nothing that could
    enter the results is pruned and FINGER must return exactly what the plain walk returns."""
    X, Q, index = sift
    saved = index._g["ftable"]
    try:
        index._g["ftable"] = np.ones_like(saved)
        for ef in (10, 40):
            a = index.search(Q, 10, ef=ef, finger=False)
            b = index.search(Q, 10, ef=ef, finger=True)
            np.testing.assert_array_equal(a.ids, b.ids)
    finally:
        index._g["ftable"] = saved


def test_finger_at_high_ef_returns_the_same_neighbours(sift):
    X, Q, index = sift
    a = index.search(Q, 10, ef=256, finger=False).ids
    b = index.search(Q, 10, ef=256, finger=True).ids
    same = np.mean([set(a[i]) == set(b[i]) for i in range(len(Q))])
    assert same >= 0.99


def test_finger_saves_exact_evaluations_at_equal_recall(sift):
    X, Q, index = sift
    _, _, nb, _, _ = read_shared("sift-128-euclidean-10k")
    out = {}
    for finger in (False, True):
        index.reset_search_stats()
        ids = index.search(Q, 10, ef=64, finger=finger).ids
        rec = np.mean([len(set(ids[i]) & set(nb[i, :10])) / 10 for i in range(len(Q))])
        out[finger] = (rec, index.search_stats()["exact_per_query"])
    assert out[True][0] >= out[False][0] - 0.03
    assert out[True][1] <= 0.7 * out[False][1], out  # measured ~0.55


def test_rank_is_clipped_to_dimension(blobs):
    X, Q = blobs
    index = HNSW(M=8, finger_rank=64).build(X)
    assert index._g["fB"].shape == (X.shape[1], X.shape[1])
    low = HNSW(M=8, finger_rank=8).build(X)
    assert low._g["fB"].shape == (8, X.shape[1])
    assert low.search(Q, 5, ef=32).ids.shape == (len(Q), 5)


def test_finger_payload_follows_add_and_delete(sift):
    """After add and delete, every stored edge term still describes the current graph."""
    X, Q, _ = sift
    index = HNSW(M=8, finger=True).build(X[:3000])
    index.add(X[3000:4000])
    index.delete(np.arange(0, 4000, 9))
    g, n, M0, r, pay = _payload(index)
    fresh_codes, fresh = new_payload(n, M0, r)
    P = np.ascontiguousarray(g["X"][:n] @ g["fB"].T)
    edge_payload(g["X"], g["links0"][:n], P, np.arange(n, dtype=np.int64), fresh_codes, fresh)
    live = ~g["deleted"][:n]
    np.testing.assert_allclose(pay[live], fresh[live], rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(g["fcode"][:n][live], fresh_codes[live])
