"""BruteForce is the oracle: recall 1.0 on every shared data set, exactness on edge cases."""

from __future__ import annotations

import numpy as np
import pytest

import annlib

from conftest import SHARED_SETS, read_shared, synthetic_set, threshold_recall


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_recall_one_on_a_clustered_set(metric):
    train, test, neighbors, distances, metric = synthetic_set(n=3000, d=24, n_queries=60, metric=metric, k=10)
    index = annlib.BruteForce.build(train, metric=metric)
    ids, dist = index.search(test, 10)
    assert threshold_recall(ids, train, test, distances[:, 9], metric, eps=1e-4) == 1.0
    # distances agree with the float64 ground truth
    np.testing.assert_allclose(dist, distances, rtol=1e-4, atol=1e-4)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", SHARED_SETS or ["sift-128-euclidean-10k"])
def test_recall_one_on_shared_sets(name):
    train, test, neighbors, distances, metric = read_shared(name, n_queries=50)
    index = annlib.BruteForce.build(train, metric=metric)
    ids, dist = index.search(test, 10)
    assert threshold_recall(ids, train, test, distances[:, 9], metric) == 1.0
    # distances agree with the file's float64 ground truth
    np.testing.assert_allclose(dist, distances[:, :10], rtol=1e-4, atol=1e-3)


def test_duplicates_and_zero_vectors_cosine():
    X = np.zeros((6, 4), np.float32)
    X[1:] = [[1, 0, 0, 0], [1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0], [1, 1, 0, 0]]
    index = annlib.BruteForce.build(X, metric="cosine")
    ids, dist = index.search([1, 0, 0, 0], 3)
    assert sorted(ids[:2].tolist()) == [1, 2] and ids[2] == 5
    np.testing.assert_allclose(dist, [0, 0, 1 - 1 / np.sqrt(2)], atol=1e-6)


def test_threads_give_identical_results(blobs):
    X, Q = blobs
    index = annlib.BruteForce.build(X)
    a = index.search(Q, 10, threads=1)
    b = index.search(Q, 10, threads=2)
    np.testing.assert_array_equal(a.ids, b.ids)


def test_integer_and_float64_input(blobs):
    X, Q = blobs
    a = annlib.BruteForce.build(X.astype(np.float64)).search(Q.astype(np.float64), 5)
    b = annlib.BruteForce.build(X).search(Q, 5)
    np.testing.assert_array_equal(a.ids, b.ids)
    Xi = np.rint(X * 10).astype(np.int16)
    c = annlib.BruteForce.build(Xi).search(Xi[:4], 1)
    np.testing.assert_array_equal(c.ids[:, 0], np.arange(4))
