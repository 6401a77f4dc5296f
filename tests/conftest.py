"""Shared fixtures: seeded data, the exact oracle, and the shared ann-benchmarks files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# ANNLIB_TEST_SHARED_DATA points the suite at another folder (a missing one runs it as a clone
# without ../shared would).
SHARED_DATA = Path(os.environ.get("ANNLIB_TEST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
SHARED_SETS = sorted(p.stem for p in SHARED_DATA.glob("*.hdf5")) if SHARED_DATA.is_dir() else []


def read_shared(name: str, n_queries: int | None = None, seed: int = 0):
    """Read a shared ann-benchmarks file; optionally a seeded subsample of its queries."""
    h5py = pytest.importorskip("h5py")
    path = SHARED_DATA / f"{name}.hdf5"
    if not path.exists():
        pytest.skip(f"shared data set {name} not present")
    with h5py.File(path, "r") as f:
        train = np.asarray(f["train"], dtype=np.float32)
        test = np.asarray(f["test"], dtype=np.float32)
        neighbors = np.asarray(f["neighbors"], dtype=np.int64)
        distances = np.asarray(f["distances"], dtype=np.float32)
        metric = {"euclidean": "l2", "angular": "cosine"}[f.attrs["distance"]]
    if n_queries is not None and n_queries < len(test):
        rows = np.sort(np.random.default_rng(seed).choice(len(test), n_queries, replace=False))
        test, neighbors, distances = test[rows], neighbors[rows], distances[rows]
    return train, test, neighbors, distances, metric


def synthetic_set(n: int = 5000, d: int = 32, n_queries: int = 100, metric: str = "l2", k: int = 100,
                  seed: int = 0, clusters: int = 50):
    """A clustered synthetic set shaped like :func:`read_shared`'s result, with exact ground truth.

    Gaussian clusters of unequal size and spread (closer to real embeddings than i.i.d. Gaussian
    data), queries drawn from the same mixture, neighbours and distances computed in float64.
    Returns ``(train, test, neighbors, distances, metric)``.
    """
    g = np.random.default_rng(seed)
    centers = g.normal(size=(clusters, d)) * 3.0
    weights = g.dirichlet(np.full(clusters, 0.7))
    spread = g.uniform(0.5, 1.5, clusters)
    lab = g.choice(clusters, n + n_queries, p=weights)
    data = centers[lab] + g.normal(size=(n + n_queries, d)) * spread[lab, None]
    train = data[:n].astype(np.float32)
    test = data[n:].astype(np.float32)
    k = min(k, n)
    neighbors = np.empty((n_queries, k), np.int64)
    distances = np.empty((n_queries, k), np.float32)
    for lo in range(0, n_queries, 64):
        D = true_distances(train, test[lo:lo + 64], metric)
        order = np.argsort(D, axis=1, kind="stable")[:, :k]
        neighbors[lo:lo + 64] = order
        distances[lo:lo + 64] = np.take_along_axis(D, order, axis=1)
    return train, test, neighbors, distances, metric


def true_distances(train, Q, metric):
    """Exact public distances (Euclidean, 1 - cos, -<q, x>) in float64, shape (q, n)."""
    X = train.astype(np.float64)
    Qd = Q.astype(np.float64)
    if metric == "l2":
        return np.sqrt(np.maximum(((Qd[:, None, :] - X[None]) ** 2).sum(-1), 0.0))
    if metric == "ip":
        return -(Qd @ X.T)
    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-30)
    Qn = Qd / np.maximum(np.linalg.norm(Qd, axis=1, keepdims=True), 1e-30)
    return 1.0 - Qn @ Xn.T


def threshold_recall(ids, train, Q, true_kth, metric, eps=1e-3):
    """ann-benchmarks recall: a returned id counts when its recomputed distance <= true k-th + eps."""
    hits = 0
    for r in range(Q.shape[0]):
        row = ids[r][ids[r] >= 0]
        assert len(set(row.tolist())) == len(row), "duplicate ids in a result row"
        if len(row) == 0:
            continue
        d = true_distances(train[row], Q[r:r + 1], metric)[0]
        hits += int((d <= true_kth[r] + eps).sum())
    return hits / (Q.shape[0] * ids.shape[1])


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def blobs():
    """A small clustered data set (2,000 x 24) and 50 queries, fixed seed."""
    g = np.random.default_rng(7)
    centers = g.normal(size=(20, 24)) * 4
    X = (centers[g.integers(0, 20, 2000)] + g.normal(size=(2000, 24))).astype(np.float32)
    Q = (centers[g.integers(0, 20, 50)] + g.normal(size=(50, 24))).astype(np.float32)
    return X, Q


# ----------------------------------------------------------------------------------------------
# Cross-family helpers for the robustness, property, load-fuzz and concurrency suites.

# Build parameters that keep every family fast on a few hundred points.
SMALL_BUILD = {
    "bruteforce": {},
    "hnsw": {"M": 8, "ef_construction": 100, "random_state": 0},
    "partitioned": {"random_state": 0},
    "tpuknn": {},
    "mahalanobis": {"copies": 4, "m": 16, "random_state": 0},
}


def family_metrics(family):
    """Public metrics a family serves (MahalanobisSketch: only "l2" among the common ones)."""
    return ["l2"] if family == "mahalanobis" else ["l2", "cosine", "ip"]


def small_index(family, X, metric="l2", threads=1, **kw):
    """Build ``family`` on ``X`` with :data:`SMALL_BUILD` parameters (``kw`` overrides them).

    One build thread by default: on a few hundred points the parallel kernels' start-up costs far
    more than the work (seconds instead of milliseconds on a busy machine), and builds give the
    same index for any thread count."""
    import annlib

    return annlib.Index.build(X, method=family, metric=metric, threads=threads,
                              **{**SMALL_BUILD.get(family, {}), **kw})


def exhaustive_search_params(index):
    """Search parameters under which ``index`` examines every stored vector (exact answers)."""
    n = max(1, index.n_positions)
    return {
        "hnsw": {"ef": max(64, n)},
        "partitioned": {"leaves": n, "reorder": n},
        "mahalanobis": {"reorder": n},
        "tpuknn": {"recall_target": 1.0},
    }.get(index.family, {})


def assert_valid_rows(ids, dist, k, valid_ids=None, allow_padding=True, where=""):
    """Check search output rows: shape, dtypes, ids valid and unique, -1 only as trailing padding
    with +inf distances, distances ascending. ``valid_ids`` is a set or a callable id -> bool."""
    ids = np.asarray(ids)
    dist = np.asarray(dist)
    assert ids.dtype == np.int64 and dist.dtype == np.float32, f"{where}: dtypes {ids.dtype}, {dist.dtype}"
    assert ids.ndim == 2 and ids.shape[1] == k and dist.shape == ids.shape, f"{where}: shapes {ids.shape}, {dist.shape}"
    for r in range(ids.shape[0]):
        row, drow = ids[r], dist[r]
        pad = row < 0
        assert (row[pad] == -1).all(), f"{where}: row {r} has negative ids other than -1: {row}"
        if pad.any():
            assert allow_padding, f"{where}: row {r} padded with -1 although enough vectors exist: {row}"
            first = int(np.argmax(pad))
            assert pad[first:].all(), f"{where}: row {r} has -1 before a real id: {row}"
            assert np.isinf(drow[pad]).all() and (drow[pad] > 0).all(), f"{where}: row {r} padding distance not +inf"
        real = row[~pad]
        assert len(set(real.tolist())) == real.size, f"{where}: row {r} repeats an id: {row}"
        dr = drow[~pad].astype(np.float64)
        assert np.isfinite(dr).all(), f"{where}: row {r} has a non-finite distance for a real id: {drow}"
        if dr.size > 1:
            slack = 1e-6 * np.maximum(np.abs(dr[:-1]), np.abs(dr[1:])) + 1e-30
            assert (np.diff(dr) >= -slack).all(), f"{where}: row {r} distances not ascending: {drow}"
        if valid_ids is not None:
            check = valid_ids if callable(valid_ids) else valid_ids.__contains__
            bad = [int(i) for i in real if not check(int(i))]
            assert not bad, f"{where}: row {r} returns unknown ids {bad[:5]}"
