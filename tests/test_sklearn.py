"""annlib.sklearn: ANNTransformer against KNeighborsTransformer, ANNNeighbors against
NearestNeighbors, pipelines with precomputed-metric estimators, the parameter protocol, errors,
and scikit-learn's common estimator checks."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

pytest.importorskip("sklearn", minversion="1.6")

import sklearn  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.cluster import DBSCAN  # noqa: E402
from sklearn.datasets import make_s_curve  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.manifold import TSNE, Isomap, trustworthiness  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier, KNeighborsTransformer, NearestNeighbors  # noqa: E402
from sklearn.pipeline import Pipeline, make_pipeline  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from annlib.sklearn import ANNNeighbors, ANNTransformer, expected_failed_checks  # noqa: E402

# Distances are recomputed in float64 on both sides, by different formulas.
DIST_TOL = {"rtol": 1e-7, "atol": 1e-9}
HNSW = {"method": "hnsw", "random_state": 0}


def clustered(n, d=8, clusters=6, spread=10.0, seed=0):
    """``n`` points around ``clusters`` Gaussian centres ``spread`` apart (scale), and labels."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(clusters, d)) * spread
    labels = g.integers(0, clusters, n)
    return centres[labels] + g.normal(size=(n, d)), labels


@pytest.fixture(scope="module")
def data():
    """600 x 8 clustered training points and 100 queries from the same clusters."""
    X, _ = clustered(700)
    return X[:600], X[600:]


def rows(graph):
    """Per row: (column indices, stored values) in stored order."""
    graph = graph.tocsr()
    return [(graph.indices[graph.indptr[r]:graph.indptr[r + 1]],
             graph.data[graph.indptr[r]:graph.indptr[r + 1]]) for r in range(graph.shape[0])]


def graph_recall(approx, exact):
    """Fraction of the exact graph's (row, column) entries the approximate graph also has."""
    hits = sum(len(np.intersect1d(a, e)) for (a, _), (e, _) in zip(rows(approx), rows(exact)))
    return hits / exact.nnz


def assert_same_graph(ours, theirs):
    """Same shape, same neighbour set per row, distances equal within float tolerance."""
    assert ours.shape == theirs.shape
    assert ours.format == "csr" and ours.dtype == np.float64
    assert np.array_equal(np.diff(ours.indptr), np.diff(theirs.tocsr().indptr))
    for r, ((ci, cv), (ti, tv)) in enumerate(zip(rows(ours), rows(theirs))):
        assert set(ci.tolist()) == set(ti.tolist()), f"row {r}: {sorted(ci)} vs {sorted(ti)}"
        np.testing.assert_allclose(cv[np.argsort(ci)], tv[np.argsort(ti)], **DIST_TOL, err_msg=f"row {r}")
        assert (np.diff(cv) >= 0).all(), f"row {r} is not in ascending distance order: {cv}"


# -- the graph against scikit-learn's exact one --------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "l2", "cosine"])
@pytest.mark.parametrize("mode", ["distance", "connectivity"])
def test_exact_method_gives_kneighbors_transformers_graph(data, metric, mode):
    X, Q = data
    ours = ANNTransformer(mode=mode, n_neighbors=7, metric=metric, method="bruteforce")
    theirs = KNeighborsTransformer(mode=mode, n_neighbors=7, metric=metric)
    assert_same_graph(ours.fit_transform(X), theirs.fit_transform(X))
    assert_same_graph(ours.transform(Q), theirs.transform(Q))


def test_entry_counts_follow_sklearns_convention(data):
    X, _ = data
    dist = ANNTransformer(n_neighbors=7, method="bruteforce").fit_transform(X)
    conn = ANNTransformer(mode="connectivity", n_neighbors=7, method="bruteforce").fit_transform(X)
    assert (np.diff(dist.indptr) == 8).all()  # each sample is its own neighbour in distance mode
    assert (np.diff(conn.indptr) == 7).all()
    assert (conn.data == 1.0).all()
    # fit_transform keeps each sample's explicit zero distance to itself, first in its row
    first = dist.indices[dist.indptr[:-1]]
    assert np.array_equal(first, np.arange(len(X)))
    assert (dist.data[dist.indptr[:-1]] == 0.0).all()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_hnsw_graph_recall_against_exact(data, metric):
    X, Q = data
    exact = KNeighborsTransformer(n_neighbors=10, metric=metric)
    # the index tunes its own default ef at build for recall@10 0.92 on at most 150 held-out
    # vectors of these 600 (0.899 on cosine with the walk on codes, also with the codes fitted over the
    # held-out vectors: the tuning's noise at this size); ask for a little more, as the
    # Partitioned test below does
    approx = ANNTransformer(n_neighbors=10, metric=metric, method_params={"default_recall": 0.95}, **HNSW)
    assert graph_recall(approx.fit_transform(X), exact.fit_transform(X)) >= 0.9
    assert graph_recall(approx.transform(Q), exact.transform(Q)) >= 0.9


def test_partitioned_graph_recall_against_exact(data):
    X, Q = data
    exact = KNeighborsTransformer(n_neighbors=10).fit(X).transform(Q)
    # the index tunes its own default search for recall@10 at build; ask for a little more
    approx = ANNTransformer(n_neighbors=10, method="partitioned", method_params={"default_recall": 0.97},
                            random_state=0).fit(X).transform(Q)
    assert graph_recall(approx, exact) >= 0.9


def test_approximate_distances_are_the_true_ones(data):
    """Whatever the index found, the stored value is the exact distance to that sample."""
    X, Q = data
    graph = ANNTransformer(n_neighbors=10, **HNSW).fit(X).transform(Q)
    for r, (cols, vals) in enumerate(rows(graph)):
        np.testing.assert_allclose(vals, np.linalg.norm(X[cols] - Q[r], axis=1), **DIST_TOL)


def test_ip_metric_stores_negative_inner_products(data):
    X, Q = data
    graph = ANNTransformer(mode="distance", n_neighbors=5, metric="ip", method="bruteforce").fit(X).transform(Q)
    scores = Q @ X.T
    for r, (cols, vals) in enumerate(rows(graph)):
        assert set(cols.tolist()) == set(np.argsort(-scores[r])[:6].tolist())
        np.testing.assert_allclose(vals, -scores[r, cols], **DIST_TOL)


def test_float32_and_integer_input(data):
    X, Q = data
    theirs = KNeighborsTransformer(n_neighbors=5).fit(X).transform(Q)
    ours = ANNTransformer(n_neighbors=5, method="bruteforce").fit(X.astype(np.float32)).transform(Q.astype(np.float32))
    assert graph_recall(ours, theirs) == 1.0
    np.testing.assert_allclose(np.sort(ours.data), np.sort(theirs.data), rtol=1e-5)
    ints = np.round(X).astype(np.int64)
    G = ANNTransformer(n_neighbors=5, method="bruteforce").fit_transform(ints)
    assert G.dtype == np.float64 and G.shape == (600, 600)


def test_sparse_interface_setting_is_followed(data):
    X, _ = data
    if "sparse_interface" not in sklearn.get_config():
        pytest.skip("this scikit-learn has no sparse_interface setting")
    est = ANNTransformer(n_neighbors=3, method="bruteforce").fit(X[:50])
    with sklearn.config_context(sparse_interface="sparray"):
        assert type(est.transform(X[:5])).__name__ == "csr_array"
    with sklearn.config_context(sparse_interface="spmatrix"):
        assert type(est.transform(X[:5])).__name__ == "csr_matrix"


# -- pipelines with estimators that read a precomputed graph -------------------------------------


def test_isomap_pipeline():
    S, _ = make_s_curve(600, random_state=0)

    def embed(transformer):
        return make_pipeline(transformer, Isomap(n_neighbors=10, metric="precomputed")).fit_transform(S)

    exact = embed(KNeighborsTransformer(n_neighbors=10))
    # an exact graph gives scikit-learn's embedding (each component up to its sign)
    np.testing.assert_allclose(np.abs(embed(ANNTransformer(n_neighbors=10, method="bruteforce"))),
                               np.abs(exact), rtol=1e-6, atol=1e-6)
    approx = embed(ANNTransformer(n_neighbors=10, **HNSW))
    assert approx.shape == (600, 2)
    assert trustworthiness(S, approx, n_neighbors=10) >= trustworthiness(S, exact, n_neighbors=10) - 0.01


def test_tsne_pipeline(data):
    X = data[0][:200]
    pipe = make_pipeline(ANNTransformer(n_neighbors=10, **HNSW),
                         TSNE(metric="precomputed", init="random", perplexity=3, max_iter=250, random_state=0))
    embedding = pipe.fit_transform(X)
    assert embedding.shape == (200, 2) and np.isfinite(embedding).all()
    assert trustworthiness(X, embedding, n_neighbors=5) >= 0.85


def test_kneighbors_classifier_pipeline():
    # overlapping clusters, so the accuracy is informative (not 1.0)
    X, y = clustered(800, spread=1.2, seed=1)
    train, test = slice(0, 600), slice(600, None)

    def fitted(transformer):
        return make_pipeline(transformer, KNeighborsClassifier(n_neighbors=10, metric="precomputed")).fit(X[train], y[train])

    exact = fitted(KNeighborsTransformer(n_neighbors=10))
    exact_ours = fitted(ANNTransformer(n_neighbors=10, method="bruteforce"))
    assert np.array_equal(exact_ours.predict(X[test]), exact.predict(X[test]))
    exact_score = exact.score(X[test], y[test])
    assert 0.5 < exact_score < 1.0
    assert fitted(ANNTransformer(n_neighbors=10, **HNSW)).score(X[test], y[test]) >= exact_score - 0.03


def test_dbscan_pipeline_gives_the_exact_labels():
    X, truth = clustered(600, spread=10.0, seed=0)

    def labels(transformer):
        return make_pipeline(transformer, DBSCAN(eps=6.0, min_samples=5, metric="precomputed")).fit_predict(X)

    exact = labels(KNeighborsTransformer(n_neighbors=30))
    assert adjusted_rand_score(truth, exact) > 0.95
    assert np.array_equal(labels(ANNTransformer(n_neighbors=30, **HNSW)), exact)


def test_pipeline_set_params_reaches_the_transformer(data):
    X, _ = data
    pipe = Pipeline([("ann", ANNTransformer(method="bruteforce")), ("knn", KNeighborsClassifier(metric="precomputed"))])
    pipe.set_params(ann__n_neighbors=9, knn__n_neighbors=9)
    assert pipe.named_steps["ann"].n_neighbors == 9
    graph = pipe.named_steps["ann"].fit_transform(X)
    assert (np.diff(graph.indptr) == 10).all()


# -- ANNNeighbors against NearestNeighbors -------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_exact_kneighbors_matches_nearest_neighbors(data, metric):
    X, Q = data
    ours = ANNNeighbors(n_neighbors=6, metric=metric, method="bruteforce").fit(X)
    theirs = NearestNeighbors(n_neighbors=6, metric=metric).fit(X)
    for query in (None, Q):  # None: the training set, each point left out of its own neighbours
        od, oi = ours.kneighbors(query)
        td, ti = theirs.kneighbors(query)
        assert np.array_equal(oi, ti)
        np.testing.assert_allclose(od, td, **DIST_TOL)
    assert np.array_equal(ours.kneighbors(Q, n_neighbors=3, return_distance=False),
                          theirs.kneighbors(Q, n_neighbors=3, return_distance=False))
    for mode in ("connectivity", "distance"):
        assert_same_graph(ours.kneighbors_graph(mode=mode), theirs.kneighbors_graph(mode=mode))
        assert_same_graph(ours.kneighbors_graph(Q, 4, mode=mode), theirs.kneighbors_graph(Q, 4, mode=mode))


def test_training_points_are_left_out_of_their_own_neighbours(data):
    X, _ = data
    _, ind = ANNNeighbors(n_neighbors=5, **HNSW).fit(X).kneighbors()
    assert not (ind == np.arange(len(X))[:, None]).any()
    assert all(len(set(row)) == 5 for row in ind.tolist())


def test_duplicates_give_sklearns_distances():
    X = np.repeat(np.random.default_rng(3).normal(size=(20, 4)), 4, axis=0)  # each row 4 times
    od, oi = ANNNeighbors(n_neighbors=5, method="bruteforce").fit(X).kneighbors()
    td, _ = NearestNeighbors(n_neighbors=5).fit(X).kneighbors()
    np.testing.assert_allclose(od, td, **DIST_TOL)
    assert not (oi == np.arange(len(X))[:, None]).any()


def test_hnsw_kneighbors_recall(data):
    X, Q = data
    _, approx = ANNNeighbors(n_neighbors=10, **HNSW).fit(X).kneighbors(Q)
    _, exact = NearestNeighbors(n_neighbors=10).fit(X).kneighbors(Q)
    recall = np.mean([len(np.intersect1d(a, e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9


# -- parameters, determinism, pickling -----------------------------------------------------------


def test_get_set_params_and_clone_round_trip(data):
    params = {"mode": "connectivity", "n_neighbors": 4, "metric": "cosine", "method": "hnsw",
              "method_params": {"M": 8}, "search_params": {"ef": 32}, "n_jobs": 1, "random_state": 3}
    est = ANNTransformer(**params)
    assert est.get_params() == params
    twin = clone(est)
    assert twin.get_params() == params and twin is not est
    twin.set_params(n_neighbors=6, search_params=None)
    assert twin.n_neighbors == 6 and est.n_neighbors == 4
    fitted = est.fit(data[0])
    assert not hasattr(clone(fitted), "index_")
    assert est.get_params() == params  # fitting changes no parameter (and not method_params)
    assert ANNNeighbors(n_neighbors=2).get_params()["n_neighbors"] == 2


def test_same_random_state_same_graph_and_search_params_apply(data):
    X, Q = data
    one = ANNTransformer(n_neighbors=10, **HNSW).fit(X)
    two = ANNTransformer(n_neighbors=10, **HNSW).fit(X)
    assert (one.transform(Q) != two.transform(Q)).nnz == 0
    # the widest beam makes this small graph search exact
    one.set_params(search_params={"ef": 600})
    exact = KNeighborsTransformer(n_neighbors=10).fit(X).transform(Q)
    assert graph_recall(one.transform(Q), exact) == 1.0


def test_n_jobs_does_not_change_the_graph(data):
    X, Q = data
    single = ANNTransformer(n_neighbors=5, n_jobs=1, **HNSW).fit(X).transform(Q)
    every = ANNTransformer(n_neighbors=5, n_jobs=-1, **HNSW).fit(X).transform(Q)
    assert (single != every).nnz == 0


def test_pickle_round_trip_keeps_the_index(data):
    X, Q = data
    est = ANNTransformer(n_neighbors=5, **HNSW).fit(X)
    again = pickle.loads(pickle.dumps(est))
    assert again.index_ is not est.index_ and again.index_.family == "hnsw"
    assert (again.transform(Q) != est.transform(Q)).nnz == 0


# -- errors ---------------------------------------------------------------------------------------


def test_not_fitted_errors(data):
    _, Q = data
    with pytest.raises(NotFittedError):
        ANNTransformer().transform(Q)
    with pytest.raises(NotFittedError):
        ANNNeighbors().kneighbors(Q)
    with pytest.raises(NotFittedError):
        ANNNeighbors().kneighbors_graph()


@pytest.mark.parametrize("params, error, message", [
    ({"mode": "weights"}, ValueError, "unknown mode 'weights'; accepted: distance, connectivity"),
    ({"metric": "manhattan"}, ValueError, "unknown metric 'manhattan'; accepted: euclidean, l2, cosine, ip"),
    ({"method": "kdtree"}, ValueError, "unknown method 'kdtree'; accepted: auto, bruteforce"),
    ({"method": "mahalanobis"}, ValueError, "unknown method 'mahalanobis'"),
    ({"n_neighbors": 0}, ValueError, "n_neighbors must be >= 1; got 0"),
    ({"n_neighbors": 2.5}, TypeError, "n_neighbors must be an integer"),
    ({"method_params": [("M", 8)]}, TypeError, "method_params must be a dict"),
    ({"method": "hnsw", "method_params": {"metric": "l2"}}, ValueError,
     "method_params may not contain 'metric'; set it with the metric parameter instead"),
    ({"method": "hnsw", "method_params": {"M": 1}}, ValueError, "M must be in \\[2, 256\\]; got 1"),
    ({"method": "hnsw", "method_params": {"random_state": 1}, "random_state": 2}, ValueError,
     "random_state is set both as a parameter and in method_params"),
])
def test_bad_parameters_raise_at_fit_not_at_init(data, params, error, message):
    est = ANNTransformer(**params)  # the constructor accepts anything, as scikit-learn requires
    with pytest.raises(error, match=message):
        est.fit(data[0])


def test_too_many_neighbours(data):
    X = data[0][:20]
    with pytest.raises(ValueError, match=r"n_neighbors \+ 1 = 21 neighbours are needed \(distance mode"):
        ANNTransformer(n_neighbors=20, method="bruteforce").fit_transform(X)
    # connectivity mode stores only n_neighbors per row, so 20 of 20 is fine
    assert ANNTransformer(mode="connectivity", n_neighbors=20, method="bruteforce").fit_transform(X).nnz == 400
    est = ANNNeighbors(n_neighbors=20, method="bruteforce").fit(X)
    with pytest.raises(ValueError, match=r"n_neighbors = 21 neighbours are needed, but only n_samples_fit = 20"):
        est.kneighbors(X, n_neighbors=21)
    with pytest.raises(ValueError, match=r"n_neighbors \+ 1 = 21 .* left out of its own neighbours.*n_samples = 20"):
        est.kneighbors()


def test_query_errors(data):
    X, Q = data
    est = ANNTransformer(n_neighbors=3, method="bruteforce").fit(X)
    with pytest.raises(ValueError, match="X has 5 features, but ANNTransformer is expecting 8 features"):
        est.transform(Q[:, :5])
    with pytest.raises(TypeError, match="[Ss]parse"):
        est.transform(KNeighborsTransformer().fit(X).transform(Q))
    with pytest.raises(ValueError, match="NaN"):
        est.transform(np.full((2, 8), np.nan))
    est.set_params(search_params={"beam": 3})
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) beam for BruteForce.search\\(\\)"):
        est.transform(Q)
    with pytest.raises(ValueError, match="unknown mode 'weights'"):
        ANNNeighbors(method="bruteforce").fit(X).kneighbors_graph(mode="weights")


# -- scikit-learn's common estimator checks --------------------------------------------------------


@parametrize_with_checks(
    [ANNTransformer(), ANNTransformer(mode="connectivity", method="hnsw"),
     ANNTransformer(metric="cosine", method="partitioned"), ANNNeighbors()],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
