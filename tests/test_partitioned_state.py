"""PartitionedState: the typed state, its file form and the load validation (issue 9, item 3).

Every test saves a small index, changes one field of the file (keeping the checksums valid, as a
file from anywhere may), and checks that ``load`` refuses it with an IndexFormatError naming that
field, before any kernel could read out of bounds or return garbage. Seeded data only.
"""

from __future__ import annotations

import numpy as np
import pytest

import annlib
from annlib import io
from annlib.errors import IndexFormatError
from annlib.indexes.partitioned import PartitionedState


def _index(quantizer="pq4", metric="l2", outliers=False):
    g = np.random.default_rng(5)
    X = g.normal(size=(600, 12)).astype(np.float32)
    index = annlib.Partitioned.build(X, metric=metric, num_leaves=12, quantizer=quantizer, random_state=3,
                                     default_recall=None)
    if outliers:
        index.add((g.normal(size=(4, 12)) * 60 + 90).astype(np.float32))
    return index


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saved files of a few index kinds: name -> (path, header)."""
    folder = tmp_path_factory.mktemp("pstate")
    out = {}
    for name, kw in {"pq4": {}, "int8": {"quantizer": "int8"}, "ip": {"metric": "ip"},
                     "outliers": {"outliers": True}}.items():
        index = _index(**kw)
        path = folder / f"{name}.annlib"
        index.save(path)
        out[name] = (path, io.read_index_file(path))
    return out


def _rewrite(path, header, tmp_path, meta=None, arrays=None, drop=()):
    new_meta = dict(header["meta"])
    new_meta.update(meta or {})
    new_arrays = {k: np.array(v) for k, v in header["arrays"].items() if k not in drop}
    new_arrays.update(arrays or {})
    for key in drop:
        new_meta.pop(key, None)
    out = tmp_path / "mutated.annlib"
    io.write_index_file(out, family=header["family"], metric=header["metric"], params=header["params"],
                        meta=new_meta, arrays=new_arrays, library_version="test")
    return out


def _expect(path, field):
    with pytest.raises(IndexFormatError, match=f"field '{field}'"):
        annlib.load(path)


def test_state_round_trip_and_validate(saved, tmp_path):
    for name, (path, header) in saved.items():
        loaded = annlib.load(path)
        st = loaded._st
        assert isinstance(st, PartitionedState)
        st.validate(loaded.dim, loaded.n_positions, l2=loaded.metric == "l2",
                    dims_per_block=loaded.params["dims_per_block"])
        meta, arrays = st.to_file()
        assert meta == {k: v for k, v in header["meta"].items() if not k.startswith("__")}
        for key, arr in arrays.items():
            np.testing.assert_array_equal(arr, header["arrays"][key], err_msg=f"{name}: {key}")
        if loaded.metric == "l2":
            q = np.asarray(st.vectors[:3]) + 0.01
            assert (loaded.search(q, 1).ids[:, 0] == np.arange(3)).all()
    assert annlib.load(saved["outliers"][0])._st.exact_positions.size + annlib.load(
        saved["outliers"][0])._st.num_leaves > 12


def _a(header, name):
    return np.array(header["arrays"][name])


# (kind, field, mutation) -> the field the error must name. Each mutation keeps the checksums
# valid; every one of them would otherwise make a kernel read out of bounds or answer wrongly.
def _mutations():
    def offsets(f):
        return lambda h: {"leaf_block_offsets": f(_a(h, "leaf_block_offsets"))}

    def positions(f):
        return lambda h: {"entry_positions": f(_a(h, "entry_positions"))}

    def setitem(arr, idx, value):
        arr[idx] = value
        return arr

    n = 600
    return [
        ("pq4", "leaf_block_offsets", offsets(lambda o: setitem(o, 0, 1))),  # not starting at 0
        ("pq4", "leaf_block_offsets", offsets(lambda o: setitem(o, -1, o[-1] + 1))),  # past the end
        ("pq4", "leaf_block_offsets", offsets(lambda o: setitem(o, -1, o[-1] - 1))),  # short of the end
        ("pq4", "leaf_block_offsets", offsets(lambda o: setitem(o, 3, o[4] + 1))),  # decreasing
        ("pq4", "leaf_block_offsets", offsets(lambda o: np.r_[o[:-2], o[-1]])),  # one leaf missing
        ("pq4", "leaf_block_offsets", offsets(lambda o: o.astype(np.int32))),
        ("pq4", "entry_positions", positions(lambda p: setitem(p, int(np.argmax(p)), n))),  # out of range
        ("pq4", "entry_positions", positions(lambda p: setitem(p, 0, -2))),
        ("pq4", "entry_positions", positions(lambda p: p[:-32])),
        ("pq4", "entry_positions", positions(lambda p: p.astype(np.int64))),
        ("pq4", "entry_positions", positions(lambda p: np.where(p == 7, -1, p).astype(np.int32))),  # vector 7 lost
        ("pq4", "codes", lambda h: {"codes": _a(h, "codes")[:-1]}),
        ("pq4", "codes", lambda h: {"codes": _a(h, "codes")[:, :-1]}),
        ("pq4", "codes", lambda h: {"codes": _a(h, "codes").astype(np.int8)}),
        ("pq4", "centres", lambda h: {"centres": setitem(_a(h, "centres"), (2, 3), np.nan)}),
        ("pq4", "centres", lambda h: {"centres": setitem(_a(h, "centres"), (2, 3), 1e30)}),  # beyond float32-safe
        ("pq4", "centres", lambda h: {"centres": _a(h, "centres")[:, :-1]}),
        ("pq4", "centres", lambda h: {"centres": _a(h, "centres")[:-1]}),  # rows vs the leaf count
        ("pq4", "codebooks", lambda h: {"codebooks": setitem(_a(h, "codebooks"), (0, 0, 0), np.inf)}),
        ("pq4", "codebooks", lambda h: {"codebooks": _a(h, "codebooks")[:-1]}),  # odd sub-space count
        ("pq4", "codebooks", lambda h: {"codebooks": _a(h, "codebooks")[:, :8]}),  # not 16 codewords
        ("pq4", "padded_dim", lambda h: {"codebooks": _a(h, "codebooks")[:-2]}),  # fewer sub-spaces than dims
        ("pq4", "vectors", lambda h: {"vectors": setitem(_a(h, "vectors"), (5, 1), np.nan)}),
        ("pq4", "vectors", lambda h: {"vectors": _a(h, "vectors")[:-1]}),
        ("pq4", "point_terms", lambda h: {"point_terms": setitem(_a(h, "point_terms"), 0, np.nan)}),
        ("pq4", "point_terms", lambda h: {"point_terms": _a(h, "point_terms")[:-1]}),
        ("pq4", "exact_positions", lambda h: {"exact_positions": np.array([n], np.int32)}),
        ("pq4", "exact_positions", lambda h: {"exact_positions": np.array([4, 2], np.int32)}),
        ("pq4", "exact_positions", lambda h: {"exact_positions": np.array([3], np.int32)}),  # also in a leaf
        ("int8", "int8_multipliers", lambda h: {"int8_multipliers": setitem(_a(h, "int8_multipliers"), 0, 0.0)}),
        ("int8", "int8_multipliers", lambda h: {"int8_multipliers": _a(h, "int8_multipliers")[:-1]}),
        ("int8", "codes", lambda h: {"codes": _a(h, "codes")[:, :-1]}),
        ("int8", "codes", lambda h: {"codes": _a(h, "codes")[:-32]}),
        ("ip", "point_terms", lambda h: {"point_terms": np.zeros(32, np.float32)}),  # ip has none
    ]


MUTATIONS = _mutations()


@pytest.mark.parametrize("kind, field, mutate", MUTATIONS,
                         ids=[f"{k}-{f}-{i}" for i, (k, f, _) in enumerate(MUTATIONS)])
def test_mutated_arrays_are_refused_naming_the_field(saved, tmp_path, kind, field, mutate):
    path, header = saved[kind]
    changed = mutate(header)
    # a count in the metadata follows the mutated array where it must, so the array itself is
    # what the check meets
    meta = {}
    if "exact_positions" in changed:
        meta["num_exact"] = int(changed["exact_positions"].shape[0])
    _expect(_rewrite(path, header, tmp_path, meta=meta, arrays=changed), field)


META_MUTATIONS = [
    ("num_leaves", 13), ("num_leaves", "12"), ("num_blocks", 0), ("num_blocks", -1), ("num_exact", 1), ("padded_dim", 14),
    ("outlier_error_limit", float("nan")), ("outlier_error_limit", -1.0),
    ("anisotropic_scale_threshold", -0.5), ("anisotropic_scale_threshold", float("inf")),
]


@pytest.mark.parametrize("field, value", META_MUTATIONS, ids=[f"{f}={v}" for f, v in META_MUTATIONS])
def test_mutated_metadata_is_refused_naming_the_field(saved, tmp_path, field, value):
    path, header = saved["pq4"]
    _expect(_rewrite(path, header, tmp_path, meta={field: value}), field)


@pytest.mark.parametrize("field", ["centres", "leaf_block_offsets", "entry_positions", "codes", "vectors",
                                   "exact_positions", "point_terms", "codebooks", "num_leaves",
                                   "num_blocks", "outlier_error_limit"])
def test_missing_fields_are_named(saved, tmp_path, field):
    path, header = saved["pq4"]
    _expect(_rewrite(path, header, tmp_path, drop=(field,)), field)


def test_count_of_positions_must_match_the_vectors(saved, tmp_path):
    path, header = saved["pq4"]
    _expect(_rewrite(path, header, tmp_path, meta={"__n_positions__": 599}), "vectors")


def test_a_different_quantizer_in_the_parameters_is_refused(saved, tmp_path):
    path, header = saved["pq4"]
    header = dict(header, params={**header["params"], "quantizer": "int8"})
    with pytest.raises(IndexFormatError):
        annlib.load(_rewrite(path, header, tmp_path))
    header = dict(saved["pq4"][1], params={**saved["pq4"][1]["params"], "dims_per_block": 4})
    _expect(_rewrite(path, header, tmp_path), "codebooks")


def test_loaded_mmap_index_is_validated_too(saved, tmp_path):
    path, header = saved["pq4"]
    bad = _rewrite(path, header, tmp_path, arrays={"entry_positions": np.where(
        _a(header, "entry_positions") >= 0, 10**6, -1).astype(np.int32)})
    with pytest.raises(IndexFormatError, match="'entry_positions'"):
        annlib.load(bad, mmap=True)
