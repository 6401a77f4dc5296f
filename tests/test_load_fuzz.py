"""Load fuzzer: mutated index files must raise IndexFormatError or load into a working index.

For every family a small index (with ids, an ``add`` and a ``delete`` where supported) is saved,
then mutated in two ways (issue 9, items 3 and "Property and fuzz suites"):

(a) raw corruption -- flipped bytes, truncations, appended bytes: every one that touches checked
    bytes (prefix, header, array payload) or the file's length must raise IndexFormatError;
(b) mutations with valid checksums -- the header JSON and the arrays are decoded, one field is
    changed (an integer entry set to -1, a huge value or n; a float to NaN/inf; a shape, dtype or
    name of an array; a count in the metadata; a parameter; the family or metric), and the file is
    written back with correct CRCs. Each such file must either raise IndexFormatError on load, or
    load and then answer searches (and an add and a delete, where the family supports them) with
    valid rows.

Loads run in a subprocess per family (this file is also the worker script), so a segfault or a
hang fails the test and names the mutation instead of killing pytest. The worker prints one JSON
line before and one after each mutation.
"""

from __future__ import annotations

import copy
import faulthandler
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import annlib

_HERE = Path(__file__).resolve().parent
_PREFIX = struct.Struct("<8sIII4x")
# seconds; a hang (or minutes of JIT compiling for a dtype the file should not have) fails
_PER_MUTATION_TIMEOUT = 90

# Outcomes the parent accepts for (b); (a) must be "format_error" where the bytes are covered.
ACCEPTED = {"format_error", "ok", "ok-padded", "ok-empty"}


# ================================================================== worker (runs in a subprocess)
def _emit(**record):
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _build_and_save(family, path):
    from annlib.api import get_family

    sys.path.insert(0, str(_HERE))
    from conftest import small_index

    g = np.random.default_rng(0)
    X = g.normal(size=(160, 8)).astype(np.float32)
    index = small_index(family, X, ids=1000 + 3 * np.arange(len(X)))
    cls = get_family(family)
    if cls.supports_add:
        index.add(g.normal(size=(20, 8)).astype(np.float32), ids=5000 + np.arange(20))
    if cls.supports_delete:
        index.delete([1000 + 3 * 7, 5003])
    index.save(path)


def _layout(data):
    """Byte regions of a file: list of (start, end, covered) where covered bytes are checksummed."""
    _, _, hlen, _ = _PREFIX.unpack(data[:_PREFIX.size])
    header = json.loads(data[_PREFIX.size:_PREFIX.size + hlen])
    payload = (_PREFIX.size + hlen + 63) // 64 * 64
    regions = [(0, 20, True), (20, 24, False), (24, 24 + hlen, True), (24 + hlen, payload, False)]
    for entry in header["arrays"]:
        start = payload + entry["offset"]
        regions.append((start, start + entry["nbytes"], True))
    return regions, header, payload


def _covered(regions, pos):
    return any(a <= pos < b for a, b, c in regions if c)


def _raw_mutations(data, rng):
    """(name, bytes, must_raise) for flipped bytes, truncations and appended bytes."""
    regions, header, payload = _layout(data)
    data_end = max([b for a, b, c in regions if c])
    out = []
    positions = set(rng.integers(0, len(data), 80).tolist())
    positions |= {0, 7, 8, 11, 12, 15, 16, 19, 20, 23, 24, 25, payload - 1, len(data) - 1}
    for a, b, c in regions:
        if b > a:
            positions |= {a, b - 1, (a + b) // 2}
    for pos in sorted(p for p in positions if 0 <= p < len(data)):
        mutated = bytearray(data)
        mutated[pos] ^= int(rng.integers(1, 256))
        out.append((f"flip@{pos}", bytes(mutated), _covered(regions, pos)))
    cuts = {0, 1, 8, 12, 16, 23, 24, 25, payload - 1, payload, len(data) - 1}
    cuts |= set(rng.integers(0, len(data), 12).tolist())
    for a, b, c in regions:
        cuts |= {a, a + 1, b - 1}
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        out.append((f"truncate@{cut}", data[:cut], cut < data_end))
    for extra in (1, 7, 64, 1000):
        out.append((f"append{extra}", data + rng.bytes(extra), True))
    out.append(("append-copy", data + data, True))
    out.append(("zero-payload", data[:payload] + bytes(len(data) - payload), True))
    return out


def _int_values(arr, n_positions, dim):
    info = np.iinfo(arr.dtype)
    values = {-1, n_positions, n_positions + 1, dim, int(info.max), int(info.min), 2**31 - 1}
    return sorted(v for v in values if info.min <= v <= info.max)


def _checksum_mutations(h, rng):
    """(name, mutate) pairs; ``mutate(h)`` edits a deep copy of the decoded file in place."""
    arrays = h["arrays"]
    meta = h["meta"]
    n_positions = int(meta.get("__n_positions__", 0))
    dim = int(meta.get("__dim__", 1))
    out = []

    def set_entry(name, where, value):
        def mutate(x):
            a = np.array(x["arrays"][name])
            flat = a.reshape(-1)
            flat[where] = value
            x["arrays"][name] = flat.reshape(a.shape)
        return mutate

    for name, arr in arrays.items():
        size = arr.size
        spots = sorted({0, size - 1, size // 2, int(rng.integers(0, size))}) if size else []
        if arr.dtype.kind in "iu":
            for v in _int_values(arr, n_positions, dim):
                for where in spots:
                    out.append((f"{name}[{where}]={v}", set_entry(name, where, v)))
            if size:
                out.append((f"{name}=all-1" if arr.dtype.kind == "i" else f"{name}=allmax",
                            lambda x, name=name: x["arrays"].__setitem__(
                                name, np.full_like(x["arrays"][name], -1 if x["arrays"][name].dtype.kind == "i"
                                                   else np.iinfo(x["arrays"][name].dtype).max))))
                out.append((f"{name}=reversed", lambda x, name=name: x["arrays"].__setitem__(
                    name, np.ascontiguousarray(x["arrays"][name][::-1]))))
                out.append((f"{name}=zeros", lambda x, name=name: x["arrays"].__setitem__(
                    name, np.zeros_like(x["arrays"][name]))))
        elif arr.dtype.kind == "f":
            for v in (np.nan, np.inf, -np.inf, 1e38, -1e38, 0.0):
                for where in spots[:2]:
                    out.append((f"{name}[{where}]={v}", set_entry(name, where, v)))
            if size:
                out.append((f"{name}=zeros", lambda x, name=name: x["arrays"].__setitem__(
                    name, np.zeros_like(x["arrays"][name]))))
        elif arr.dtype.kind == "b" and size:
            out.append((f"{name}=all-true", lambda x, name=name: x["arrays"].__setitem__(
                name, np.ones_like(x["arrays"][name]))))
            out.append((f"{name}=all-false", lambda x, name=name: x["arrays"].__setitem__(
                name, np.zeros_like(x["arrays"][name]))))
            for where in spots[:2]:
                out.append((f"{name}[{where}]=flip", lambda x, name=name, where=where: set_entry(
                    name, where, not bool(x["arrays"][name].reshape(-1)[where]))(x)))
        # shapes, dtypes, names
        if arr.ndim >= 1 and arr.shape[0] > 0:
            out.append((f"{name}:drop-last-row", lambda x, name=name: x["arrays"].__setitem__(
                name, np.ascontiguousarray(x["arrays"][name][:-1]))))
            out.append((f"{name}:extra-row", lambda x, name=name: x["arrays"].__setitem__(
                name, np.concatenate([x["arrays"][name], x["arrays"][name][-1:]]))))
            out.append((f"{name}:empty", lambda x, name=name: x["arrays"].__setitem__(
                name, np.ascontiguousarray(x["arrays"][name][:0]))))
        if arr.ndim == 2:
            out.append((f"{name}:transposed-shape", lambda x, name=name: x["arrays"].__setitem__(
                name, x["arrays"][name].reshape(x["arrays"][name].shape[::-1]))))
        if arr.ndim >= 1:
            out.append((f"{name}:flattened-2d" if arr.ndim == 1 else f"{name}:flattened",
                        lambda x, name=name: x["arrays"].__setitem__(
                            name, x["arrays"][name].reshape(1, -1) if x["arrays"][name].ndim == 1
                            else x["arrays"][name].reshape(-1))))
        other = {"i": np.float32, "u": np.int64, "f": np.float64, "b": np.uint8}.get(arr.dtype.kind, np.int32)
        if arr.dtype == np.float64:
            other = np.float32
        out.append((f"{name}:as-{np.dtype(other).name}", lambda x, name=name, other=other: x["arrays"].__setitem__(
            name, x["arrays"][name].astype(other))))
        out.append((f"{name}:missing", lambda x, name=name: x["arrays"].pop(name)))
    names = list(arrays)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            def swap(x, a=a, b=b):
                x["arrays"][a], x["arrays"][b] = x["arrays"][b], x["arrays"][a]
            out.append((f"swap:{a}<->{b}", swap))
    out.append(("extra-array", lambda x: x["arrays"].__setitem__("bogus", np.arange(3))))

    # metadata: counts, entry points, generator state, ...
    def meta_values(value):
        if isinstance(value, bool):
            return [not value, 0, "yes", None]
        if isinstance(value, int):
            return sorted({value - 1, value + 1, -1, 0, 2**31, 2**62, 2**70, n_positions, n_positions + 1}) + \
                [None, "3", 1.5, True, []]
        if isinstance(value, float):
            return [float("nan"), float("inf"), -1.0, 0.0, None, "x"]
        if isinstance(value, str):
            return ["", "abc", "-1", "99999999999999999999999", None, 7]
        if isinstance(value, list):
            return [value[:-1], value + value[-1:], [], None, ["x"] * len(value)] + \
                ([[float("nan")] + value[1:]] if value else [])
        if isinstance(value, dict):
            return [{}, None, "x"]
        return [None, 0, "x"]

    def meta_paths(obj, prefix=()):
        for key, value in obj.items():
            yield prefix + (key,), value
            if isinstance(value, dict):
                yield from meta_paths(value, prefix + (key,))

    def set_path(x, path, value, delete=False):
        target = x["meta"]
        for key in path[:-1]:
            target = target[key]
        if delete:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    for path, value in list(meta_paths(meta)):
        label = ".".join(path)
        for v in meta_values(value):
            out.append((f"meta.{label}={v!r}"[:120], lambda x, path=path, v=v: set_path(x, path, copy.deepcopy(v))))
        out.append((f"meta.{label}:missing", lambda x, path=path: set_path(x, path, None, delete=True)))
    out.append(("meta.bogus=1", lambda x: x["meta"].__setitem__("bogus", 1)))
    out.append(("meta=list", lambda x: x.__setitem__("meta", [])))

    for key, value in h["params"].items():
        for v in [None, -1, 0, "x", 10**9, 1.5, True, [], 2**70]:
            out.append((f"params.{key}={v!r}", lambda x, key=key, v=v: x["params"].__setitem__(key, v)))
        out.append((f"params.{key}:missing", lambda x, key=key: x["params"].pop(key)))
    out.append(("params.bogus=1", lambda x: x["params"].__setitem__("bogus", 1)))
    out.append(("params=list", lambda x: x.__setitem__("params", [1])))
    for metric in ("l2", "cosine", "ip", "mahalanobis", "hamming", 3, None):
        out.append((f"metric={metric!r}", lambda x, metric=metric: x.__setitem__("metric", metric)))
    for family in annlib.families() + ["nope", 5]:
        if family != h["family"]:
            out.append((f"family={family!r}", lambda x, family=family: x.__setitem__("family", family)))
    return out


def _check_loaded(index, Q, rng):
    """Search (then add and delete where supported) on a loaded index; return an outcome string."""
    from annlib.api import get_family

    n_live = len(index)
    if index.dim != Q.shape[1]:  # a file that claims another dimension: query in that one
        Q = rng.normal(size=(Q.shape[0], index.dim)).astype(np.float32)
    if n_live == 0:
        try:
            index.search(Q, 1)
        except ValueError:
            return "ok-empty"
        return "bad:search on an empty index did not raise"
    outcome = _search_rows(index, Q, min(5, n_live))
    if not outcome.startswith("ok"):
        return outcome
    cls = get_family(index.family)
    ids = None if index._ids is None else 10**12 + np.arange(3)
    if cls.supports_add:
        index.add(rng.normal(size=(3, index.dim)).astype(np.float32), ids=ids)
        after = _search_rows(index, Q, min(5, len(index)))
        if not after.startswith("ok"):
            return "after add: " + after
    if cls.supports_delete:
        victim = int(index.search(Q[:1], 1).ids[0, 0])
        if victim >= 0:
            index.delete([victim])
            after = _search_rows(index, Q, min(5, len(index)))
            if not after.startswith("ok"):
                return "after delete: " + after
    return outcome


def _search_rows(index, Q, k):
    ids, dist = index.search(Q, k)
    known = (lambda i: 0 <= i < index.n_positions) if index._ids is None else set(index._ids.tolist()).__contains__
    try:
        from conftest import assert_valid_rows

        assert_valid_rows(ids, dist, k, valid_ids=known)
    except AssertionError as exc:
        return "bad:" + str(exc)[:300]
    if (ids[:, 0] < 0).any():
        return "bad:a row of only -1 although the index holds vectors"
    return "ok-padded" if (ids < 0).any() else "ok"


def _try(path, Q, rng, mmap):
    start = time.perf_counter()
    outcome, msg = _try_once(path, Q, rng, mmap)
    return outcome, msg, round(time.perf_counter() - start, 4)


def _try_once(path, Q, rng, mmap):
    try:
        index = annlib.load(path, mmap=mmap)
    except annlib.IndexFormatError as exc:
        return "format_error", str(exc)[:400]
    except Exception as exc:  # noqa: BLE001 - every other type is a finding
        return f"exception:load:{type(exc).__name__}", str(exc)[:300]
    try:
        return _check_loaded(index, Q, rng), ""
    except Exception as exc:  # noqa: BLE001
        return f"exception:use:{type(exc).__name__}", str(exc)[:300]


def worker(family, folder):
    folder = Path(folder)
    sys.path.insert(0, str(_HERE))
    # Hundreds of files are written here; their durability is not under test, and an fsync per
    # file would dominate the run time on a slow disk.
    os.fsync = lambda fd: None
    original = folder / f"{family}.annlib"
    _build_and_save(family, original)
    from annlib import io

    rng = np.random.default_rng(1)
    Q = rng.normal(size=(4, 8)).astype(np.float32)
    data = original.read_bytes()
    target = folder / "mutated.annlib"
    # the unmodified file, plain and memory-mapped: also compiles whatever the mapped path needs,
    # which a cold cache would otherwise charge to the first mapped mutation's time limit
    for mmap in (False, True):
        outcome, msg, _ = _try(original, Q, rng, mmap)
        _emit(set="control", m="unmodified" + (" (mmap)" if mmap else ""), outcome=outcome, must_raise=False,
              msg=msg)

    for name, blob, must_raise in _raw_mutations(data, rng):
        _emit(set="raw", m=name, start=True)
        faulthandler.dump_traceback_later(_PER_MUTATION_TIMEOUT, exit=True)
        target.write_bytes(blob)
        outcome, msg, seconds = _try(target, Q, rng, False)
        faulthandler.cancel_dump_traceback_later()
        _emit(set="raw", m=name, outcome=outcome, must_raise=must_raise, msg=msg, t=seconds)

    decoded = io.read_index_file(original)
    base = {key: decoded[key] for key in ("family", "metric", "params", "meta")}
    base["arrays"] = {k: np.array(v) for k, v in decoded["arrays"].items()}
    for name, mutate in _checksum_mutations(base, rng):
        h = copy.deepcopy(base)
        try:
            mutate(h)
            io.write_index_file(target, family=h["family"], metric=h["metric"], params=h["params"],
                                meta=h["meta"], arrays=h["arrays"], library_version="fuzz")
        except (TypeError, ValueError) as exc:  # not expressible in a file (e.g. a non-JSON value)
            _emit(set="checksum", m=name, outcome="skipped", msg=str(exc)[:100])
            continue
        # memory-mapped arrays take other code paths (read-only, copied on write): try both for
        # the mutations that change arrays
        for mmap in ((False, True) if name.split("[")[0].split(":")[0].split("=")[0] in base["arrays"]
                     or name.startswith("swap") else (False,)):
            label = name + (" (mmap)" if mmap else "")
            _emit(set="checksum", m=label, start=True)
            faulthandler.dump_traceback_later(_PER_MUTATION_TIMEOUT, exit=True)
            outcome, msg, seconds = _try(target, Q, rng, mmap)
            faulthandler.cancel_dump_traceback_later()
            _emit(set="checksum", m=label, outcome=outcome, must_raise=False, msg=msg, t=seconds)
    _emit(set="done", m="done", outcome="done")


# ================================================================== tests (run by pytest)
_WORKER_TIMEOUT = 300  # seconds for one family's whole run


def _start_worker(family, folder):
    """Start the worker for ``family``; its output goes to files in ``folder`` (no pipe limits)."""
    env = dict(os.environ)
    root = str(Path(annlib.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Five workers share the machine: one numba/BLAS thread each avoids oversubscription.
    env.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = open(folder / "stdout.jsonl", "w")
    err = open(folder / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", family, str(folder)],
                            stdout=out, stderr=err, env=env)
    out.close()
    err.close()
    return proc, folder


def _finish_worker(proc, folder, deadline):
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    records = []
    for line in (folder / "stdout.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return proc, records, (folder / "stderr.txt").read_text()


def _crash_report(family, proc, records, stderr):
    started = [r for r in records if r.get("start")]
    last = started[-1]["m"] if started else "(before the first mutation)"
    killed = " (killed after the time limit)" if proc.returncode == -9 else ""
    return (f"{family} worker exited with code {proc.returncode}{killed} (negative = killed by a signal) "
            f"during mutation {last!r}\nstderr tail:\n{stderr[-3000:]}")


@pytest.fixture(scope="module")
def _workers(tmp_path_factory):
    """All families' workers, started together (they spend much of their time waiting on files)."""
    started = {f: _start_worker(f, tmp_path_factory.mktemp(f"fuzz-{f}")) for f in annlib.families()}
    yield {"started": started, "deadline": time.monotonic() + _WORKER_TIMEOUT, "done": {}}
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(params=annlib.families())
def fuzzed(request, _workers):
    family = request.param
    if family not in _workers["done"]:
        proc, folder = _workers["started"][family]
        _workers["done"][family] = _finish_worker(proc, folder, _workers["deadline"])
    proc, records, stderr = _workers["done"][family]
    return family, proc, records, stderr


def _results(records, which):
    return [r for r in records if r.get("set") == which and "outcome" in r]


def test_worker_did_not_crash(fuzzed):
    """A mutated file never segfaults, hangs or kills the interpreter."""
    family, proc, records, stderr = fuzzed
    assert proc.returncode == 0 and records and records[-1].get("m") == "done", \
        _crash_report(family, proc, records, stderr)
    control = _results(records, "control")
    assert len(control) == 2 and all(r["outcome"] == "ok" for r in control), control


def test_raw_corruption_raises_format_error(fuzzed):
    """(a) Flipped bytes in checked regions and truncation: IndexFormatError (a flip in the
    reserved or alignment bytes may also load, into a working index)."""
    family, proc, records, stderr = fuzzed
    raw = [r for r in _results(records, "raw") if not r["m"].startswith("append")]
    assert len(raw) > 50, _crash_report(family, proc, records, stderr)
    bad = [r for r in raw if (r["outcome"] != "format_error" if r["must_raise"] else r["outcome"] not in ACCEPTED)]
    assert not bad, f"{family}: {len(bad)} of {len(raw)} raw mutations not refused:\n" + \
        "\n".join(f"  {r['m']}: {r['outcome']} {r.get('msg', '')}" for r in bad[:40])


def test_appended_bytes_raise_format_error(_workers):
    """(a) Bytes after the last array (a concatenated or partly overwritten file): IndexFormatError.
    The reader is common to all families, so one test collects every family's outcomes."""
    bad = []
    for family, (proc, folder) in _workers["started"].items():
        if family not in _workers["done"]:
            _workers["done"][family] = _finish_worker(proc, folder, _workers["deadline"])
        proc, records, stderr = _workers["done"][family]
        appended = [r for r in _results(records, "raw") if r["m"].startswith("append")]
        assert appended, _crash_report(family, proc, records, stderr)
        bad += [f"{family} {r['m']} -> {r['outcome']}" for r in appended if r["outcome"] != "format_error"]
    assert not bad, "files with bytes appended were accepted: " + ", ".join(bad)


def test_valid_checksum_mutations_are_refused_or_harmless(fuzzed):
    """(b) A file with valid checksums but altered contents: IndexFormatError, or a working index."""
    family, proc, records, stderr = fuzzed
    done = _results(records, "checksum")
    assert len(done) > 100, _crash_report(family, proc, records, stderr)
    bad = [r for r in done if r["outcome"] not in ACCEPTED | {"skipped"}]
    assert not bad, f"{family}: {len(bad)} of {len(done)} valid-checksum mutations misbehaved:\n" + \
        "\n".join(f"  {r['m']}: {r['outcome']} {r.get('msg', '')}" for r in bad[:60])


def test_format_errors_name_a_field(fuzzed):
    """Item 3: a refused state says which field is wrong (not a bare KeyError text)."""
    family, proc, records, stderr = fuzzed
    refused = [r for r in _results(records, "checksum") if r["outcome"] == "format_error"]
    assert refused
    vague = [r for r in refused if "field '" not in r["msg"] and "array '" not in r["msg"]
             and "unknown family" not in r["msg"]]
    assert not vague, f"{family}: {len(vague)} refusals name no field:\n" + \
        "\n".join(f"  {r['m']}: {r['msg']}" for r in vague[:40])


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: test_load_fuzz.py --worker FAMILY FOLDER")
