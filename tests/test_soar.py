"""SOAR spilled assignments: the lambda = 0 cases, the kernel against a numpy loop, orthogonality,
several spills, and recall at matched points read."""

from __future__ import annotations

import numpy as np
import pytest

from annlib.kernels.cluster import assign_nearest, assign_top2, kmeans
from annlib.kernels.soar import ZERO_RESIDUAL, soar_assign

from conftest import read_shared


@pytest.fixture(scope="module")
def clustered():
    g = np.random.default_rng(3)
    centres = g.normal(size=(30, 16)) * 3
    X = (centres[g.integers(0, 30, 1000)] + g.normal(size=(1000, 16))).astype(np.float32)
    C = kmeans(X, 40, iters=5, rng=np.random.default_rng(0))
    prim, _ = assign_nearest(X, C)
    return X, C, prim


def numpy_soar(X, C, prim, lam, exclude_primary):
    """SOAR's loss ``||x - c'||^2 + lam <x - c', r_hat>^2`` evaluated point by point (float64)."""
    X64, C64 = X.astype(np.float64), C.astype(np.float64)
    out = np.full(len(X), -1)
    for i, x in enumerate(X64):
        r = x - C64[prim[i]]
        rn = r @ r
        rh = r / np.sqrt(rn) if rn >= ZERO_RESIDUAL else np.zeros_like(r)
        R = x[None, :] - C64
        loss = (R * R).sum(1) + lam * (R @ rh) ** 2
        if exclude_primary:
            loss[prim[i]] = np.inf
        j = int(np.argmin(loss))
        out[i] = -1 if j == prim[i] else j
    return out


def test_lambda_zero_excluding_primary_is_second_nearest(clustered):
    X, C, prim = clustered
    sec = soar_assign(X, C, prim, 0.0, exclude_primary=True)[:, 0]
    top2 = assign_top2(X, C)
    np.testing.assert_array_equal(top2[:, 0], prim)
    assert (sec == top2[:, 1]).mean() >= 0.999  # float ties aside, exactly the runner-up


def test_lambda_zero_with_scann_semantics_spills_nothing(clustered):
    X, C, prim = clustered
    sec = soar_assign(X, C, prim, 0.0, exclude_primary=False)
    assert (sec == -1).all()


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("lam", [0.5, 1.0, 4.0])
def test_kernel_equals_numpy_loop(clustered, lam, exclude):
    X, C, prim = clustered
    sec = soar_assign(X, C, prim, lam, exclude_primary=exclude, block=300)[:, 0]
    ref = numpy_soar(X, C, prim, lam, exclude)
    assert (sec == ref).mean() >= 0.998  # float32 vs float64 near-ties only
    if not exclude:
        spilled = (sec >= 0).mean()
        assert 0.0 < spilled < 1.0  # not every point spills under ScaNN's rule


def test_large_lambda_buys_orthogonality(clustered):
    X, C, prim = clustered
    X64, C64 = X.astype(np.float64), C.astype(np.float64)
    sec = soar_assign(X, C, prim, 1e4, exclude_primary=True)[:, 0]
    nearest = assign_top2(X, C)[:, 1]
    r = X64 - C64[prim]
    rh = r / np.linalg.norm(r, axis=1, keepdims=True)

    def cos(c):
        rp = X64 - C64[c]
        return np.abs((rp * rh).sum(1)) / np.linalg.norm(rp, axis=1)

    assert (cos(sec) <= cos(nearest) + 1e-9).mean() >= 0.95


def test_multiple_spills_are_distinct_and_not_primary(clustered):
    X, C, prim = clustered
    sec = soar_assign(X, C, prim, 1.0, spills=3, exclude_primary=True)
    assert (sec >= 0).all()
    assert (sec != prim[:, None]).all()
    assert all(len(set(row)) == 3 for row in sec.tolist())


def _candidate_curves(X, Q, gt, C, leaf_lists, ts):
    """(recall, fraction read) of probing the t best leaves by <q, c>, for each t."""
    sizes = np.array([len(m) for m in leaf_lists])
    member = [set(m.tolist()) for m in leaf_lists]
    order = np.argsort(-(Q @ C.T), axis=1)
    out = []
    for t in ts:
        hit = read = 0
        for qi in range(len(Q)):
            probed = order[qi, :t]
            seen = set().union(*(member[l] for l in probed))
            hit += sum(int(g) in seen for g in gt[qi])
            read += sizes[probed].sum()
        out.append((hit / gt.size, read / (len(Q) * len(X))))
    return np.array(out)


@pytest.mark.shared_data
def test_soar_recall_at_matched_points_read():
    """SOAR against no spilling and next-centre spilling at equal points read, on
    glove-50-angular-200k (512 centres)."""
    X, Q, gt, _, _ = read_shared("glove-50-angular-200k", n_queries=200)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-30)
    Q = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-30)
    X, Q, gt = X.astype(np.float32), Q.astype(np.float32), gt[:, :10]
    rng = np.random.default_rng(0)
    C = kmeans(np.ascontiguousarray(X[rng.choice(len(X), 50_000, replace=False)]), 512, iters=8, rng=rng)
    prim, _ = assign_nearest(X, C)
    pos = np.arange(len(X))

    def lists(sec):
        leaf = np.concatenate([prim, sec[sec >= 0]])
        who = np.concatenate([pos, pos[sec >= 0]])
        order = np.argsort(leaf, kind="stable")
        return np.split(who[order], np.cumsum(np.bincount(leaf, minlength=512))[:-1])

    none = lists(np.full(len(X), -1))
    nearest = lists(soar_assign(X, C, prim, 0.0, exclude_primary=True)[:, 0])
    soar = lists(soar_assign(X, C, prim, 1.0)[:, 0])
    for member in soar:
        assert len(np.unique(member)) == len(member), "a point stored twice in one leaf"
    ts = [4, 8, 12, 16, 24, 32, 48]
    curves = {name: _candidate_curves(X, Q, gt, C, L, ts) for name, L in
              (("none", none), ("nearest", nearest), ("soar", soar))}
    for t_index in (3, 5):  # t = 16 and 32 for SOAR
        rec, read = curves["soar"][t_index]
        at = {name: np.interp(read, c[:, 1], c[:, 0]) for name, c in curves.items() if name != "soar"}
        assert rec >= at["nearest"] - 0.005, (rec, at)
        assert rec > at["none"] + 0.01, (rec, at)
