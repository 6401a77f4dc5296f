"""Compiling a first build's search kernels in a second process (annlib._compile_ahead)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import annlib
from annlib import _compile_ahead
from annlib.api import get_family

AHEAD_FAMILIES = ("hnsw", "partitioned")


@pytest.fixture
def no_children():
    yield
    _compile_ahead.wait(None, limit_s=60)
    assert not _compile_ahead._children and not _compile_ahead.pending


@pytest.mark.parametrize("family, params", [("hnsw", {}), ("partitioned", {}), ("partitioned", {"quantizer": "int8"})])
@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_ahead_index_is_valid_and_searches_exactly_enough(family, params, metric):
    cls = get_family(family)
    assert cls.compiles_ahead
    X = np.random.default_rng(0).standard_normal((200, 12)).astype(np.float32)
    index = cls._compile_ahead_index(X, metric, params, (10_000, 12), with_build_kernels=True)
    assert len(index) == 200 and index.metric == metric
    if family == "hnsw":
        index._graph.validate(12, 200)
    else:
        index._st.validate(12, 200, l2=metric == "l2")
    Q = X[:20] + 0.01
    truth = index.exact_search(Q, 5).ids
    got = index.search(Q, 5, **({"leaves": 2, "reorder": 200} if family == "partitioned" else {"ef": 200})).ids
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, truth)]) >= 0.98


def test_families_without_an_ahead_index():
    X = np.zeros((10, 4), np.float32)
    for name in ("bruteforce", "tpuknn"):
        cls = get_family(name)
        assert not cls.compiles_ahead and cls._compile_ahead_index(X, "l2", {}, (10, 4)) is None
    # FINGER (on by a parameter, or by the data's size) is fitted on the ahead index
    Y = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    hnsw = get_family("hnsw")
    assert hnsw._compile_ahead_index(Y, "l2", {"finger": True}, (10, 8)).finger_built
    # the build's shape decides (for the float walk: walk="auto" walks on codes, without FINGER)
    assert hnsw._compile_ahead_index(Y, "l2", {"walk": "float"}, (1 << 16, 128)).finger_built
    ahead = hnsw._compile_ahead_index(Y, "l2", {}, (1 << 16, 128))
    assert ahead.walk_built == "sq8" and not ahead.finger_built
    assert not hnsw._compile_ahead_index(Y, "l2", {"walk": "float"}, (1 << 20, 50)).finger_built
    assert not hnsw._compile_ahead_index(Y, "l2", {"walk": "float"}, (1000, 8)).finger_built


def test_switched_off_by_the_environment(monkeypatch, no_children):
    monkeypatch.setenv("ANNLIB_COMPILE_AHEAD", "0")
    assert not _compile_ahead.start(annlib.HNSW(), 1000, 8)
    assert not _compile_ahead.pending


def test_one_core_starts_nothing(monkeypatch, no_children):
    monkeypatch.setattr(_compile_ahead, "_usable_cpus", lambda: 1)
    assert not _compile_ahead.start(annlib.HNSW(), 1000, 8)
    assert not _compile_ahead.start(annlib.BruteForce(), 1000, 8)  # no ahead index anyway


def _fake_child(family, stages, script):
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    child = _compile_ahead._Child(family, stages, process)
    with _compile_ahead._lock:
        _compile_ahead._children.append(child)
        _compile_ahead.pending = True
    return process


def test_wait_waits_for_the_stage_asked_for(no_children):
    both = _fake_child("fake", (1, 2), "import time; print('stage 1', flush=True); time.sleep(1.5); "
                                       "print('stage 2', flush=True)")
    _compile_ahead.wait("other", _compile_ahead.STAGE_ALL)  # another family's: not waited for
    assert _compile_ahead.pending and both.poll() is None
    _compile_ahead.wait("fake", _compile_ahead.STAGE_MANY)
    assert both.poll() is None and _compile_ahead._children[0].reached == 1  # stage 2 still compiling
    _compile_ahead.wait("fake", _compile_ahead.STAGE_ALL)
    assert both.returncode == 0 and not _compile_ahead._children and not _compile_ahead.pending


def test_a_child_per_stage(no_children):
    many = _fake_child("fake", (1,), "import time; time.sleep(0.3); print('stage 1', flush=True)")
    one = _fake_child("fake", (2,), "import time; time.sleep(2.0); print('stage 2', flush=True)")
    _compile_ahead.wait("fake", _compile_ahead.STAGE_MANY)
    assert many.returncode == 0 and one.poll() is None  # the one-query child is not waited for
    assert [c.stages for c in _compile_ahead._children] == [(2,)] and _compile_ahead.pending
    _compile_ahead.wait("fake", _compile_ahead.STAGE_ALL)
    assert one.returncode == 0 and not _compile_ahead._children and not _compile_ahead.pending


def test_wait_gives_up_at_its_limit_and_a_dead_child_is_reaped(no_children):
    process = _fake_child("slow", (1, 2), "import time; time.sleep(30)")
    _compile_ahead.wait("slow", _compile_ahead.STAGE_MANY, limit_s=0.2)
    assert process.poll() is None and _compile_ahead.pending  # kept: the caller compiles itself meanwhile
    process.kill()
    _compile_ahead.wait("slow", limit_s=10)
    assert not _compile_ahead._children and not _compile_ahead.pending


@pytest.mark.skipif(_compile_ahead._usable_cpus() < 2, reason="starts only with two or more CPUs")
@pytest.mark.parametrize("family", AHEAD_FAMILIES)
def test_started_children_compile_and_exit(monkeypatch, no_children, family):
    monkeypatch.delenv("ANNLIB_COMPILE_AHEAD", raising=False)
    index = get_family(family)()
    assert _compile_ahead.start(index, 1000, 8)
    assert _compile_ahead.pending
    assert not _compile_ahead.start(index, 1000, 8)  # one child per family at a time
    children = list(_compile_ahead._children)
    assert [c.stages for c in children] == [(1, 2)]
    _compile_ahead.wait(family, _compile_ahead.STAGE_ALL, limit_s=300)
    assert [c.process.returncode for c in children] == [0] * len(children) and not _compile_ahead.pending


# The kernels the child compiles must be exactly those a real first build and its first searches
# need: run in a fresh interpreter (signatures accumulate per process), a build without the
# self-tune and without searches compiles the build's kernels; the ahead calls then compile the
# search side; a real self-tuned build of the same family and its batch, few- and one-query
# searches must then need no new signature of any kernel.
_COVERAGE = textwrap.dedent("""
    import json, sys, warnings
    import numpy as np
    import numba
    warnings.simplefilter("ignore")
    import annlib, annlib.kernels, pkgutil, importlib
    from annlib import _compile_ahead
    from annlib.api import get_family

    def signatures():
        out = set()
        for info in pkgutil.iter_modules(annlib.kernels.__path__):
            mod = importlib.import_module("annlib.kernels." + info.name)
            for name, obj in vars(mod).items():
                if isinstance(obj, numba.core.registry.CPUDispatcher):
                    out.update((info.name, name, str(s)) for s in obj.signatures)
        return out

    family, params = sys.argv[1], json.loads(sys.argv[2])
    rng = np.random.default_rng(1)
    X = rng.standard_normal((3000, 24)).astype(np.float32)
    Q = rng.standard_normal((50, 24)).astype(np.float32)
    annlib.Index.build(X, method=family, **{**params, "default_recall": None})
    built = signatures()
    ahead = get_family(family)._compile_ahead_index(X[:200], "l2", params, X.shape, with_build_kernels=True)
    _compile_ahead.run_ahead_calls(ahead)  # as the child does
    before = signatures()
    assert before - built, "the ahead calls compiled nothing"
    index = annlib.Index.build(X, method=family, **params)
    index.search(Q, 10); index.search(Q[:2], 10); index.search(Q[0], 10)
    new = signatures() - before
    print("NEW", sorted(new))
    sys.exit(1 if new else 0)
""")


@pytest.mark.parametrize("family, params", [("hnsw", {}), ("hnsw", {"finger": True}), ("hnsw", {"walk": "sq8"}),
                                            ("partitioned", {}),
                                            ("partitioned", {"quantizer": "int8"}),
                                            ("partitioned", {"rerank": "int8"})])
def test_the_child_compiles_every_kernel_a_first_build_searches_with(family, params):
    env = {**os.environ, "ANNLIB_COMPILE_AHEAD": "0", "NUMBA_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _COVERAGE, family, json.dumps(params)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_warmup_command_compiles_named_families_and_reports_unknown_ones(capsys):
    from annlib import warmup  # noqa: F401  (the module `python -m annlib.warmup` runs)

    assert _compile_ahead.main(["bruteforce", "nosuch"]) == 0
    out = capsys.readouterr().out
    assert "bruteforce: " in out and "nosuch: not compiled (ValueError: unknown method 'nosuch'" in out
    assert _compile_ahead.main(["nosuch"]) == 1


@pytest.mark.parametrize("family", AHEAD_FAMILIES)
def test_while_the_one_query_kernels_compile_few_queries_use_the_batch_kernels(family, no_children):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((2000, 16)).astype(np.float32)
    Q = rng.standard_normal((3, 16)).astype(np.float32)
    index = annlib.Index.build(X, method=family)
    expected_one, expected_few = index.search(Q[0], 10), index.search(Q, 10)
    process = _fake_child(family, (1, 2), "import time; print('stage 1', flush=True); time.sleep(60)")
    try:
        import time

        t0 = time.monotonic()
        one, few = index.search(Q[0], 10), index.search(Q, 10)
        assert time.monotonic() - t0 < 30  # answered without waiting for stage 2
        assert process.poll() is None and not _compile_ahead.ready(family, _compile_ahead.STAGE_ALL)
        assert _compile_ahead.ready(family, _compile_ahead.STAGE_MANY)
    finally:
        process.kill()
    assert one.ids.shape == (10,) and few.ids.shape == (3, 10)
    for got, want in ((one.ids[None], expected_one.ids[None]), (few.ids, expected_few.ids)):
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)]) >= 0.9
    np.testing.assert_allclose(few.distances[:, 0], expected_few.distances[:, 0], rtol=1e-4, atol=1e-4)
