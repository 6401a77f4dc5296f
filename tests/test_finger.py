"""FINGER: the decomposition identity, the estimator's quality, and equivalences with plain HNSW.

The identities and equivalences run on seeded synthetic data; the estimator's quality on real
SIFT vectors (the protocol's reference numbers) is marked ``shared_data``.
Builds pass ``default_recall=None`` (no self-tuning: not what these tests are about).
"""

from __future__ import annotations

import numpy as np
import pytest

from annlib.indexes.hnsw import HNSW
from annlib.kernels.finger import FingerArrays, cos_table, edge_payload, estimates_at

from conftest import read_shared, synthetic_set


@pytest.fixture(scope="module")
def synth():
    X, Q, nb, _, _ = synthetic_set(6000, 48, 100, k=10, seed=11)
    return X, Q, nb, HNSW(default_recall=None, M=16, finger=True, finger_rank=48).build(X)


@pytest.fixture(scope="module")
def sift():
    X, Q, nb, _, metric = read_shared("sift-128-euclidean-10k")
    return X, Q, nb, HNSW(default_recall=None, metric=metric, M=16, finger=True, finger_rank=64).build(X)


def _payload(index):
    g = index._graph
    n, M0 = g.n, 2 * g.M
    return g, n, M0, g.finger.rank, g.finger.payload[:n]


def test_stored_edge_terms_reproduce_the_distance(synth):
    """|q-e|^2 = (t_q - t_e)^2 |c|^2 + |q_res|^2 + |e_res|^2 - 2 <q_res, e_res> with stored t_e, |e_res|."""
    _, Q, _, index = synth
    g, n, M0, r, pay = _payload(index)
    rng = np.random.default_rng(0)
    X = g.vectors[:n]  # node order (the build renumbers nodes for locality)
    for c in rng.choice(n, 40, replace=False):
        q = Q[rng.integers(len(Q))].astype(np.float64)
        xc = X[c].astype(np.float64)
        cc = xc @ xc
        assert pay[c, 4 * M0 + r] == pytest.approx(cc, rel=1e-5)
        tq = (q @ xc) / cc
        q_res = q - tq * xc
        for s in range(g.links_layer0[c, 0]):
            e = X[g.links_layer0[c, 1 + s]].astype(np.float64)
            te, ne = float(pay[c, 2 * M0 + 2 * s]), float(pay[c, 2 * M0 + 2 * s + 1])
            e_res = e - te * xc
            assert np.linalg.norm(e_res) == pytest.approx(ne, rel=1e-3, abs=1e-2)
            rhs = (tq - te) ** 2 * cc + q_res @ q_res + ne * ne - 2 * q_res @ e_res
            assert rhs == pytest.approx(((q - e) ** 2).sum(), rel=1e-3)


def _correlation(index, Q, table, fB=None, codes=None):
    """Correlation of estimated and true distances: the 6 nodes nearest each query as centres, all
    their edges."""
    g = index._graph
    n = g.n
    X = g.vectors[:n]  # node order
    fB = g.finger.basis if fB is None else fB
    codes = g.finger.codes[:n] if codes is None else codes
    d2 = ((Q[:, None, :].astype(np.float64) - X[None]) ** 2).sum(-1)
    centres = np.argsort(d2, axis=1)[:, :6]
    Qr = np.repeat(Q, 6, axis=0)
    finger = FingerArrays(fB, codes, codes.view(np.float32), table)
    est, true = estimates_at(Qr, X, g.links_layer0[:n], centres.ravel().astype(np.int64), 0, finger)
    ok = np.isfinite(est) & np.isfinite(true)
    return np.corrcoef(est[ok], true[ok])[0, 1]


def _svd_vs_random_basis(index, Q):
    g, n, M0, r, _ = _payload(index)
    # the protocol's estimate (distribution matching, without the search-time safety margin)
    corr_svd = _correlation(index, Q, cos_table(r, g.finger.distribution))
    # a random orthonormal basis of the same rank, same graph, no distribution matching
    d = g.vectors.shape[1]
    G = np.linalg.qr(np.random.default_rng(1).normal(size=(d, r)))[0].T.astype(np.float32)
    Xn = g.vectors[:n]
    P = np.ascontiguousarray(Xn @ G.T, dtype=np.float32)
    codes = edge_payload(Xn, g.links_layer0[:n], P, np.arange(n, dtype=np.int64))
    corr_rand = _correlation(index, Q, cos_table(r, None), fB=G, codes=codes)
    return corr_svd, corr_rand


@pytest.mark.shared_data
def test_estimate_correlates_with_true_distance_sift(sift):
    _, Q, _, index = sift
    assert index._graph.finger.rank == 64
    corr_svd, corr_rand = _svd_vs_random_basis(index, Q)
    assert corr_svd >= 0.87  # measured 0.89-0.90 with rank 64 on sift-128-euclidean-10k
    assert corr_svd > corr_rand + 0.01, (corr_svd, corr_rand)


def test_estimate_correlates_with_true_distance_synthetic(synth):
    _, Q, _, index = synth
    corr_svd, corr_rand = _svd_vs_random_basis(index, Q)
    assert corr_svd >= 0.8, corr_svd  # measured 0.90
    assert corr_svd > corr_rand, (corr_svd, corr_rand)


def test_lower_bound_table_is_exactly_plain_hnsw(synth):
    """With every cosine estimated as 1 the estimate is a lower bound, so nothing that could
    enter the results is pruned and FINGER must return exactly what the plain walk returns."""
    _, Q, _, index = synth
    finger = index._graph.finger
    saved = finger.table.copy()
    try:
        finger.table[:] = 1.0  # in place: the published search view shares the array
        for ef in (10, 40):
            a = index.search(Q, 10, ef=ef, finger=False)
            b = index.search(Q, 10, ef=ef, finger=True)
            np.testing.assert_array_equal(a.ids, b.ids)
    finally:
        finger.table[:] = saved


def test_finger_at_high_ef_returns_the_same_neighbours(synth):
    _, Q, _, index = synth
    a = index.search(Q, 10, ef=256, finger=False).ids
    b = index.search(Q, 10, ef=256, finger=True).ids
    same = np.mean([set(a[i]) == set(b[i]) for i in range(len(Q))])
    assert same >= 0.99


def _saving(index, Q, nb):
    out = {}
    for finger in (False, True):
        index.reset_search_stats()
        ids = index.search(Q, 10, ef=64, finger=finger).ids
        rec = np.mean([len(set(ids[i]) & set(nb[i, :10])) / 10 for i in range(len(Q))])
        out[finger] = (rec, index.search_stats()["exact_per_query"])
    return out


@pytest.mark.shared_data
def test_finger_saves_exact_evaluations_at_equal_recall_sift(sift):
    _, Q, nb, index = sift
    out = _saving(index, Q, nb)
    assert out[True][0] >= out[False][0] - 0.03
    assert out[True][1] <= 0.7 * out[False][1], out  # measured ~0.55


def test_finger_saves_exact_evaluations_at_equal_recall_synthetic(synth):
    _, Q, nb, index = synth
    out = _saving(index, Q, nb)
    assert out[True][0] >= out[False][0] - 0.03
    assert out[True][1] <= 0.8 * out[False][1], out


def test_rank_is_clipped_to_dimension(blobs):
    X, Q = blobs
    index = HNSW(finger=True, default_recall=None, M=8, finger_rank=64).build(X)
    assert index._graph.finger.basis.shape == (X.shape[1], X.shape[1])
    low = HNSW(finger=True, default_recall=None, M=8, finger_rank=8).build(X)
    assert low._graph.finger.basis.shape == (8, X.shape[1])
    assert low.search(Q, 5, ef=32).ids.shape == (len(Q), 5)
    # codes use only the low `rank` bits (the cosine table has rank + 1 entries)
    codes = low._graph.finger.codes[:len(X), :16]
    assert int(np.bitwise_or.reduce(codes, axis=None)) >> 8 == 0


def _code_bits(codes, r):
    return ((codes[..., None] >> np.arange(r, dtype=np.uint64)) & np.uint64(1)).astype(bool)


def test_finger_payload_follows_add_and_delete(synth):
    """After add and delete, every stored edge term still describes the current graph.

    The sign codes of the index and of the fresh recomputation come from two float paths (the
    projections of added nodes are computed on a different block than here, and BLAS kernels
    round differently by block shape and CPU), so a bit may differ where the projected residual
    is within rounding of 0, and only there.
    """
    X, Q, _, _ = synth
    index = HNSW(default_recall=None, M=8, finger=True, finger_rank=32).build(X[:3000])
    index.add(X[3000:4000])
    index.delete(np.arange(0, 4000, 9))
    g, n, M0, r, pay = _payload(index)
    f = g.finger
    P = np.ascontiguousarray(g.vectors[:n] @ f.basis.T)
    fresh_codes = edge_payload(g.vectors, g.links_layer0[:n], P, np.arange(n, dtype=np.int64))
    fresh = fresh_codes.view(np.float32)
    live = ~g.deleted[:n]
    # the float terms (t_e, |e_res|, projection, |c|^2); columns before 2 M0 are the codes
    np.testing.assert_allclose(pay[live][:, 2 * M0:], fresh[live][:, 2 * M0:], rtol=1e-4, atol=1e-3)
    # sign codes: compare bit by bit, excusing only near-zero projections
    nodes = np.flatnonzero(live)
    links = g.links_layer0[nodes]
    cnt = links[:, 0]
    slot_used = np.arange(M0)[None, :] < cnt[:, None]
    nbr = np.where(slot_used, links[:, 1:], 0)
    te = fresh[nodes, 2 * M0:4 * M0:2]  # (m, M0)
    resid = P[nbr] - te[:, :, None] * P[nodes][:, None, :]  # (m, M0, r) projected residuals
    scale = np.abs(P[nbr]) + np.abs(te[:, :, None] * P[nodes][:, None, :])
    stored_bits = _code_bits(f.codes[nodes, :M0], r)
    fresh_bits = _code_bits(fresh_codes[nodes, :M0], r)
    differ = (stored_bits != fresh_bits) & slot_used[:, :, None]
    near_zero = np.abs(resid) <= 1e-4 * scale + 1e-6
    assert not (differ & ~near_zero).any(), "a code bit differs where the projection is clearly signed"
    assert differ.sum() <= 1e-3 * slot_used.sum() * r  # in practice a handful at most
    # and the codes really were refreshed: every live row's bits match almost everywhere
    assert slot_used.sum() > 0 and (stored_bits == fresh_bits)[slot_used].mean() > 0.999


def test_projected_descent_rule_and_effect():
    """With r <= d / 4 FINGER searches descend the upper layers on the basis projections: fewer
    exact evaluations, the same recall as the exact descent, one-query and batch paths alike."""
    X, Q, nb, _, _ = synthetic_set(4000, 64, 60, k=10, seed=5)
    index = HNSW(default_recall=None, M=8, finger=True, finger_rank=16).build(X)
    assert index._view.projected_descent
    assert not HNSW(default_recall=None, M=8, finger=True, finger_rank=32).build(X[:500])._view.projected_descent
    assert not HNSW(default_recall=None, M=8, finger=False).build(X[:500])._view.projected_descent
    cos = HNSW(default_recall=None, metric="cosine", M=8, finger=True, finger_rank=16).build(X[:500])
    assert not cos._view.projected_descent  # l2 only (the only metric measured)

    def run(index):
        index.reset_search_stats()
        ids = index.search(Q, 10, ef=48).ids
        stats = index.search_stats()
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, nb[:, :10])])
        return ids, recall, stats["exact_per_query"], stats["estimated_per_query"]

    ids, recall, exact, est = run(index)
    one = np.stack([np.asarray(index.search(q, 10, ef=48).ids).reshape(-1) for q in Q])
    np.testing.assert_array_equal(one, ids)
    index._view = index._view._replace(projected_descent=False)  # the exact descent, same graph
    _, recall_exact, exact_exact, est_exact = run(index)
    assert recall >= recall_exact - 0.02, (recall, recall_exact)
    assert exact < exact_exact and est > est_exact, (exact, exact_exact, est, est_exact)
