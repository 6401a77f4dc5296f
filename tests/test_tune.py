"""annlib.tune: the chosen parameters meet the target on held-out queries, respect a budget, are
monotone in the target, and errors are clear. Synthetic data only (runs without ../shared)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_set

import annlib


@pytest.fixture(scope="module")
def data():
    X, Q, _, _, _ = synthetic_set(6000, 24, 500, seed=3)
    fresh = synthetic_set(6000, 24, 300, seed=3)[1]  # same mixture, unseen queries
    return X, Q, fresh[:300]


@pytest.fixture(scope="module")
def hnsw(data):
    X, _, _ = data
    return annlib.HNSW.build(X, M=12, ef_construction=64, finger=False)


def fresh_recall(index, Q, k, params):
    ids, dist = index.search(Q, k, **params)
    true = index.exact_search(Q, k)
    kth = true.distances[:, k - 1]
    return float((dist <= kth[:, None] + 1e-4 * np.abs(kth[:, None]) + 1e-6).mean())


@pytest.mark.parametrize("target", [0.9, 0.95])
def test_hnsw_tuned_point_meets_target_on_unseen_queries(data, hnsw, target):
    _, Q, fresh = data
    res = annlib.tune(hnsw, Q, k=10, target_recall=target)
    assert set(res) == {"ef"}
    assert res.held_out_recall >= target - 0.01
    assert abs(res.predicted_recall - res.held_out_recall) <= 0.02 + res.margin
    assert fresh_recall(hnsw, fresh, 10, dict(res)) >= target - 0.02
    # the mapping goes straight into search
    ids, _ = hnsw.search(fresh[:3], 10, **res)
    assert ids.shape == (3, 10)


def test_raising_the_target_never_lowers_the_predicted_cost(data, hnsw):
    _, Q, _ = data
    results = [annlib.tune(hnsw, Q, k=10, target_recall=t) for t in (0.8, 0.9, 0.95, 0.98)]
    efs = [r["ef"] for r in results]
    costs = [r.predicted_cost for r in results]
    assert efs == sorted(efs)
    assert costs == sorted(costs)


def test_budget_is_respected(data, hnsw):
    _, Q, _ = data
    cheap = annlib.tune(hnsw, Q, k=10, target_recall=0.9)
    budget = cheap.predicted_cost * 1.5
    res = annlib.tune(hnsw, Q, k=10, max_cost=budget)
    assert res.predicted_cost <= budget
    # the most accurate setting priced within the budget (prices as of this call)
    within = [p.recall for p in res.pareto if p.cost <= budget]
    assert res.predicted_recall == max(within)
    assert res.predicted_recall >= 0.85


def test_infeasible_target_names_the_best_reachable_recall(data):
    X, Q, _ = data
    weak = annlib.HNSW.build(X[:2000], M=2, ef_construction=4, finger=False)
    with pytest.raises(ValueError, match=r"not reachable.*best recall@10 on the sample is 0\.\d+"):
        annlib.tune(weak, Q, k=10, target_recall=1.0, margin=0.0)


def test_budget_below_the_cheapest_setting_raises(data, hnsw):
    _, Q, _ = data
    with pytest.raises(ValueError, match="below the cheapest setting"):
        annlib.tune(hnsw, Q, k=10, max_cost=1e-12)


def test_argument_errors(data, hnsw):
    _, Q, _ = data
    with pytest.raises(ValueError, match="exactly one of target_recall or max_cost"):
        annlib.tune(hnsw, Q, k=10)
    with pytest.raises(ValueError, match="exactly one"):
        annlib.tune(hnsw, Q, k=10, target_recall=0.9, max_cost=1.0)
    with pytest.raises(ValueError, match="target_recall must be in"):
        annlib.tune(hnsw, Q, k=10, target_recall=1.5)
    with pytest.raises(ValueError, match="dimension"):
        annlib.tune(hnsw, Q[:, :5], k=10, target_recall=0.9)
    with pytest.raises(ValueError, match="ground_truth ids"):
        annlib.tune(hnsw, Q, k=10, target_recall=0.9, ground_truth=np.zeros((3, 10), np.int64))
    with pytest.raises(TypeError, match="built annlib index"):
        annlib.tune(object(), Q, k=10, target_recall=0.9)


def test_given_ground_truth_ids_are_used(data, hnsw):
    _, Q, _ = data
    truth = hnsw.exact_search(Q, 10)
    res = annlib.tune(hnsw, Q, k=10, target_recall=0.9, ground_truth=truth.ids)
    assert res.held_out_recall >= 0.89


def test_apply_stores_defaults_and_survives_save_load(data, hnsw, tmp_path):
    X, Q, fresh = data
    index = annlib.HNSW.build(X[:3000], M=12, ef_construction=64, finger=False)
    res = annlib.tune(index, Q, k=10, target_recall=0.95, apply=True)
    assert index.default_search_params["ef"] == res["ef"]
    assert index.tuning["params"] == {"ef": res["ef"]}
    index.save(tmp_path / "tuned.annlib")
    loaded = annlib.load(tmp_path / "tuned.annlib")
    assert loaded.default_search_params["ef"] == res["ef"]
    assert loaded.tuning["family"] == "hnsw"
    a = index.search(fresh[:20], 10)
    b = loaded.search(fresh[:20], 10)
    assert (a.ids == b.ids).mean() > 0.99
    index.set_default_search_params()
    assert index.default_search_params == annlib.HNSW.search_defaults


def test_set_default_search_params_validates_before_changing(data, hnsw):
    before = dict(hnsw.default_search_params)
    with pytest.raises(ValueError, match="unknown parameter"):
        hnsw.set_default_search_params(leaves=3)
    with pytest.raises(ValueError, match="ef must be"):
        hnsw.set_default_search_params(ef=0)
    assert hnsw.default_search_params == before


def test_bruteforce_needs_no_parameters(data):
    X, Q, _ = data
    index = annlib.BruteForce.build(X[:1000])
    res = annlib.tune(index, Q[:50], k=5, target_recall=0.99)
    assert dict(res) == {} and res.predicted_recall == 1.0 and res.held_out_recall == 1.0


def test_sketch_reorder_is_tuned(data):
    X, Q, _ = data
    index = annlib.Index.build(X[:3000], method="mahalanobis", random_state=0)
    res = annlib.tune(index, Q[:200], k=10, target_recall=0.95)
    assert set(res) == {"reorder"} and res["reorder"] >= 10
    assert res.held_out_recall >= 0.94


def test_build_without_method_is_a_tuned_approximate_index(data):
    X, _, fresh = data
    index = annlib.Index.build(X[:4000])
    assert index.family != "bruteforce"
    assert index.tuning["chosen_by"] == "auto" and index.tuning["rule"]
    assert index.default_search_params == {**type(index).search_defaults, **index.tuning["params"]}
    assert fresh_recall(index, fresh, 10, {}) >= 0.95 - 0.02


def test_auto_takes_a_target_and_refuses_family_parameters(data):
    X, _, fresh = data
    index = annlib.Index.build(X[:3000], method="auto", target_recall=0.9, sample_size=300)
    assert index.tuning["target_recall"] == 0.9
    assert fresh_recall(index, fresh, 10, {}) >= 0.9 - 0.02
    with pytest.raises(ValueError, match="method='auto'"):
        annlib.Index.build(X[:100], M=16)
    with pytest.raises(ValueError, match="is not a class"):
        annlib.get_family("auto")


# ------------------------------------------------------------------------------ Partitioned model
@pytest.fixture(scope="module")
def partitioned(data):
    X, _, _ = data
    return annlib.Partitioned.build(X, random_state=0)


def test_partitioned_recall_model_is_exact_on_the_sample(data, partitioned):
    # the instrumented pass predicts the recall of every (leaves, reorder) without searching;
    # real searches of the same queries must agree (up to ties of the quantized scores)
    _, Q, _ = data
    res = annlib.tune(partitioned, Q, k=10, target_recall=0.95, held_out=0.0)
    assert res.method == "lagrangian" and set(res) == {"leaves", "reorder"}
    truth = partitioned.exact_search(Q, 10)
    kth = truth.distances[:, 9]
    for point in res.pareto[:: max(1, len(res.pareto) // 8)]:
        _, dist = partitioned.search(Q, 10, **point.params)
        measured = float((dist <= kth[:, None] + 1e-4 * np.abs(kth[:, None]) + 1e-6).mean())
        assert abs(measured - point.recall) <= 0.01, (point, measured)


@pytest.mark.parametrize("target", [0.9, 0.95, 0.99])
def test_partitioned_tuned_point_meets_target(data, partitioned, target):
    _, Q, fresh = data
    res = annlib.tune(partitioned, Q, k=10, target_recall=target)
    assert res.held_out_recall >= target - 0.01
    assert fresh_recall(partitioned, fresh, 10, dict(res)) >= target - 0.02


def test_partitioned_choice_is_the_cheapest_feasible_grid_point(data, partitioned):
    _, Q, _ = data
    res = annlib.tune(partitioned, Q, k=10, target_recall=0.95, held_out=0.0, margin=0.0)
    feasible = [p for p in res.pareto if p.recall >= 0.95]
    assert res.predicted_cost == pytest.approx(min(p.cost for p in feasible))


def test_partitioned_monotone_in_target_and_budget_respected(data, partitioned):
    _, Q, _ = data
    costs = [annlib.tune(partitioned, Q, k=10, target_recall=t).predicted_cost for t in (0.8, 0.9, 0.95, 0.98)]
    assert costs == sorted(costs)
    res = annlib.tune(partitioned, Q, k=10, max_cost=costs[1])
    assert res.predicted_cost <= costs[1] and res.predicted_recall >= 0.85


def test_lagrangian_solver_matches_brute_force():
    from annlib.tune.lagrange import pareto_front, solve_for_cost, solve_for_recall

    g = np.random.default_rng(0)
    for _ in range(50):
        cost = g.uniform(1, 100, 60)
        recall = np.clip(1 - np.exp(-cost / 30) + g.normal(0, 0.03, 60), 0, 1)
        target = g.uniform(0.3, 0.95)
        i = solve_for_recall(recall, cost, target)
        feasible = recall >= target
        if not feasible.any():
            assert i is None
            continue
        assert recall[i] >= target and cost[i] == cost[feasible].min()
        budget = g.uniform(1, 100)
        j = solve_for_cost(recall, cost, budget)
        within = cost <= budget
        assert (j is None) == (not within.any())
        if j is not None:
            assert cost[j] <= budget and recall[j] == recall[within].max()
        front = pareto_front(recall, cost)
        assert (np.diff(cost[front]) >= 0).all() and (np.diff(recall[front]) > 0).all()


# ------------------------------------------------------------------------------ self-tune at build
def test_hnsw_self_tune_holds_a_sample_out_and_keeps_rows_as_positions(data, tmp_path):
    X, _, fresh = data
    X = X[:3000]
    index = annlib.HNSW(M=12, ef_construction=64, default_recall=0.9).build(X)
    assert index.tuning["chosen_by"] == "build self-tune"
    assert "held out of the build" in index.tuning["sample"]
    assert len(index) == 3000 and index.n_positions == 3000
    # every vector is back at its own row: found as its own nearest neighbour, by id and filter
    ids, dist = index.search(X[::97], 1, ef=64)
    assert ids[:, 0].tolist() == list(range(0, 3000, 97)) and np.all(dist[:, 0] <= 1e-4)
    assert np.allclose(index._vectors_at(np.arange(3000)), X)
    odd = np.zeros(3000, bool)
    odd[1::2] = True
    assert np.all(index.search(fresh[:20], 10, filter=odd).ids % 2 == 1)
    # the tuned default meets the target on unseen queries, and survives save/load
    assert fresh_recall(index, fresh, 10, {}) >= 0.9 - 0.02
    index.save(tmp_path / "h.annlib")
    back = annlib.load(tmp_path / "h.annlib")
    assert back.default_search_params == index.default_search_params
    np.testing.assert_array_equal(back.search(fresh[:50], 10).ids, index.search(fresh[:50], 10).ids)
    assert index.search_stats()["queries"] == 50 + 20 + 300 + len(range(0, 3000, 97))  # tuning not counted


def test_default_margin_scales_with_the_miss_budget():
    from annlib.tune.tuner import default_margin

    assert default_margin(0.9) == pytest.approx(0.012)
    assert default_margin(0.95) == pytest.approx(0.006)
    assert default_margin(0.99) == pytest.approx(0.002)
    assert default_margin(0.5) == 0.02 and default_margin(None) == 0.0


def test_auto_rule_switches_to_partitioned_at_the_measured_size():
    from annlib.tune.auto import AUTO_PARTITIONED_FROM, choose_family

    assert choose_family(AUTO_PARTITIONED_FROM - 1, 128, "l2", 0.95)[0] == "hnsw"
    family, params, reason = choose_family(AUTO_PARTITIONED_FROM, 128, "cosine", 0.95)
    assert family == "partitioned" and params == {} and "Partitioned" in reason


def test_auto_builds_and_tunes_partitioned_above_the_threshold(data, monkeypatch):
    import importlib

    auto = importlib.import_module("annlib.tune.auto")  # annlib.tune is also the function
    X, _, fresh = data
    monkeypatch.setattr(auto, "AUTO_PARTITIONED_FROM", 1000)  # the rule's branch on a small set
    index = annlib.Index.build(X[:4000], target_recall=0.95, sample_size=400)
    assert index.family == "partitioned" and index.tuning["chosen_by"] == "auto"
    assert "leave-one-out" in index.tuning["sample"] and set(index.tuning["params"]) == {"leaves", "reorder"}
    assert fresh_recall(index, fresh, 10, {}) >= 0.95 - 0.02


def test_reported_prices_are_floors_for_later_tunings():
    from annlib.tune.scalar import _points

    seen = {10: (0.8, 2.0), 20: (0.9, 3.0)}
    reported = {}
    first = {p.params["x"]: p.cost for p in _points("x", seen, reported)}
    assert first == {10: 2.0, 20: 3.0}
    seen[40] = (0.95, 2.5)  # a noisy fast timing of a larger setting pulls the fit down
    later = {p.params["x"]: p.cost for p in _points("x", seen, reported)}
    assert later[40] >= first[20] and later[20] >= first[20] and later[10] >= first[10]
    assert [later[v] for v in (10, 20, 40)] == sorted(later[v] for v in (10, 20, 40))
