"""PQ / anisotropic / LUT16 / int8 kernels against plain numpy references (ALGORITHMS §2.4-§2.6)."""

from __future__ import annotations

import numpy as np
import pytest

from annlib.kernels import fastscan, lut16
from annlib.kernels.cluster import kmeans, kmeans_small
from annlib.kernels.quantization import (
    build_luts, encode_anisotropic, encode_nearest, int8_encode, int8_fit, pack_codes, pad_columns,
    pad_dim, parallel_cost_multiplier, split_residual_error, train_codebooks, unpack_codes,
)

from conftest import read_shared


def numpy_lut_sums(T, codes):
    return T[np.arange(T.shape[0])[None, :], codes].astype(np.int64).sum(1)


@pytest.mark.parametrize("M", [2, 26, 96])
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


def test_lut16_implementations_listed():
    assert lut16.available()[-1] == "generic"
    assert lut16.IMPLEMENTATION in lut16.available()


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
def glove_unit():
    X, _, _, _, _ = read_shared("glove-50-angular-200k")
    X = X[:20_000]
    X = (X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-30)).astype(np.float32)
    return pad_columns(X, pad_dim(X.shape[1], 2))


def test_eta_one_gives_plain_codes(glove_unit):
    X = glove_unit[:2000]
    cb = train_codebooks(X, 2, iters=5, rng=np.random.default_rng(0))
    plain = encode_nearest(X, cb)
    same = encode_anisotropic(X, X, cb, np.ones(len(X), np.float32), 10)
    np.testing.assert_array_equal(plain, same)
    # numpy reference for the nearest codeword
    sub = X.reshape(len(X), cb.shape[0], 1, 2)
    ref = ((sub - cb[None]) ** 2).sum(-1).argmin(-1)
    assert (plain == ref).mean() > 0.999


def test_anisotropic_lowers_parallel_error(glove_unit):
    X = glove_unit
    cb = train_codebooks(X, 2, iters=8, rng=np.random.default_rng(0))
    plain = encode_nearest(X, cb)
    eta = parallel_cost_multiplier(0.2, np.ones(len(X)), 50)
    aniso = encode_anisotropic(X, X, cb, eta, 10)
    par_p, perp_p = split_residual_error(X, plain, cb, X)
    par_a, perp_a = split_residual_error(X, aniso, cb, X)
    assert par_a < 0.8 * par_p
    assert perp_a > perp_p


def test_quantized_lut_close_to_float_scores(glove_unit):
    X = glove_unit[:640]
    Q = glove_unit[-20:]
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
