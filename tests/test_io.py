"""The index file format: round trips, mmap, and every kind of bad file (docs/api.md, "Persistence")."""

from __future__ import annotations

import os

import numpy as np
import pytest

import annlib
from annlib import io


@pytest.fixture
def saved(blobs, tmp_path):
    X, Q = blobs
    index = annlib.BruteForce.build(X, metric="cosine", ids=np.arange(len(X)) * 2 + 1)
    path = tmp_path / "idx.annlib"
    index.save(path)
    return index, path, Q


def test_round_trip_and_mmap(saved):
    index, path, Q = saved
    for mmap in (False, True):
        loaded = annlib.load(path, mmap=mmap)
        assert loaded.metric == "cosine" and len(loaded) == len(index)
        a, b = index.search(Q, 7), loaded.search(Q, 7)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.distances, b.distances)
    mapped = annlib.load(path, mmap=True)
    assert isinstance(mapped._st.vectors, np.memmap)
    # add() on a mapped index copies and leaves the file untouched
    before = path.read_bytes()
    mapped.add(Q[:2], ids=[10**6, 10**6 + 1])
    assert path.read_bytes() == before and len(mapped) == len(index) + 2


def test_header_records_family_metric_params(saved):
    _, path, _ = saved
    header = io.read_index_file(path)
    assert header["family"] == "bruteforce" and header["metric"] == "cosine"
    assert header["format_version"] == io.FORMAT_VERSION
    assert set(header["arrays"]) >= {"vectors", "sqnorms", "__ids__"}


def _corrupt_and_expect(path, mutate, match):
    data = bytearray(path.read_bytes())
    mutate(data)
    bad = path.with_name("bad.annlib")
    bad.write_bytes(bytes(data))
    with pytest.raises(annlib.IndexFormatError, match=match):
        annlib.load(bad)
    with pytest.raises(ValueError):  # IndexFormatError is a ValueError
        annlib.load(bad, mmap=True)


def test_truncated_file(saved):
    _, path, _ = saved
    _corrupt_and_expect(path, lambda d: d.__delitem__(slice(len(d) - 100, None)), "truncated")
    _corrupt_and_expect(path, lambda d: d.__delitem__(slice(40, None)), "truncated")
    _corrupt_and_expect(path, lambda d: d.__delitem__(slice(10, None)), "not an annlib index file")


def test_flipped_payload_byte(saved):
    _, path, _ = saved

    def flip(d):
        d[len(d) - 5] ^= 0xFF

    _corrupt_and_expect(path, flip, "checksum mismatch in array")


def test_flipped_header_byte(saved):
    _, path, _ = saved

    def flip(d):
        d[30] ^= 0x01

    _corrupt_and_expect(path, flip, "header checksum mismatch")


def test_foreign_and_empty_files(tmp_path):
    for name, content in [("empty", b""), ("text", b"hello world, not an index" * 10), ("npy", b"\x93NUMPY" + b"\x00" * 200)]:
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(annlib.IndexFormatError, match="not an annlib index file"):
            annlib.load(p)
    with pytest.raises(FileNotFoundError):
        annlib.load(tmp_path / "missing.annlib")


def test_other_version(saved):
    _, path, _ = saved

    def bump(d):
        d[8] = 99

    _corrupt_and_expect(path, bump, "format version 99; this annlib reads version 1")


def test_unknown_family(tmp_path):
    p = tmp_path / "x.annlib"
    io.write_index_file(p, family="annoy", metric="l2", params={}, meta={}, arrays={}, library_version="0")
    with pytest.raises(annlib.IndexFormatError, match="unknown family 'annoy'"):
        annlib.load(p)


def test_inconsistent_state_is_a_format_error(tmp_path):
    p = tmp_path / "x.annlib"
    io.write_index_file(
        p, family="bruteforce", metric="l2", params={}, meta={"__dim__": 4, "__n_positions__": 3},
        arrays={"vectors": np.zeros((3, 4), np.float32), "sqnorms": np.zeros(5, np.float32)}, library_version="0",
    )
    with pytest.raises(annlib.IndexFormatError, match=r"bruteforce index, field 'sqnorms': expected shape \(3\)"):
        annlib.load(p)


def test_atomic_write_keeps_old_file(saved, monkeypatch):
    index, path, _ = saved
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        index.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_zero_size_arrays_round_trip(tmp_path):
    p = tmp_path / "z.annlib"
    arrays = {"empty": np.zeros((0, 5), np.float32), "also": np.zeros(0, np.int64), "x": np.arange(3.0)}
    io.write_index_file(p, family="bruteforce", metric="l2", params={}, meta={}, arrays=arrays, library_version="0")
    for mmap in (False, True):
        got = io.read_index_file(p, mmap=mmap)["arrays"]
        assert got["empty"].shape == (0, 5) and got["also"].dtype == np.int64
        np.testing.assert_array_equal(got["x"], np.arange(3.0))
