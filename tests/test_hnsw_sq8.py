"""HNSW walking 8-bit scalar-quantized codes with exact re-scoring (``walk="sq8"``).

Small seeded data only; builds pass ``default_recall=None`` (no self-tuning).
"""

from __future__ import annotations

import numpy as np
import pytest

import annlib
from annlib import io
from annlib.errors import IndexFormatError
from annlib.indexes.hnsw import HNSW, SQ8Codes
from annlib.kernels.graph_sq8 import sq8_encode, sq8_fit, sq8_relative_noise

from conftest import synthetic_set, true_distances

K = 10


def _recall(ids, gt):
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / gt.shape[1] for a, b in zip(ids, gt)]))


@pytest.fixture(scope="module", params=["l2", "ip", "cosine"])
def built(request):
    metric = request.param
    X, Q, gt, _, _ = synthetic_set(2000, 24, 40, metric=metric, k=K, seed=5)
    index = HNSW(metric=metric, M=8, walk="sq8", default_recall=None, random_state=3).build(X)
    return metric, X, Q, gt, index


def test_recall_against_exact_ground_truth(built):
    metric, X, Q, gt, index = built
    res = index.search(Q, K, ef=64)
    assert _recall(res.ids, gt[:, :K]) >= 0.95
    plain = HNSW(metric=metric, M=8, default_recall=None, random_state=3).build(X)
    # the same graph walked on float32: the codes lose at most a little recall at equal ef
    assert _recall(res.ids, gt[:, :K]) >= _recall(plain.search(Q, K, ef=64).ids, gt[:, :K]) - 0.02


def test_returned_distances_are_exact(built):
    metric, X, Q, _, index = built
    res = index.search(Q, K, ef=48)
    exact = true_distances(X, Q, metric)
    want = np.take_along_axis(exact, res.ids, axis=1)
    np.testing.assert_allclose(res.distances, want, rtol=1e-4, atol=1e-4)
    assert (np.diff(res.distances, axis=1) >= 0).all()


def test_one_query_path_matches_the_batch(built):
    _, _, Q, _, index = built
    res = index.search(Q, K, ef=40)
    for r in range(0, Q.shape[0], 7):
        one = index.search(Q[r], K, ef=40)
        np.testing.assert_array_equal(one.ids, res.ids[r])
        # (cosine: the one-query kernel normalises the query itself, to the last bits)
        np.testing.assert_allclose(one.distances, res.distances[r], rtol=1e-5, atol=1e-6)
    threaded = index.search(Q, K, ef=40, threads=2)
    np.testing.assert_array_equal(threaded.ids, res.ids)


def test_rescoring_fewer_candidates_costs_exact_evaluations_not_recall_at_two_k(built):
    _, _, Q, gt, index = built
    index.reset_search_stats()
    index.search(Q, K, ef=64, rescore=2.0)
    st = index.search_stats()
    assert st["exact_per_query"] == 2 * K and st["estimated_per_query"] > 2 * K
    index.reset_search_stats()
    index.search(Q, K, ef=64, rescore=1000.0)
    assert index.search_stats()["exact_per_query"] == 64  # at most ef
    with pytest.raises(ValueError, match="rescore must be in"):
        index.search(Q, K, rescore=0.5)


def test_integer_data_codes_are_lossless():
    g = np.random.default_rng(7)
    X = g.integers(0, 256, size=(1500, 32)).astype(np.float32)
    X[:, 3] = 40.0  # a constant dimension
    offset, step = sq8_fit(X)
    assert (step == 1).all()
    codes = sq8_encode(X, offset, step)
    np.testing.assert_array_equal(offset[None, :] + codes.astype(np.float32), X)
    Q = g.integers(0, 256, size=(30, 32)).astype(np.float32)
    gt = np.argsort(true_distances(X, Q, "l2"), axis=1, kind="stable")[:, :K]
    index = HNSW(M=8, walk="sq8", default_recall=None).build(X)
    got = index.search(Q, K, ef=64).ids
    assert _recall(got, gt) >= 0.9
    # exact codes: the walk on them is the float walk of the same graph (up to rounding ties)
    plain = HNSW(M=8, default_recall=None).build(X).search(Q, K, ef=64).ids
    assert _recall(got, plain) >= 0.99


def test_codes_fit_the_range_and_clip_outside_it():
    X = np.array([[0.0, -1.0], [1.0, 3.0], [0.5, 1.0]], np.float32) * 1.7
    offset, step = sq8_fit(X)
    np.testing.assert_allclose(offset, X.min(axis=0))
    np.testing.assert_allclose(offset + 255 * step, X.max(axis=0), rtol=1e-6)
    far = np.array([[-100.0, 100.0]], np.float32)
    np.testing.assert_array_equal(sq8_encode(far, offset, step), [[0, 255]])


def test_adds_outside_the_range_refit_it_and_are_found():
    X, _, _, _, _ = synthetic_set(1200, 8, 5, k=K, seed=7)
    index = HNSW(M=8, default_recall=None).build(X)
    before = index._graph.sq8
    offset, step = before.offset.copy(), before.step.copy()
    index.add(X[:3] * 0.5 + 0.5 * X[3:6])  # inside the range: the same range, new rows encoded
    assert index._graph.sq8.offset is before.offset
    extra = X[:5] + 100.0  # far outside: clipped codes would all look alike
    index.add(extra, ids=np.arange(50_000, 50_005))
    g = index._graph
    assert not np.array_equal(g.sq8.offset + 255 * g.sq8.step, offset + 255 * step)
    np.testing.assert_array_equal(offset, before.offset)  # the codes published before stay as they were
    np.testing.assert_array_equal(g.sq8.codes[:g.n], sq8_encode(g.vectors[:g.n], g.sq8.offset, g.sq8.step))
    assert g.sq8.covers(g.vectors[:g.n])
    assert index.search(extra, 1, ef=32).ids[:, 0].tolist() == list(range(50_000, 50_005))
    assert [index.search(q, 1, ef=32).ids[0] for q in extra] == list(range(50_000, 50_005))


def test_refit_widens_only_the_sides_that_were_left_and_keeps_integer_codes_exact():
    X = np.array([[0.0, 10.0, 0.5], [4.0, 20.0, 1.5], [2.0, 15.0, 1.0]], np.float32)
    previous = sq8_fit(X)
    grown = np.vstack([X, [[5.0, 12.0, 3.5]]]).astype(np.float32)  # dim 2 passes the top only
    offset, step = sq8_fit(grown, previous, 1.0 / 16)
    assert offset[0] == 0.0 and step[0] == 1.0  # integers: step 1 already reaches 255, nothing passed
    np.testing.assert_allclose(offset[1:], [10.0, 0.5])  # bottoms not left: not widened
    np.testing.assert_allclose(offset[2] + 255 * step[2], 3.5 + 3.0 / 16, rtol=1e-6)
    low = np.vstack([X, [[-3.0, 10.0, 1.0]]]).astype(np.float32)
    offset, step = sq8_fit(low, previous, 1.0 / 16)
    assert offset[0] == np.floor(-3.0 - 7.0 / 16) and step[0] == 1.0
    codes = sq8_encode(low, offset, step)
    np.testing.assert_array_equal(offset[0] + codes[:, 0].astype(np.float32), low[:, 0])
    assert sq8_fit(grown, previous, 0.0)[0].tolist() == sq8_fit(grown)[0].tolist()


def test_refit_room_never_costs_integer_codes_their_exactness_nor_clips_a_stored_value():
    g = np.random.default_rng(4)
    # integers spanning nearly 255: room below may only go as far as the codes still reach the top
    X = np.stack([g.integers(10, 251, 300), g.integers(-3, 251, 300)], axis=1).astype(np.float32)
    X[0] = [10, -3]
    X[1] = [250, 250]
    previous = sq8_fit(X)
    for extra in ([[5.0, 0.0]], [[4.0, -4.0]], [[0.0, -5.0]]):  # spans 245..255 after the add
        grown = np.vstack([X, extra]).astype(np.float32)
        offset, step = sq8_fit(grown, previous, 1.0 / 16)
        assert (step == 1).all(), (extra, step)
        codes = sq8_encode(grown, offset, step)
        np.testing.assert_array_equal(offset[None, :] + codes.astype(np.float32), grown)
    # large values with a small spread: the widened offset, stored in float32, must not round
    # the range's top below the largest stored value (it clipped 121 of 1,000 such cases once)
    for t in range(300):
        scale = 10 ** g.uniform(0, 6)
        spread = scale * 10 ** g.uniform(-6, -2)
        base = (scale + g.random((50, 2)) * spread).astype(np.float32)
        grown = np.vstack([base, base.min(axis=0) - np.float32(spread * g.uniform(0.01, 0.5))]).astype(np.float32)
        offset, step = sq8_fit(grown, sq8_fit(base), 1.0 / 16)
        codes = SQ8Codes(codes=sq8_encode(grown, offset, step), offset=offset, step=step)
        assert codes.covers(grown), t


def test_a_drifting_stream_of_adds_refits_the_range_rarely():
    # each added vector lies a little past the range: without room, every add would re-encode
    # every vector (O(n d) per add)
    g = np.random.default_rng(11)
    X = g.normal(size=(400, 8)).astype(np.float32)
    index = HNSW(M=8, default_recall=None).build(X)
    refits, top = 0, float(X[:, 0].max())
    stream = X[:60].copy()
    for t, row in enumerate(stream):
        before = index._graph.sq8.offset.copy(), index._graph.sq8.step.copy()
        row[0] = top + 0.01 * (t + 1)  # a slow drift in one dimension
        index.add(row[None], ids=[10_000 + t])
        now = index._graph.sq8
        refits += not (np.array_equal(now.offset, before[0]) and np.array_equal(now.step, before[1]))
    assert index.walk_built == "sq8"
    assert 1 <= refits <= 4, refits  # 60 adds past the range, a handful of re-fits
    g_ = index._graph
    assert g_.sq8.covers(g_.vectors[:g_.n])
    assert [index.search(q, 1, ef=32).ids[0] for q in stream[-5:]] == list(range(10_055, 10_060))


def test_auto_falls_back_to_the_float_walk_when_an_add_makes_the_codes_coarse():
    X, Q, _, _, _ = synthetic_set(1200, 8, 5, k=K, seed=8)
    index = HNSW(M=8, default_recall=None).build(X)
    asked = HNSW(M=8, walk="sq8", default_recall=None).build(X)
    outlier = X[:1].copy()
    outlier[0, 2] = 1e6  # stretches one dimension's range a million-fold
    for ix in (index, asked):
        ix.add(outlier, ids=[9_999])
    assert index.walk_built == "float" and asked.walk_built == "sq8"  # "auto" decides again; "sq8" keeps codes
    assert index.search(outlier, 1, ef=32).ids[0, 0] == 9_999
    exact = index.exact_search(Q, K).ids
    assert _recall(index.search(Q, K, ef=64).ids, exact) >= 0.95


def test_add_delete_and_filter(built):
    metric, X, Q, _, _ = built
    index = HNSW(metric=metric, M=8, walk="sq8", default_recall=None, random_state=3).build(X[:1500])
    index.add(X[1500:])
    g = index._graph
    assert g.sq8.codes.shape[0] == g.capacity
    np.testing.assert_array_equal(g.sq8.codes[:g.n], sq8_encode(g.vectors[:g.n], g.sq8.offset, g.sq8.step))
    truth = true_distances(X, Q, metric)
    gt = np.argsort(truth, axis=1, kind="stable")[:, :K]
    assert _recall(index.search(Q, K, ef=64).ids, gt) >= 0.93
    gone = np.arange(0, 2000, 3)
    index.delete(gone)
    res = index.search(Q, K, ef=64)
    assert not np.isin(res.ids, gone).any()
    one = np.stack([index.search(q, K, ef=64).ids for q in Q])
    np.testing.assert_array_equal(one, res.ids)
    allowed = np.arange(1, 2000, 2)
    res = index.search(Q, K, ef=64, filter=allowed)
    assert np.isin(res.ids[res.ids >= 0], allowed).all()
    live = np.setdiff1d(allowed, gone)
    sub = np.argsort(truth[:, live], axis=1, kind="stable")[:, :K]
    assert _recall(res.ids, live[sub]) >= 0.9


def test_save_load_round_trip(built, tmp_path):
    _, X, Q, _, index = built
    path = tmp_path / "sq8.annlib"
    index.save(path)
    for mmap in (False, True):
        back = annlib.load(path, mmap=mmap)
        assert back.params["walk"] == "sq8" and back._graph.sq8 is not None
        np.testing.assert_array_equal(back._graph.sq8.norms[:back._graph.n], index._graph.sq8.norms[:index._graph.n])
        a, b = index.search(Q, K, ef=32), back.search(Q, K, ef=32)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.distances, b.distances, rtol=1e-6)
        back.add(X[:5] + 0.01)
    assert index.memory_bytes() >= HNSW(M=8, walk="float", default_recall=None).build(X).memory_bytes() + X.shape[0] * X.shape[1]


def _mutations(meta, arrays):
    def a(name, value):
        return {**arrays, name: value}
    codes, offset, step = arrays["sq8_codes"], arrays["sq8_offset"], arrays["sq8_step"]
    yield "sq8_codes", a("sq8_codes", codes[:-1])
    yield "sq8_codes", a("sq8_codes", codes[:, :-1])
    yield "sq8_codes", a("sq8_codes", codes.astype(np.int16))
    yield "sq8_codes", {k: v for k, v in arrays.items() if k != "sq8_codes"}
    yield "sq8_offset", a("sq8_offset", offset[:-1])
    yield "sq8_offset", a("sq8_offset", np.where(np.arange(offset.size) == 2, np.nan, offset).astype(np.float32))
    yield "sq8_offset", {k: v for k, v in arrays.items() if k != "sq8_offset"}
    yield "sq8_step", a("sq8_step", np.where(np.arange(step.size) == 1, 0.0, step).astype(np.float32))
    yield "sq8_step", a("sq8_step", np.where(np.arange(step.size) == 1, -step, step).astype(np.float32))
    yield "sq8_step", a("sq8_step", np.where(np.arange(step.size) == 1, np.inf, step).astype(np.float32))
    yield "sq8_step", a("sq8_step", np.where(np.arange(step.size) == 1, 3e36, step).astype(np.float32))
    yield "sq8_step", a("sq8_step", step.astype(np.float64))
    yield "sq8_step", {k: v for k, v in arrays.items() if k != "sq8_step"}


def test_corrupted_files_are_refused_naming_the_field(built, tmp_path):
    _, X, _, _, index = built
    path = tmp_path / "ok.annlib"
    index.save(path)
    header = io.read_index_file(path)
    count = 0
    for field_name, arrays in _mutations(header["meta"], header["arrays"]):
        bad = tmp_path / f"bad{count}.annlib"
        io.write_index_file(bad, family=header["family"], metric=header["metric"], params=header["params"],
                            meta=header["meta"], arrays=arrays, library_version="test")
        count += 1
        with pytest.raises(IndexFormatError) as err:
            annlib.load(bad)
        assert repr(field_name) in str(err.value), (count, field_name, str(err.value))
    # codes in a file whose parameters say the float walk
    bad = tmp_path / "float_params.annlib"
    io.write_index_file(bad, family=header["family"], metric=header["metric"],
                        params={**header["params"], "walk": "float"}, meta=header["meta"],
                        arrays=header["arrays"], library_version="test")
    with pytest.raises(IndexFormatError, match="sq8_codes"):
        annlib.load(bad)


def test_files_without_codes_still_load(tmp_path):
    """Files of earlier releases (no walk parameter, no codes) load as the float walk."""
    X, Q, _, _, _ = synthetic_set(600, 8, 5, k=K, seed=2)
    index = HNSW(M=6, walk="float", default_recall=None).build(X)
    path = tmp_path / "old.annlib"
    index.save(path)
    header = io.read_index_file(path)
    params = {k: v for k, v in header["params"].items() if k != "walk"}
    old = tmp_path / "older.annlib"
    io.write_index_file(old, family=header["family"], metric=header["metric"], params=params,
                        meta=header["meta"], arrays=header["arrays"], library_version="test")
    back = annlib.load(old)
    assert back.params["walk"] == "float" and back._graph.sq8 is None
    np.testing.assert_array_equal(back.search(Q, 5).ids, index.search(Q, 5).ids)


def test_errors():
    with pytest.raises(ValueError, match="finger=True cannot be combined with walk='sq8'"):
        HNSW(walk="sq8", finger=True)
    with pytest.raises(ValueError, match="unknown walk"):
        HNSW(walk="int8")
    X, _, _, _, _ = synthetic_set(400, 8, 5, k=K, seed=4)
    index = HNSW(M=6, walk="sq8", default_recall=None).build(X)  # finger="auto": none built
    assert not index.finger_built
    assert index.search(X[:3], K, finger=True).ids.shape == (3, K)  # the search flag is moot
    with pytest.raises(IndexFormatError, match="sq8_step"):
        SQ8Codes(codes=np.zeros((3, 8), np.uint8), offset=np.zeros(8, np.float32),
                 step=np.zeros(8, np.float32)).validate(3, 8)


def test_self_tuned_build_and_compile_ahead_index():
    X, Q, gt, _, _ = synthetic_set(1200, 12, 20, k=K, seed=6)
    index = HNSW(M=8, walk="sq8").build(X)  # default_recall: tunes ef on the walk on codes
    assert index._graph.sq8 is not None and index.tuning is not None
    assert _recall(index.search(Q, K).ids, gt[:, :K]) >= 0.85
    ahead = HNSW._compile_ahead_index(X[:200], "l2", {"walk": "sq8"}, (1000, 12))
    assert ahead._graph.sq8 is not None and not ahead.finger_built


# ------------------------------------------------------------------ walk="auto" (the default)
def test_auto_walks_on_codes_by_default():
    X, Q, _, _, _ = synthetic_set(1500, 16, 20, k=K, seed=4)
    index = HNSW(M=8, default_recall=None).build(X)
    assert index.params["walk"] == "auto" and index.walk_built == "sq8" and not index.finger_built
    same = HNSW(M=8, walk="sq8", default_recall=None).build(X)
    a, b = index.search(Q, K, ef=32), same.search(Q, K, ef=32)
    np.testing.assert_array_equal(a.ids, b.ids)  # the same build and walk as walk="sq8"
    assert HNSW().walk_built is None


def test_auto_keeps_the_float_walk_for_finger_or_noisy_codes(monkeypatch):
    X, Q, gt, _, _ = synthetic_set(1500, 16, 20, k=K, seed=5)
    asked = HNSW(M=8, finger=True, default_recall=None).build(X)
    assert asked.walk_built == "float" and asked.finger_built
    # one extreme value stretches a dimension's range: its codes lose that dimension
    Y = X.copy()
    Y[7, 3] = 1e5
    noisy = HNSW(M=8, default_recall=None).build(Y)
    assert noisy.walk_built == "float" and not noisy.finger_built
    assert HNSW(M=8, walk="sq8", default_recall=None).build(Y).walk_built == "sq8"  # asked: kept
    # the threshold decides: with none allowed, clean data walk on floats too
    monkeypatch.setattr(HNSW, "_SQ8_MAX_RELATIVE_NOISE", 0.0)
    assert HNSW(M=8, default_recall=None).build(X + 0.5).walk_built == "float"


def test_relative_noise_of_codes():
    rng = np.random.default_rng(0)
    ints = rng.integers(0, 200, (500, 6)).astype(np.float32)
    assert sq8_relative_noise(ints, *sq8_fit(ints)) == 0.0  # integer data: exact codes
    G = rng.standard_normal((4000, 8)).astype(np.float32)
    g = sq8_relative_noise(G, *sq8_fit(G))
    step = sq8_fit(G)[1].astype(np.float64)
    # uniform rounding error: step^2 / 12 per dimension, against a variance of about 1 each
    assert np.isclose(g, np.sum(step ** 2 / 12) / np.sum(np.var(G, axis=0, dtype=np.float64)), rtol=0.15)
    G[0, 0] = 1e4
    assert sq8_relative_noise(G, *sq8_fit(G)) > 100 * g


def test_auto_files_round_trip_and_contradictions_are_refused(tmp_path):
    X, Q, _, _, _ = synthetic_set(800, 8, 5, k=K, seed=6)
    index = HNSW(M=6, default_recall=None).build(X)
    path = tmp_path / "auto.annlib"
    index.save(path)
    back = annlib.load(path)
    assert back.params["walk"] == "auto" and back.walk_built == "sq8"
    np.testing.assert_array_equal(back.search(Q, 5, ef=32).ids, index.search(Q, 5, ef=32).ids)
    header = io.read_index_file(path)
    # "auto" with finger=True resolves to the float walk: codes there contradict the parameters
    bad = tmp_path / "auto_finger.annlib"
    io.write_index_file(bad, family=header["family"], metric=header["metric"],
                        params={**header["params"], "finger": True}, meta=header["meta"],
                        arrays=header["arrays"], library_version="test")
    with pytest.raises(IndexFormatError, match="sq8_codes"):
        annlib.load(bad)
    # an "auto" float-walk index (noisy data) has no codes and loads as such
    Y = X.copy()
    Y[3, 1] = 1e6
    floaty = HNSW(M=6, default_recall=None).build(Y)
    floaty.save(tmp_path / "float.annlib")
    assert annlib.load(tmp_path / "float.annlib").walk_built == "float"
