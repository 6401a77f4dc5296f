"""annlib.attention: every selector against full attention and exact top-k, on synthetic keys with
heavy-tailed norms and clusters (no shared data needed)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from annlib import DimensionMismatchError
from annlib.attention import KVCache, SELECTORS, combine, full_attention, partial_attention
from annlib.kernels.binning import binned_topk
from annlib.kernels.topk import topk_rows

SELECTOR_PARAMS = {
    "exact": {},
    "approx_topk": {},
    "lut": {},
    "lut_int8": {"codes": "int8"},
    "pages": {},
    "index": {},
    "index_hnsw": {"method": "hnsw", "build_params": {"M": 8, "ef_construction": 40}},
}


def _selector(name):
    return name.split("_")[0] if name.startswith(("lut_", "index_")) else name, SELECTOR_PARAMS[name]


def kv(n=2000, d=32, heads=2, seed=0, dv=None):
    """Keys with heavy-tailed norms around a few cluster centres, values Gaussian."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((heads, 8, d)) * 1.5
    which = rng.integers(0, 8, (heads, n))
    K = np.take_along_axis(centres, which[..., None], axis=1) + rng.standard_normal((heads, n, d))
    K *= rng.lognormal(0.0, 0.6, (heads, n, 1))
    V = rng.standard_normal((heads, n, dv or d))
    return K.astype(np.float32), V.astype(np.float32)


def queries(heads, m, d, seed=1, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((heads, m, d)) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    K, V = kv()
    return K, V, queries(4, 3, 32)


@pytest.mark.parametrize("name", list(SELECTOR_PARAMS))
def test_budget_at_least_n_is_full_attention(data, name):
    K, V, q = data
    sel, params = _selector(name)
    cache = KVCache(K, V, window=16)
    ref = full_attention(q, K, V)
    out = cache.attend(q, budget=K.shape[1], selector=sel, selector_params=params)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    out = cache.attend(q, budget=10 * K.shape[1], selector=sel, selector_params=params)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(SELECTOR_PARAMS))
@pytest.mark.parametrize("budget", [20, 100, 0.1])
def test_error_bound_holds(data, name, budget):
    K, V, q = data
    sel, params = _selector(name)
    cache = KVCache(K, V, sink=2, window=8)
    res = cache.attend(q, budget=budget, selector=sel, selector_params=params, quality=True)
    qual = res.quality
    assert np.all(qual.abs_error <= qual.error_bound), (qual.abs_error - qual.error_bound).max()
    assert np.all((qual.mass_recall > 0) & (qual.mass_recall <= 1 + 1e-9))
    # attention over the reported selection is what was returned
    assert np.all(res.counts == min(K.shape[1], max(budget if isinstance(budget, int) else 200, 10)))


def test_exact_selector_is_exact_topk(data):
    K, V, q = data
    cache = KVCache(K, V, sink=4, window=16)
    res = cache.attend(q, budget=80, selector="exact", quality=True)
    np.testing.assert_allclose(res.quality.key_recall, 1.0)
    np.testing.assert_allclose(res.quality.error_vs_topk, 0.0, atol=1e-5)
    # the retrieved keys are the 60 best scores outside sink and window
    S = np.einsum("md,nd->mn", q[0], K[0])
    S[:, :4] = -np.inf
    S[:, -16:] = -np.inf
    best = np.sort(np.argsort(-S, axis=1)[:, :60], axis=1)
    np.testing.assert_array_equal(np.sort(res.selected[0, :, 20:80], axis=1), best)


@pytest.mark.parametrize("name", ["approx_topk", "lut", "lut_int8", "index"])
def test_approximate_selectors_find_most_top_keys(name):
    K, V = kv(n=4000, d=32, heads=1, seed=3)
    q = queries(1, 8, 32, seed=4)
    sel, params = _selector(name)
    cache = KVCache(K, V, window=16)
    res = cache.attend(q, budget=0.05, selector=sel, selector_params=params, quality=True)
    floor = {"approx_topk": 0.9, "lut": 0.85, "lut_int8": 0.9, "index": 0.6}[name]
    assert res.quality.key_recall.mean() >= floor, res.quality.summary()
    assert res.quality.mass_recall.mean() >= 0.9 * res.quality.topk_mass.mean()


@pytest.mark.parametrize("name", list(SELECTOR_PARAMS))
def test_planted_needle_is_selected_and_dominates(name):
    K, V = kv(n=3000, d=32, heads=1, seed=5)
    q = queries(1, 2, 32, seed=6)
    needle = 1777
    # <q, k> / sqrt(d) 15 above any other key's: the needle carries all but e^-15 of the mass
    top = (K[0] @ q[0, 0]).max()
    K[0, needle] = (top + 15.0 * np.sqrt(32)) * q[0, 0] / np.dot(q[0, 0], q[0, 0])
    V[0, needle] = 50.0
    sel, params = _selector(name)
    cache = KVCache(K, V, window=16)
    res = cache.attend(q, budget=0.02, selector=sel, selector_params=params, details=True)
    assert needle in res.selected[0, 0]
    np.testing.assert_allclose(res.output[0, 0], 50.0, rtol=0.02)


@pytest.mark.parametrize("name", list(SELECTOR_PARAMS))
def test_append_then_attend_equals_building_from_scratch(name):
    K, V = kv(n=2600, d=32, heads=2, seed=7)
    q = queries(2, 3, 32, seed=8)
    sel, params = _selector(name)
    grown = KVCache(K[:, :1500], V[:, :1500], window=64, merge_every=100)
    grown.prepare(sel, params)
    for lo in range(1500, 2600, 37):  # token batches of varied length, merges in between
        grown.append(K[:, lo:lo + 37], V[:, lo:lo + 37])
    assert len(grown) == 2600
    fresh = KVCache(K, V, window=64)
    np.testing.assert_array_equal(grown.keys, fresh.keys)
    for budget in (2600, 300):
        a = grown.attend(q, budget=budget, selector="exact")
        b = fresh.attend(q, budget=budget, selector="exact")
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the structured selector saw the appended keys: merged ones and the exact tail
    a = grown.attend(q, budget=2600, selector=sel, selector_params=params)
    np.testing.assert_allclose(a, full_attention(q, K, V), rtol=1e-5, atol=1e-6)
    if sel in ("exact", "approx_topk"):
        np.testing.assert_allclose(grown.attend(q, budget=300, selector=sel, selector_params=params),
                                   fresh.attend(q, budget=300, selector=sel, selector_params=params),
                                   rtol=1e-5, atol=1e-6)


def test_appended_token_is_attended_immediately():
    K, V = kv(n=1000, d=16, heads=1, seed=9)
    cache = KVCache(K, V, window=0, sink=0, merge_every=10_000)
    cache.prepare("lut")
    q = queries(1, 1, 16, seed=10)
    top = (K[0] @ q[0, 0]).max()
    k_new = (top + 15.0 * np.sqrt(16)) * q[0, 0] / np.dot(q[0, 0], q[0, 0])
    cache.append(k_new[None, None, :], np.full((1, 1, 16), 7.0, np.float32))
    res = cache.attend(q, budget=20, selector="lut", details=True)
    assert 1000 in res.selected[0, 0]  # in the exact tail, not yet merged into the codes
    np.testing.assert_allclose(res.output[0, 0], 7.0, rtol=0.05)


def test_appended_single_token_2d():
    K, V = kv(n=100, d=8, heads=2, seed=11)
    cache = KVCache(K, V)
    cache.append(K[:, 0], V[:, 0])
    assert len(cache) == 101
    np.testing.assert_array_equal(cache.keys[:, 100], K[:, 0])


def test_quest_page_score_bounds_the_page_maximum():
    K, V = kv(n=1000, d=24, heads=1, seed=12)
    cache = KVCache(K, V, sink=4, window=0)
    cache.prepare("pages", {"page": 16})
    structure = cache._selectors[("pages", (("page", "16"),))][1][0]
    q = queries(1, 20, 24, seed=13)[0]
    bound = structure.page_scores(q)
    pages = structure.bounds.shape[0]
    assert pages == -(-996 // 16)  # the partial last page is covered too
    scores = q @ K[0, 4:].T
    true = np.stack([scores[:, 16 * p:16 * (p + 1)].max(axis=1) for p in range(pages)], axis=1)
    assert np.all(bound >= true - 1e-4 * np.abs(true).max())


def test_grouped_query_heads_read_their_kv_head():
    K, V = kv(n=500, d=16, heads=2, seed=14)
    q = queries(6, 2, 16, seed=15)
    out = KVCache(K, V).attend(q, budget=500)
    for h in range(6):
        kvh = h // 3
        ref = full_attention(q[h:h + 1], K[kvh:kvh + 1], V[kvh:kvh + 1])
        np.testing.assert_allclose(out[h], ref[0], rtol=1e-5, atol=1e-6)


def test_partials_combine_exactly():
    K, V = kv(n=900, d=16, heads=2, seed=16)
    q = queries(4, 3, 16, seed=17)
    parts = [partial_attention(q, K[:, lo:hi], V[:, lo:hi]) for lo, hi in ((0, 100), (100, 650), (650, 900))]
    merged = combine(parts)
    whole = partial_attention(q, K, V)
    np.testing.assert_allclose(merged.output, whole.output, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged.log_normalizer, whole.log_normalizer, rtol=1e-10)
    # a selection's log-normalizer merges with the rest of the cache into full attention
    cache = KVCache(K[:, :650], V[:, :650], window=0, sink=0)
    res = cache.attend(q, budget=650, details=True)
    rest = parts[2]
    lse = res.log_normalizer
    total = combine([type(rest)(res.output, lse, np.ones_like(lse)), rest])
    np.testing.assert_allclose(total.output, whole.output, rtol=1e-5, atol=1e-6)


def test_two_dimensional_queries():
    K, V = kv(n=300, d=8, heads=2, seed=18)
    q = queries(2, 1, 8, seed=19)
    cache = KVCache(K, V)
    np.testing.assert_allclose(cache.attend(q[:, 0], budget=300), cache.attend(q, budget=300)[:, 0])
    assert full_attention(q[:, 0], K, V).shape == (2, 8)


def test_value_dimension_may_differ():
    K, V = kv(n=300, d=8, heads=1, seed=20, dv=5)
    q = queries(1, 2, 8)
    out = KVCache(K, V).attend(q, budget=40, selector="pages")
    assert out.shape == (1, 2, 5)


def test_adaptive_mass_reaches_target_or_cap():
    K, V = kv(n=4000, d=32, heads=1, seed=21)
    sharp = queries(1, 4, 32, seed=22, scale=3.0)  # peaked attention
    cache = KVCache(K, V, window=16)
    res = cache.attend(sharp, mass=0.9, selector="exact", quality=True)
    est, true = res.estimated_mass, res.quality.mass_recall
    capped = res.counts >= 4 + 16 + 400
    assert np.all((est >= 0.9) | capped)
    assert np.all(np.abs(est - true) < 0.05)
    assert np.all(true[~capped] >= 0.85)
    # diffuse attention grows the selection; sharp attention keeps it small
    flat = queries(1, 4, 32, seed=23, scale=0.05)
    res_flat = cache.attend(flat, mass=0.9, max_budget=0.2, details=True)
    assert res_flat.counts.mean() > res.counts.mean()


def test_default_budget_and_fraction():
    K, V = kv(n=3000, d=16, heads=1, seed=24)
    q = queries(1, 1, 16)
    cache = KVCache(K, V)
    assert cache.attend(q, details=True).counts[0, 0] == 2048
    assert cache.attend(q, budget=0.5, details=True).counts[0, 0] == 1500


@pytest.mark.parametrize("bad, exc, msg", [
    (lambda K, V: KVCache(K[0], V), ValueError, "keys must be a 3-D array"),
    (lambda K, V: KVCache(K, V[:, :10]), ValueError, "keys and values must have the same (heads, n)"),
    (lambda K, V: KVCache(K.astype(str), V), TypeError, "real numeric dtype"),
    (lambda K, V: KVCache(np.where(np.arange(K.shape[1])[None, :, None] == 5, np.nan, K), V), ValueError,
     "keys contains NaN or inf; the first bad entry is at head 0, row 5"),
    (lambda K, V: KVCache(K * 1e30, V), ValueError, "attention scores overflow float32"),
    (lambda K, V: KVCache(K, V).attend(np.zeros((3, 1, 16), np.float32)), ValueError,
     "not a multiple of the cache's 2 KV heads"),
    (lambda K, V: KVCache(K, V).attend(np.zeros((2, 1, 15), np.float32)), DimensionMismatchError,
     "q has head dimension 15"),
    (lambda K, V: KVCache(K, V).attend(np.full((2, 1, 16), np.inf, np.float32)), ValueError, "q contains NaN"),
    (lambda K, V: KVCache(K, V).attend(np.zeros((2, 1, 16)), budget=0), ValueError, "budget must be >= 1"),
    (lambda K, V: KVCache(K, V).attend(np.zeros((2, 1, 16)), budget=1.5), ValueError, "budget must be in (0.0, 1.0]"),
    (lambda K, V: KVCache(K, V).attend(np.zeros((2, 1, 16)), budget="all"), TypeError, "budget must be a key count"),
    (lambda K, V: KVCache(K, V).attend(np.zeros((2, 1, 16)), budget=10, mass=0.9), ValueError,
     "give either budget="),
    (lambda K, V: KVCache(K, V).attend(np.zeros((2, 1, 16)), mass=1.0), ValueError, "mass must be in (0.0, 1.0)"),
    (lambda K, V: KVCache(K, V).attend(np.zeros((2, 1, 16)), selector="faiss"), ValueError, "unknown selector"),
    (lambda K, V: KVCache(K, V).attend(np.zeros((2, 1, 16)), selector="lut", selector_params={"bits": 3}),
     ValueError, "unknown parameter(s) bits for selector 'lut'"),
    (lambda K, V: KVCache(K, V).append(np.zeros((3, 1, 16)), np.zeros((3, 1, 16))), DimensionMismatchError,
     "the cache holds 2 KV heads"),
    (lambda K, V: KVCache(K, V).append(np.zeros((2, 1, 16)), np.zeros((2, 2, 16))), ValueError,
     "keys and values must have the same (heads, n)"),
    (lambda K, V: KVCache(K, V, window=-1), ValueError, "window must be >= 0"),
])
def test_bad_input_raises_clearly(bad, exc, msg):
    K, V = kv(n=50, d=16, heads=2, seed=25)
    with pytest.raises(exc) as info:
        bad(K, V)
    assert msg in str(info.value)


def test_failed_append_changes_nothing():
    K, V = kv(n=200, d=16, heads=2, seed=26)
    cache = KVCache(K, V)
    bad = np.zeros((2, 3, 16), np.float32)
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError):
        cache.append(bad, np.zeros((2, 3, 16), np.float32))
    assert len(cache) == 200


def test_cache_owns_its_arrays():
    K, V = kv(n=100, d=8, heads=1, seed=27)
    cache = KVCache(K, V)
    q = queries(1, 1, 8)
    before = cache.attend(q, budget=100)
    K[:] = 0.0
    V[:] = 0.0
    np.testing.assert_allclose(cache.attend(q, budget=100), before)


def test_bytes_per_token_of_quantized_selectors():
    K, V = kv(n=600, d=32, heads=1, seed=28)
    cache = KVCache(K, V)
    assert cache.bytes_per_token("lut") == 32 / 4  # 4 bits per 2 dimensions
    assert cache.bytes_per_token("lut", {"codes": "int8"}) == 32
    assert cache.bytes_per_token("pages") == 2 * 4 * 32 / 16
    assert cache.bytes_per_token("exact") == 0.0


def test_attend_runs_concurrently_with_append():
    K, V = kv(n=3000, d=16, heads=1, seed=29)
    cache = KVCache(K[:, :1000], V[:, :1000], window=32, merge_every=64)
    cache.prepare("lut")
    q = queries(1, 2, 16, seed=30)
    errors = []

    def reader():
        try:
            for _ in range(30):
                res = cache.attend(q, budget=0.1, selector="lut", details=True)
                n_seen = res.selected.max() + 1
                assert np.all(np.isfinite(res.output))
                assert n_seen <= len(cache)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for lo in range(1000, 3000, 50):
        cache.append(K[:, lo:lo + 50], V[:, lo:lo + 50])
    for t in threads:
        t.join()
    assert not errors, errors
    np.testing.assert_allclose(cache.attend(q, budget=3000, selector="lut"), full_attention(q, K, V),
                               rtol=1e-5, atol=1e-6)


def test_binned_topk_kernel():
    rng = np.random.default_rng(31)
    S = rng.standard_normal((5, 1000)).astype(np.float32)
    d_exact, i_exact = topk_rows(S, 10)
    d, i = binned_topk(S, 10, 1000)  # one bin per entry: exact
    np.testing.assert_array_equal(i, i_exact)
    d, i = binned_topk(S, 10, 64)
    # every result is its bin's best, and bins are distinct
    for r in range(5):
        assert len(set(i[r] % 64)) == 10
        for p in i[r]:
            assert S[r, p] == S[r, p % 64::64].min()


def test_selectors_registry():
    assert set(SELECTORS) == {"exact", "approx_topk", "lut", "pages", "index"}


jax = pytest.importorskip("jax", reason="the JAX path needs annlib[jax]")


def test_jax_attend_matches_numpy():
    from annlib.accel import attention as jax_attention

    K, V = kv(n=3000, d=32, heads=2, seed=32)
    q = queries(4, 2, 32, seed=33)
    ref = full_attention(q, K, V)
    np.testing.assert_allclose(np.asarray(jax_attention.full_attention(q, K, V)), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax_attention.attend(q, K, V, budget=3000)), ref, rtol=1e-4, atol=1e-5)
    exact = KVCache(K, V, window=16).attend(q, budget=0.05)
    got = np.asarray(jax_attention.attend(q, K, V, budget=0.05, window=16, mode="exact"))
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-5)
    binned = np.asarray(jax_attention.attend(q, jax.numpy.asarray(K), jax.numpy.asarray(V), budget=0.05,
                                             window=16, mode="bins"))
    assert np.linalg.norm(binned - exact) / np.linalg.norm(exact) < 0.05


def test_jax_approx_max_k_bins_keep_bin_winners():
    from annlib.accel.attention import approx_max_k

    rng = np.random.default_rng(34)
    S = rng.standard_normal((3, 5000)).astype(np.float32)
    vals, pos = approx_max_k(jax.numpy.asarray(S), 50, 0.95, "bins")
    vals, pos = np.asarray(vals), np.asarray(pos)
    np.testing.assert_allclose(vals, np.take_along_axis(S, pos, axis=1))
    exact = np.sort(np.argsort(-S, axis=1)[:, :50], axis=1)
    recall = np.mean([len(np.intersect1d(p, e)) / 50 for p, e in zip(pos, exact)])
    assert recall >= 0.9


def test_jax_attend_refuses_bad_shapes():
    from annlib.accel import attention as jax_attention

    K, V = kv(n=100, d=8, heads=2, seed=35)
    with pytest.raises(ValueError, match="not a multiple"):
        jax_attention.attend(np.zeros((3, 1, 8), np.float32), K, V, budget=10)
    with pytest.raises(ValueError, match="keys and values must have the same"):
        jax_attention.attend(np.zeros((2, 1, 8), np.float32), K, V[:, :50], budget=10)
    with pytest.raises(ValueError, match="q must be a 3-D array"):
        jax_attention.attend(np.zeros((2, 8), np.float32), K, V, budget=10)


@pytest.mark.parametrize("n, n_cand", [(1000, 50), (1000, 600), (70, 100)])
def test_select_all_pq_takes_the_smallest_sums(n, n_cand):
    from annlib.kernels.fastscan import PackedLeaves, lut_accumulate, select_all_pq
    from annlib.kernels.quantization import LookupTables, pack_codes

    rng = np.random.default_rng(36)
    M = 8
    nb = -(-n // 32)
    codes = np.zeros((nb * 32, M), np.uint8)
    codes[:n] = rng.integers(0, 16, (n, M))
    packed = pack_codes(codes)
    pos = np.full(nb * 32, -1, np.int32)
    pos[:n] = rng.permutation(n) + 1000  # positions are not entry numbers
    T = rng.integers(0, 30, (2, M, 16)).astype(np.uint8)
    leaves = PackedLeaves(np.array([0, nb]), packed, pos, np.zeros(0, np.float32), np.zeros(0, np.float32))
    got = select_all_pq(LookupTables(T, np.ones(2, np.float32), np.zeros(2, np.float32)), leaves, n_cand)
    for q in range(2):
        sums, _ = lut_accumulate(T[q], packed)
        by_pos = dict(zip(pos[:n].tolist(), sums[:n].tolist()))
        row = got[q]
        kept = row[row >= 0]
        assert len(kept) == min(n, n_cand) and len(set(kept.tolist())) == len(kept)
        assert np.all(row[len(kept):] == -1)
        rest = set(by_pos) - set(kept.tolist())
        if rest:
            assert max(by_pos[p] for p in kept) <= min(by_pos[p] for p in rest)


def test_examples_in_docs_attention_run():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "attention.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "docs/attention.md", "exec"), {})
