"""PQ / anisotropic / LUT16 / int8 kernels against plain numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from annlib.kernels import fastscan, lut16
from annlib.kernels.cluster import kmeans, kmeans_small
from annlib.kernels.quantization import (
    build_luts, encode_anisotropic, encode_nearest, int8_encode, int8_fit, pack_codes, pad_columns,
    pad_dim, parallel_cost_multiplier, split_residual_error, train_codebooks, unpack_codes,
)

from conftest import synthetic_set


def numpy_lut_sums(T, codes):
    return T[np.arange(T.shape[0])[None, :], codes].astype(np.int64).sum(1)


@pytest.mark.parametrize("M", [2, 26, 96, 256])
def test_lut_kernel_equals_numpy_exactly(M):
    g = np.random.default_rng(M)
    codes = g.integers(0, 16, (320, M)).astype(np.uint8)
    # worst case for overflow: every entry 255 is allowed while M * 255 fits 16 bits
    T = g.integers(0, 256, (M, 16)).astype(np.uint8)
    T[:, 0] = 255
    packed = pack_codes(codes)
    ref = numpy_lut_sums(T, codes)
    for generic in (False, True):
        sums, mins = fastscan.lut_accumulate(T, packed, generic)
        np.testing.assert_array_equal(sums, ref)
        np.testing.assert_array_equal(mins, ref.reshape(-1, 32).min(1))


@pytest.mark.parametrize("M", [2, 26, 96, 256])
def test_every_lut16_implementation_scores_like_numpy(M):
    """Each variant this CPU can run (not only the one picked at import) gives the exact sums,
    their minimum and the mask of the sums under a bar; a bar of 0 admits none. With M = 256 a
    point's sum reaches 256 * 255 = 65,280, the largest a 16-bit sum holds here (the AVX-512
    kernel's even / odd split is exact only modulo 2^16)."""
    g = np.random.default_rng(M + 1)
    codes = g.integers(0, 16, (32, M)).astype(np.uint8)
    T = g.integers(0, 256, (M, 16)).astype(np.uint8)
    T[:, 3] = 255
    codes[5] = 3  # one point, odd, at the largest sum
    codes[10] = 3  # and one even
    ref = numpy_lut_sums(T, codes)
    block = pack_codes(codes)[0]
    for impl in lut16.available():
        for bar in (0, int(np.median(ref)), int(ref.max()) + 1, 65535):
            sums, smallest, bits = lut16.run_block(impl, block, T, bar)
            np.testing.assert_array_equal(sums, ref, err_msg=impl)
            assert smallest == ref.min(), impl
            want = sum(1 << p for p in range(32) if ref[p] < bar)
            assert bits == want, (impl, bar)


def test_lut16_choice_follows_the_environment(monkeypatch):
    assert lut16.available()[-1] == "generic"
    monkeypatch.setenv("ANNLIB_LUT16", "generic")
    assert lut16._pick() == "generic"
    monkeypatch.setenv("ANNLIB_LUT16", "no-such-kernel")
    assert lut16._pick() == lut16.available()[0]
    with pytest.raises(ValueError, match="not available"):
        lut16.run_block("no-such-kernel", np.zeros((1, 32), np.uint8), np.zeros((2, 16), np.uint8), 1)


def test_pack_unpack_identity():
    codes = np.random.default_rng(1).integers(0, 16, (96, 10)).astype(np.uint8)
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes)), codes)


def test_pad_dim():
    assert pad_dim(50, 2) == 52 and pad_dim(128, 2) == 128 and pad_dim(7, 1) == 8 and pad_dim(9, 4) == 16


def test_parallel_cost_multiplier():
    eta = parallel_cost_multiplier(0.2, np.array([1.0]), 100)
    assert eta[0] == pytest.approx(4.125, rel=1e-6)
    assert parallel_cost_multiplier(1e-3, np.array([1.0]), 100)[0] == 1.0  # clamped below at 1
    assert parallel_cost_multiplier(2.0, np.array([1.0]), 100)[0] == 1e4  # T >= ||x||: clamped


@pytest.fixture(scope="module")
def unit_vectors():
    """Clustered unit vectors of dimension 50 (cosine-like data), padded to 52 columns."""
    X, _, _, _, _ = synthetic_set(n=20_000, d=50, n_queries=1, k=1, seed=3, metric="ip")
    X = (X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-30)).astype(np.float32)
    return pad_columns(X, pad_dim(X.shape[1], 2))


def test_eta_one_gives_plain_codes(unit_vectors):
    X = unit_vectors[:2000]
    cb = train_codebooks(X, 2, iters=5, rng=np.random.default_rng(0))
    plain = encode_nearest(X, cb)
    same = encode_anisotropic(X, X, cb, np.ones(len(X), np.float32), 10)
    np.testing.assert_array_equal(plain, same)
    # numpy reference for the nearest codeword
    sub = X.reshape(len(X), cb.shape[0], 1, 2)
    ref = ((sub - cb[None]) ** 2).sum(-1).argmin(-1)
    assert (plain == ref).mean() > 0.999


def test_anisotropic_lowers_parallel_error(unit_vectors):
    X = unit_vectors
    cb = train_codebooks(X, 2, iters=8, rng=np.random.default_rng(0))
    plain = encode_nearest(X, cb)
    eta = parallel_cost_multiplier(0.2, np.ones(len(X)), 50)
    aniso = encode_anisotropic(X, X, cb, eta, 10)
    par_p, perp_p = split_residual_error(X, plain, cb, X)
    par_a, perp_a = split_residual_error(X, aniso, cb, X)
    assert par_a < 0.8 * par_p
    assert perp_a > perp_p


def test_quantized_lut_close_to_float_scores(unit_vectors):
    X = unit_vectors[:640]
    Q = unit_vectors[-20:]
    cb = train_codebooks(X, 2, iters=5, rng=np.random.default_rng(0))
    codes = encode_nearest(X, cb)
    T, scale, base = build_luts(Q, cb)
    packed = pack_codes(codes)
    decoded = cb[np.arange(cb.shape[0])[None, :], codes].reshape(len(X), -1)
    M = cb.shape[0]
    for qi in range(len(Q)):
        approx = fastscan.lut_accumulate(T[qi], packed)[0].astype(np.float64) * scale[qi] + base[qi]
        exact = -(decoded @ Q[qi].astype(np.float64))
        assert np.abs(approx - exact).max() <= M * scale[qi] / 2 + 1e-4


def test_int8_round_trip():
    R = np.random.default_rng(2).normal(size=(500, 12)).astype(np.float32)
    mult = int8_fit(R)
    codes = int8_encode(R, mult)
    assert codes.dtype == np.int8 and np.abs(codes).max() <= 127
    assert np.all(np.abs(codes / mult - R) <= 0.5 / mult + 1e-6)


def test_kmeans_nonempty_and_deterministic():
    g = np.random.default_rng(0)
    X = g.normal(size=(3000, 8)).astype(np.float32)
    a = kmeans(X, 64, iters=5, rng=np.random.default_rng(1))
    b = kmeans(X, 64, iters=5, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    from annlib.kernels.cluster import assign_nearest

    labels, _ = assign_nearest(X, a)
    assert len(np.unique(labels)) == 64
    c = kmeans(X, 16, iters=3, rng=np.random.default_rng(1), init="kmeans++", spherical=True)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)
    small = kmeans_small(np.ascontiguousarray(X[None, :, :2]), np.ascontiguousarray(X[None, :16, :2]), 5)
    assert small.shape == (1, 16, 2) and np.isfinite(small).all()


@pytest.mark.parametrize("magnitude", [1e-20, 1.0, 1e17])
def test_tables_at_extreme_magnitudes(magnitude):
    """Tables stay exact integers with a positive finite scale for tiny and huge queries (the
    values are formed in float64): no division by zero, no overflow, and the sum of the table
    entries still approximates the float scores."""
    g = np.random.default_rng(2)
    cb = (g.normal(size=(8, 16, 2)) * magnitude).astype(np.float32)
    Q = (g.normal(size=(3, 16)) * magnitude).astype(np.float32)
    T, scale, base = build_luts(Q, cb)
    assert np.isfinite(scale).all() and (scale > 0).all() and np.isfinite(base).all()
    codes = g.integers(0, 16, (64, 8)).astype(np.uint8)
    decoded = cb[np.arange(8)[None, :], codes].reshape(64, -1).astype(np.float64)
    for q in range(3):
        approx = numpy_lut_sums(T[q], codes) * float(scale[q]) + float(base[q])
        exact = -(decoded @ Q[q].astype(np.float64))
        assert np.abs(approx - exact).max() <= 8 * float(scale[q]) / 2 * 1.001 + 1e-6 * np.abs(exact).max()


@pytest.mark.parametrize("magnitude", [1e-20, 1.0, 1e17])
@pytest.mark.parametrize("M,w", [(8, 2), (25, 2), (64, 2), (386, 2), (12, 1), (6, 4)])
def test_tables_of_a_batch_equal_those_built_one_query_at_a_time(magnitude, M, w):
    """Eight queries or more take the loop across sub-spaces; its tables, scales and bases are
    bit-identical to the per-query loop's (which one or a few queries take), ties, zero rows
    and sub-spaces of equal codewords included."""
    g = np.random.default_rng(M * w)
    cb = (g.normal(size=(M, 16, w)) * magnitude).astype(np.float32)
    cb[0] = cb[0, :1]  # every codeword alike: a zero range
    cb[1, 5:9] = cb[1, 4]  # ties for the minimum or maximum
    Q = (g.normal(size=(13, M * w)) * magnitude).astype(np.float32)
    Q[3] = 0.0
    Q[4, :w] = -0.0
    batch = build_luts(Q, cb)
    for q in range(Q.shape[0]):
        one = build_luts(Q[q:q + 1], cb)
        np.testing.assert_array_equal(batch.tables[q], one.tables[0])
        assert batch.scale[q] == one.scale[0] and batch.base[q] == one.base[0]


def test_many_subspaces_never_overflow_16_bits():
    """With M > 255 the 8-bit entries are scaled so that their rounded sum stays below 65536."""
    g = np.random.default_rng(4)
    M = 386  # 772 dimensions, 2 per sub-space: 65535 / M = 169.8 rounds up in every sub-space
    # every sub-space with the same range, so the 16-bit bound (not the 8-bit one) decides the
    # scale, and the per-entry rounding is as unfavourable as it gets
    one = g.normal(size=(16, 2)).astype(np.float32)
    cb = np.ascontiguousarray(np.broadcast_to(one, (M, 16, 2)))
    Q = np.ones((3, 2 * M), np.float32) + g.normal(size=(3, 2 * M)).astype(np.float32) * 1e-3
    T, scale, base = build_luts(Q, cb)
    worst = T.max(axis=2).astype(np.int64).sum(axis=1)
    assert (worst <= 65535).all()
    assert (worst >= 60000).all()  # and the range is still used


def test_quantization_errors_match_decoding():
    from annlib.kernels.quantization import int8_errors, pq_errors

    g = np.random.default_rng(6)
    R = g.normal(size=(300, 8)).astype(np.float32)
    cb = train_codebooks(R, 2, iters=4, rng=np.random.default_rng(0))
    codes = encode_nearest(R, cb)
    ref = np.linalg.norm(R - cb[np.arange(4)[None, :], codes].reshape(300, 8), axis=1)
    np.testing.assert_allclose(pq_errors(R, codes, cb), ref, rtol=1e-5, atol=1e-6)
    mult = int8_fit(R)
    c8 = int8_encode(R * 3, mult)  # beyond the fitted range: clipped, so the error is large
    err = int8_errors(R * 3, c8, mult)
    np.testing.assert_allclose(err, np.linalg.norm(R * 3 - c8 / mult, axis=1), rtol=1e-5, atol=1e-6)
    assert err.max() > 10 * int8_errors(R, int8_encode(R, mult), mult).max()


def reference_scan(tables, probes, packed, mask, n_cand):
    """Per query: every allowed position in the probed leaves with the best approximate score of
    its copies (the scan's float formula, in numpy), as a dict position -> score."""
    T, scale, base = tables
    out = []
    for q in range(T.shape[0]):
        sums = fastscan.lut_accumulate(T[q], packed.codes)[0]
        best = {}
        for leaf, bias in zip(probes.leaf_ids[q], probes.leaf_bias[q]):
            if leaf < 0:
                continue
            lo, hi = 32 * packed.block_offsets[leaf], 32 * packed.block_offsets[leaf + 1]
            v = sums[lo:hi].astype(np.float32) * scale[q] + np.float32(base[q] + bias)
            if packed.point_terms.shape[0]:
                v = v + packed.point_terms[lo:hi]
            for pos, value in zip(packed.entry_positions[lo:hi], v):
                if pos >= 0 and (mask.shape[0] == 0 or mask[pos]):
                    best[pos] = min(best.get(pos, np.inf), float(value))
        out.append(best)
    return out


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("masked", [False, True])
def test_scan_pq_keeps_the_best_distinct_candidates(metric, masked):
    """The scan's candidates are the ``n_cand`` best distinct positions of the probed leaves (each
    with the best score of its spilled copies), after buffer emptyings and bar rejections."""
    import annlib

    X, Q, *_ = synthetic_set(n=3000, d=16, n_queries=12, metric=metric, seed=3)
    index = annlib.Partitioned(metric=metric, num_leaves=30, random_state=0).build(X)
    st = index._st
    Qp = np.ascontiguousarray(index._metric.prepare(Q), dtype=np.float32)
    S = Qp @ st.centres.T
    D = st.centre_sqnorms[None, :] - 2.0 * S if st.centre_sqnorms.shape[0] else -S
    _, leaf_ids = fastscan.select_leaves(D, 8)
    probes = fastscan.Probes(leaf_ids, np.ascontiguousarray(-np.take_along_axis(S, leaf_ids, 1), dtype=np.float32))
    tables = build_luts(pad_columns(Qp, st.padded_dim), st.codebooks)
    mask = np.random.default_rng(1).random(st.num_vectors) < 0.7 if masked else np.zeros(0, dtype=bool)
    n_cand = 25  # far fewer than the probed entries (~800): the buffer is emptied several times
    cand_d, cand_i = fastscan.scan_pq(tables, probes, st.packed, mask, n_cand, st.num_vectors)
    for q, best in enumerate(reference_scan(tables, probes, st.packed, mask, n_cand)):
        ref = sorted(best.values())[:n_cand]
        got = cand_i[q][cand_i[q] >= 0]
        assert len(got) == len(ref) == n_cand and len(set(got.tolist())) == n_cand
        np.testing.assert_allclose(np.sort(cand_d[q]), ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cand_d[q], [best[p] for p in cand_i[q]], rtol=1e-5, atol=1e-5)
        # every position clearly inside the reference's top n_cand is a candidate
        clear = {p for p, v in best.items() if v < ref[-1] - 1e-4 * max(1.0, abs(ref[-1]))}
        assert clear <= set(got.tolist())
