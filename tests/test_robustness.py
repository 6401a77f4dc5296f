"""Hostile-user checks that apply to every family (issue 9, "What was found").

Each test runs over every registered family (and metric where it matters) on small seeded data,
so none of them needs the shared data sets. The issue item each test covers is in its docstring.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

import annlib
from annlib import io
from annlib.api import get_family
from annlib.metrics import get_metric

from conftest import (SMALL_BUILD, assert_valid_rows, exhaustive_search_params, family_metrics,
                      small_index, true_distances)

FAMILIES = annlib.families()
ADDERS = [f for f in FAMILIES if get_family(f).supports_add]
DELETERS = [f for f in FAMILIES if get_family(f).supports_delete]
FAMILY_METRIC = [(f, m) for f in FAMILIES for m in family_metrics(f)]


def _data(n=300, d=16, seed=0):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, d)).astype(np.float32)


def _exact(index, Q, k, **kw):
    return index.search(Q, k, **exhaustive_search_params(index), **kw)


def _same_results(a, b):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.distances, b.distances, rtol=1e-5, atol=1e-5)


def _assert_true_distances(res, X, Q, metric, ids_to_rows=None, rtol=1e-4, atol=1e-4):
    """Returned distances equal float64 recomputation on the (original) vectors."""
    ids = res.ids if ids_to_rows is None else ids_to_rows(res.ids)
    true = true_distances(X, Q, metric)
    want = np.take_along_axis(true, np.maximum(ids, 0), 1)
    ok = ids >= 0
    np.testing.assert_allclose(res.distances[ok], want[ok], rtol=rtol, atol=atol)


# ------------------------------------------------------------------ item 4: owned data
@pytest.mark.parametrize("family,metric", FAMILY_METRIC)
def test_caller_array_is_neither_written_nor_aliased_by_build(family, metric):
    """Item 4: build never writes the caller's array, and changing it afterwards changes nothing."""
    X = _data()
    Q = _data(8, seed=1)
    X_orig = X.copy()
    index = small_index(family, X, metric)
    np.testing.assert_array_equal(X, X_orig, err_msg="build wrote into the caller's array")
    before = _exact(index, Q, 10)
    _assert_true_distances(before, X_orig, Q, metric)
    X[:] = _data(seed=2)  # the caller reuses its buffer
    after = _exact(index, Q, 10)
    _same_results(before, after)
    _assert_true_distances(after, X_orig, Q, metric)


@pytest.mark.parametrize("family", ADDERS)
def test_caller_array_is_neither_written_nor_aliased_by_add(family):
    """Item 4: add copies the batch; reusing the caller's buffer later changes nothing."""
    X = _data(200)
    Y = _data(50, seed=3)
    Y_orig = Y.copy()
    index = small_index(family, X)
    index.add(Y)
    np.testing.assert_array_equal(Y, Y_orig, err_msg="add wrote into the caller's array")
    before = _exact(index, Y_orig[:10], 1)
    np.testing.assert_array_equal(before.ids[:, 0], 200 + np.arange(10))
    Y[:] = 1000.0
    after = _exact(index, Y_orig[:10], 1)
    _same_results(before, after)
    np.testing.assert_allclose(after.distances, 0.0, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_read_only_array_and_memmap_inputs_build(family, tmp_path):
    """Item 4: a read-only array and a read-only np.memmap build (and add), same as a plain copy."""
    X = _data()
    Q = _data(8, seed=1)
    reference = _exact(small_index(family, X.copy()), Q, 10)
    ro = X.copy()
    ro.setflags(write=False)
    np.save(tmp_path / "x.npy", X)
    raw = tmp_path / "x.f32"
    X.tofile(raw)
    inputs = {
        "read-only array": ro,
        "np.load mmap r": np.load(tmp_path / "x.npy", mmap_mode="r"),
        "np.memmap r": np.memmap(raw, dtype=np.float32, mode="r", shape=X.shape),
    }
    for what, arr in inputs.items():
        index = small_index(family, arr)
        res = _exact(index, Q, 10)
        np.testing.assert_array_equal(res.ids, reference.ids, err_msg=what)
        if get_family(family).supports_add:
            extra = np.memmap(raw, dtype=np.float32, mode="r", shape=X.shape)[:20]
            index.add(extra)
            assert len(index) == len(X) + 20, what
    # the files the memmaps read are untouched
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), X)
    np.testing.assert_array_equal(np.fromfile(raw, dtype=np.float32).reshape(X.shape), X)


@pytest.mark.parametrize("family", FAMILIES)
def test_call_that_raises_leaves_index_unchanged(family):
    """Item 4: a failed rebuild (and a failed add) keeps the old index as it was."""
    X = _data()
    Q = _data(8, seed=1)
    index = small_index(family, X, ids=10_000 + np.arange(len(X)))
    before = _exact(index, Q, 10)
    bad = _data(100, seed=5)
    bad[40, 3] = np.nan
    with pytest.raises(ValueError, match="first bad row is 40"):
        index.build(bad)
    with pytest.raises(ValueError):
        index.build(_data(100, d=16, seed=5)[:, :0])
    assert len(index) == len(X) and index.dim == X.shape[1]
    _same_results(before, _exact(index, Q, 10))
    if get_family(family).supports_add:
        with pytest.raises(ValueError, match="already in the index"):
            index.add(_data(5, seed=6), ids=[1, 2, 3, 4, 10_003])
        with pytest.raises(ValueError, match="first bad row is 40"):
            index.add(bad, ids=np.arange(len(bad)))
        assert len(index) == len(X)
        _same_results(before, _exact(index, Q, 10))


# ------------------------------------------------------------------ item 5: magnitudes
@pytest.mark.parametrize("family,metric", [fm for fm in FAMILY_METRIC if fm[1] in ("l2", "ip")])
def test_l2_ip_overflowing_magnitudes_are_refused(family, metric):
    """Item 5: entries whose float32 squares overflow (~1e20) raise ValueError naming the limit."""
    X = _data()
    limit = get_metric(metric).max_abs(X.shape[1])
    assert 1e17 < limit < 1e20
    with pytest.raises(ValueError, match=r"must be at most [0-9.e+]+"):
        small_index(family, X * np.float32(1e20), metric)
    index = small_index(family, X, metric)
    before = _exact(index, X[:5], 5)
    with pytest.raises(ValueError, match=r"must be at most [0-9.e+]+"):
        index.search(X[:5] * np.float32(1e20), 5)
    big = X[:5].astype(np.float64) * 1e20  # float64 input above the limit is refused too
    with pytest.raises(ValueError, match=r"must be at most [0-9.e+]+"):
        index.search(big, 5)
    if get_family(family).supports_add:
        with pytest.raises(ValueError, match=r"must be at most [0-9.e+]+"):
            index.add(X[:5] * np.float32(1e20))
    assert len(index) == len(X)
    _same_results(before, _exact(index, X[:5], 5))


@pytest.mark.parametrize("family,metric", [fm for fm in FAMILY_METRIC if fm[1] in ("l2", "ip")])
def test_l2_ip_just_below_the_limit_answer_correctly(family, metric):
    """Item 5: data at half the float32 limit give finite, correct distances and neighbours."""
    base = _data(300, 16).astype(np.float64)
    limit = get_metric(metric).max_abs(16)
    scale = 0.5 * limit / np.abs(base).max()
    X = (base * scale).astype(np.float32)
    Q = X[:6].copy()
    index = small_index(family, X, metric)
    res = _exact(index, Q, 10)
    assert_valid_rows(res.ids, res.distances, 10, valid_ids=range(len(X)), allow_padding=False, where=family)
    true = true_distances(X, Q, metric)
    got = np.take_along_axis(true, res.ids, 1)
    # relative to the size of the terms the float32 kernels add up
    tol = 1e-4 * (np.abs(true).max(axis=1, keepdims=True))
    assert (np.abs(res.distances - got) <= tol).all(), (res.distances, got)
    assert (got <= np.sort(true, axis=1)[:, :10] + tol).all(), "not the true nearest neighbours"
    if metric == "l2":
        np.testing.assert_array_equal(res.ids[:, 0], np.arange(6))


@pytest.mark.parametrize("scale", [1e30, 1e-25])
@pytest.mark.parametrize("family", [f for f in FAMILIES if "cosine" in family_metrics(f)])
def test_cosine_extreme_magnitudes(family, scale):
    """Item 5: cosine at 1e30 and 1e-25 gives distances in [0, 2], equal to float64, right ids."""
    g = np.random.default_rng(4)
    base = g.normal(size=(300, 16))
    X = (base * scale).astype(np.float32)
    Q = ((base[:8] + 0.05 * g.normal(size=(8, 16))) * scale).astype(np.float32)
    assert np.isfinite(X).all() and (np.abs(X[X != 0]) > 0).all()
    index = small_index(family, X, "cosine")
    res = _exact(index, Q, 10)
    assert_valid_rows(res.ids, res.distances, 10, valid_ids=range(len(X)), allow_padding=False, where=family)
    assert (res.distances >= -1e-5).all() and (res.distances <= 2 + 1e-5).all(), res.distances
    true = true_distances(X, Q, "cosine")
    np.testing.assert_allclose(res.distances, np.take_along_axis(true, res.ids, 1), atol=1e-4)
    assert (np.take_along_axis(true, res.ids, 1) <= np.sort(true, axis=1)[:, :10] + 1e-4).all()
    np.testing.assert_array_equal(res.ids[:, 0], np.arange(8))


# ------------------------------------------------------------------ item 6 (across families)
@pytest.mark.parametrize("n,k", [(300, 300), (40, 10), (40, 40)])
@pytest.mark.parametrize("family", FAMILIES)
def test_no_padding_when_enough_vectors_exist(family, n, k):
    """Item 6: with default search parameters and k <= n, rows are full (no -1 padding)."""
    X = _data(n, seed=n)
    index = small_index(family, X)
    res = index.search(_data(5, seed=9), k)
    assert_valid_rows(res.ids, res.distances, k, valid_ids=range(n), allow_padding=False, where=family)


@pytest.mark.parametrize("family", DELETERS)
def test_no_padding_after_deletes_when_enough_live_vectors(family):
    """Item 6: k = number of live vectors after deletions still gives full rows."""
    X = _data(300)
    index = small_index(family, X)
    gone = np.arange(0, 300, 6)
    index.delete(gone)
    live = set(range(300)) - set(gone.tolist())
    res = index.search(_data(5, seed=9), len(index))
    assert_valid_rows(res.ids, res.distances, len(index), valid_ids=live, allow_padding=False, where=family)


# ------------------------------------------------------------------ item 7: empty inputs
@pytest.mark.parametrize("family", FAMILIES)
def test_empty_filter_returns_all_padding(family):
    """Item 7: filter=[] is an empty set of ids: every row is -1 / +inf."""
    X = _data()
    index = small_index(family, X, ids=5000 + np.arange(len(X)))
    Q = _data(4, seed=1)
    for empty in ([], np.array([], dtype=np.int64), np.array([], dtype=np.uint64), ()):
        ids, dist = index.search(Q, 5, filter=empty)
        assert ids.shape == (4, 5) and (ids == -1).all() and np.isposinf(dist).all()
    ids, dist = index.search(Q[0], 3, filter=[])
    assert ids.shape == (3,) and (ids == -1).all() and np.isposinf(dist).all()
    ids, dist = index.search(Q, 5, filter=np.zeros(len(X), bool))
    assert (ids == -1).all() and np.isposinf(dist).all()


@pytest.mark.parametrize("family", DELETERS)
def test_delete_empty_is_a_no_op(family):
    """Item 7: delete([]) (numpy makes it float64) and an empty int array do nothing."""
    X = _data()
    index = small_index(family, X)
    before = _exact(index, X[:5], 5)
    index.delete([])
    index.delete(np.array([], dtype=np.int64))
    index.delete(())
    assert len(index) == len(X)
    _same_results(before, _exact(index, X[:5], 5))


@pytest.mark.parametrize("family", DELETERS)
def test_delete_twice_raises_and_failed_delete_deletes_nothing(family):
    """Item 7: one rule for all families: deleting an id twice raises ValueError "already
    deleted"; a call that raises (already deleted, or unknown id) deletes none of its ids."""
    X = _data()
    ext = 100 + 2 * np.arange(len(X))
    index = small_index(family, X, ids=ext)
    index.delete([ext[5]])
    assert len(index) == len(X) - 1
    with pytest.raises(ValueError, match="already deleted"):
        index.delete([ext[5]])
    with pytest.raises(ValueError, match="already deleted"):
        index.delete(np.array([ext[6], ext[5]]))
    with pytest.raises(ValueError, match="not in the index"):
        index.delete([ext[7], 3])  # 3 was never an id
    with pytest.raises(ValueError):
        index.delete(np.array([ext[8], 2**63 + 1], dtype=np.uint64))
    assert len(index) == len(X) - 1
    res = _exact(index, X[5:9], 1)
    np.testing.assert_array_equal(res.ids[1:, 0], ext[6:9])  # still there
    assert res.ids[0, 0] != ext[5]
    index.delete(np.array([ext[6], ext[6]]))  # a repeat within one call is one id
    assert len(index) == len(X) - 2
    res = _exact(index, X[:20], 20)
    assert not np.isin(res.ids, ext[[5, 6]]).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_load_of_a_folder_and_save_to_empty_path(family, tmp_path):
    """Item 7: load(folder) raises IndexFormatError; save("") and save(folder) raise ValueError."""
    with pytest.raises(annlib.IndexFormatError, match="folder"):
        annlib.load(tmp_path)
    with pytest.raises(annlib.IndexFormatError):
        annlib.load(str(tmp_path), mmap=True)
    index = small_index(family, _data(50))
    with pytest.raises(ValueError, match="empty path"):
        index.save("")
    with pytest.raises(ValueError, match="folder"):
        index.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("family", FAMILIES)
def test_orphan_temp_file_is_removed_by_next_save(family, tmp_path):
    """Item 7: a killed save's `.name.<pid>.xxx.tmp` is removed by the next save to that name;
    a live writer's temp file and other names' temp files are left alone."""
    index = small_index(family, _data(50))
    path = tmp_path / "idx.annlib"
    index.save(path)
    dead = _dead_pid()
    orphan = tmp_path / f".idx.annlib.{dead}.k3j4h5.tmp"
    orphan.write_bytes(b"half a file")
    other_name = tmp_path / f".other.annlib.{dead}.zz.tmp"
    other_name.write_bytes(b"x")
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".idx.annlib.{live_proc.pid}.q9.tmp"
        live.write_bytes(b"being written")
        index.save(path)
        assert not orphan.exists(), "orphan of a dead writer was not removed"
        assert live.exists(), "a live writer's temp file was removed"
        assert other_name.exists(), "a temp file of another name was removed"
        assert annlib.load(path).dim == 16
    finally:
        live_proc.kill()
        live_proc.wait()


# ------------------------------------------------------------------ item 8: messages
def test_magic_followed_by_garbage_has_no_bogus_version(tmp_path):
    """Item 8: magic bytes then garbage never reports a made-up format version."""
    g = np.random.default_rng(0)
    for trial in range(20):
        body = g.integers(0, 256, size=int(g.integers(0, 3000)), dtype=np.uint8).tobytes()
        if len(body) >= 4 and 0 < struct.unpack("<I", body[:4])[0] < 1000:
            continue
        p = tmp_path / f"g{trial}.annlib"
        p.write_bytes(io.MAGIC + body)
        with pytest.raises(annlib.IndexFormatError) as err:
            annlib.load(p)
        msg = str(err.value)
        assert "corrupt" in msg or "truncated" in msg or "not an annlib" in msg, msg
        assert not re.search(r"format version \d{4,}", msg), msg
        assert "this annlib reads version" not in msg, msg
    # version 1 followed by garbage: a corrupt header, not a version problem
    p = tmp_path / "v1.annlib"
    p.write_bytes(io.MAGIC + struct.pack("<III", 1, 200, 12345) + b"\0" * 4 + g.bytes(300))
    with pytest.raises(annlib.IndexFormatError, match="corrupt|truncated") as err:
        annlib.load(p)
    assert "version" not in str(err.value)


def _rewrite_header(src, dst, edit):
    """Copy an index file with its header JSON edited by ``edit(header)`` and a valid header CRC."""
    data = src.read_bytes()
    prefix = struct.Struct("<8sIII4x")
    magic, version, hlen, _ = prefix.unpack(data[:prefix.size])
    header = json.loads(data[prefix.size:prefix.size + hlen])
    edit(header)
    old_start = (prefix.size + hlen + 63) // 64 * 64
    new = json.dumps(header, sort_keys=True).encode()
    new_start = (prefix.size + len(new) + 63) // 64 * 64
    out = prefix.pack(magic, version, len(new), zlib.crc32(new) & 0xFFFFFFFF) + new
    out += b"\0" * (new_start - len(out)) + data[old_start:]
    dst.write_bytes(out)


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory):
    """One small saved index per family (l2, ids, a deletion where supported)."""
    folder = tmp_path_factory.mktemp("families")
    out = {}
    X = _data(120, 8)
    for family in FAMILIES:
        index = small_index(family, X, ids=7 + np.arange(len(X)))
        if get_family(family).supports_delete:
            index.delete([9])
        path = folder / f"{family}.annlib"
        index.save(path)
        out[family] = path
    return out


@pytest.mark.parametrize("with_params", [False, True])
@pytest.mark.parametrize("src,dst", [(s, d) for s in FAMILIES for d in FAMILIES if s != d])
def test_file_relabelled_as_another_family(saved_families, tmp_path, src, dst, with_params):
    """Item 8: a file whose header says another family raises IndexFormatError naming a field
    (or, where both families store the same state, loads and searches correctly)."""
    target = io.read_index_file(saved_families[dst])

    def relabel(header):
        header["family"] = dst
        if with_params:  # parameters valid for the new family: the state itself must be checked
            header["params"] = target["params"]
            header["metric"] = target["metric"]

    bad = tmp_path / "relabelled.annlib"
    _rewrite_header(saved_families[src], bad, relabel)
    try:
        loaded = annlib.load(bad)
    except annlib.IndexFormatError as exc:
        assert re.search(r"field '[^']+'", str(exc)), f"no field named: {exc}"
        return
    Q = _data(4, 8, seed=3)
    res = loaded.search(Q, 5)
    assert_valid_rows(res.ids, res.distances, 5, valid_ids=set(range(7, 127)), where=f"{src}->{dst}")


@pytest.mark.parametrize("family", FAMILIES)
def test_uint64_ids_above_int64_range(family):
    """Item 8: uint64 ids above 2**63 - 1 raise ValueError stating the range; 2**63 - 1 works."""
    X = _data(50)
    big = np.arange(50, dtype=np.uint64)
    big[3] = np.uint64(2**63 + 5)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*63 - 1\]"):
        small_index(family, X, ids=big)
    ok = np.arange(50, dtype=np.uint64)
    ok[3] = np.uint64(2**63 - 1)
    index = small_index(family, X, ids=ok)
    res = _exact(index, X[3], 1)
    assert res.ids.tolist() == [2**63 - 1] and res.ids.dtype == np.int64
    if get_family(family).supports_add:
        with pytest.raises(ValueError, match=r"\[0, 2\*\*63 - 1\]"):
            index.add(X[:2], ids=np.array([100, 2**64 - 1], dtype=np.uint64))
        assert len(index) == 50
    if get_family(family).supports_delete:
        with pytest.raises(ValueError, match=r"2\*\*63 - 1"):
            index.delete(np.array([2**63 + 5], dtype=np.uint64))
        assert len(index) == 50


def test_base_index_build_says_what_to_do():
    """Item 8: Index().build(X) is a TypeError that tells the user what to call instead."""
    with pytest.raises(TypeError, match=r"Index\.build\(X, method=\.\.\.\)") as err:
        annlib.Index().build(_data(10))
    assert "HNSW" in str(err.value) or "family" in str(err.value)
    assert not isinstance(err.value, NotImplementedError)


# ------------------------------------------------------------------ item 7: load-then-add
@pytest.mark.parametrize("family,random_state", [
    (f, rs) for f in ADDERS
    for rs in (["int", "none", "generator"] if "random_state" in get_family(f).build_defaults else ["int"])])
def test_load_then_add_equals_add_without_save(family, random_state, tmp_path):
    """Item 7: an index loaded from a file then added to equals the same adds without the file
    (HNSW draws levels for added points: its generator state must travel with the file)."""
    rs = {"int": 3, "none": None, "generator": np.random.default_rng(11)}[random_state]
    kw = {} if "random_state" not in get_family(family).build_defaults else {"random_state": rs}
    X = _data(200)
    Y1, Y2 = _data(60, seed=7), _data(60, seed=8)
    Q = _data(20, seed=9)
    a = small_index(family, X, **kw)
    path = tmp_path / "a.annlib"
    a.save(path)
    b = annlib.load(path)
    for Y in (Y1, Y2):
        a.add(Y, threads=1)
        b.add(Y, threads=1)
        a.save(path)  # and once more through a file in between
        c = annlib.load(path)
        ra, rb, rc = (i.search(Q, 10) for i in (a, b, c))
        _same_results(ra, rb)
        _same_results(ra, rc)
    if family == "hnsw":  # the graph itself, not only the answers
        sa, sb = a._state(), b._state()
        for name in sa[1]:
            np.testing.assert_array_equal(np.asarray(sa[1][name]), np.asarray(sb[1][name]), err_msg=name)


# ------------------------------------------------------------------ item 2: concurrent writers
@pytest.mark.parametrize("family", ADDERS)
def test_concurrent_adds_with_ids_keep_both_batches(family):
    """Item 2: two threads calling add(..., ids=...) at once: both batches present, searches work."""
    X = _data(100)
    index = small_index(family, X, ids=np.arange(100))
    rounds, m = 6, 30
    batches = [(_data(m, seed=100 + 2 * r + t), 1000 + (2 * r + t) * m + np.arange(m))
               for r in range(rounds) for t in range(2)]
    errors = []

    def writer(t):
        try:
            for r in range(rounds):
                barrier.wait()
                Y, ids = batches[2 * r + t]
                index.add(Y, ids=ids)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))
            barrier.abort()

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(index) == 100 + rounds * 2 * m
    Y_all = np.concatenate([b[0] for b in batches])
    ids_all = np.concatenate([b[1] for b in batches])
    _assert_each_vector_stored_under(index, Y_all, ids_all)
    res = index.search(Y_all[:50], 10)
    assert_valid_rows(res.ids, res.distances, 10, valid_ids=set(range(100)) | set(ids_all.tolist()),
                      allow_padding=False, where=family)
    res = index.search(Y_all[:5], 3, filter=ids_all[:3])
    assert set(res.ids.ravel().tolist()) == set(ids_all[:3].tolist())


def _assert_each_vector_stored_under(index, Y, ids, min_self_recall=0.95):
    """Every vector ``Y[j]`` is stored under ``ids[j]`` (a one-id filter is answered exactly), and
    an unfiltered exhaustive search finds nearly all of them (graph walks may miss a few)."""
    for j in range(len(Y)):
        res = index.search(Y[j], 1, filter=[ids[j]])
        assert res.ids[0] == ids[j] and res.distances[0] < 1e-3, (j, ids[j], res)
    top = _exact(index, Y, 1).ids[:, 0]
    assert np.mean(top == ids) >= min_self_recall, np.flatnonzero(top != ids)


@pytest.mark.parametrize("family", ADDERS)
def test_concurrent_adds_with_clashing_ids_one_wins(family):
    """Item 2: two writers claiming the same ids: exactly one succeeds, the index stays usable."""
    X = _data(100)
    index = small_index(family, X, ids=np.arange(100))
    Ys = [_data(20, seed=40), _data(20, seed=41)]
    ids = 500 + np.arange(20)
    outcome = [None, None]
    barrier = threading.Barrier(2)

    def writer(t):
        barrier.wait()
        try:
            index.add(Ys[t], ids=ids)
            outcome[t] = "ok"
        except ValueError as exc:
            outcome[t] = str(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(o == "ok" for o in outcome) == [False, True], outcome
    loser = outcome[0] if outcome[0] != "ok" else outcome[1]
    assert "already in the index" in loser
    winner = Ys[outcome.index("ok")]
    assert len(index) == 120
    _assert_each_vector_stored_under(index, winner, ids)


@pytest.mark.parametrize("family", ADDERS)
def test_concurrent_adds_without_ids_assign_distinct_positions(family):
    """Item 2: two writers without ids get disjoint position ranges; nothing is lost."""
    X = _data(100)
    index = small_index(family, X)
    Ys = [_data(25, seed=50), _data(25, seed=51)]
    barrier = threading.Barrier(2)
    errors = []

    def writer(t):
        barrier.wait()
        try:
            index.add(Ys[t])
        except Exception as exc:  # pragma: no cover
            errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(index) == 150 and index.n_positions == 150
    starts = []
    for Y in Ys:
        offsets = _exact(index, Y, 1).ids[:, 0] - np.arange(25)
        values, counts = np.unique(offsets, return_counts=True)
        starts.append(int(values[counts.argmax()]))
        _assert_each_vector_stored_under(index, Y, starts[-1] + np.arange(25))
    assert sorted(starts) == [100, 125]
