"""The kernel cache guard: cached code compiled against an older version of a callee is dropped."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from annlib.kernels.cache_guard import STAMP_NAME, drop_stale_caches, module_digests, stale_modules


def _sources():
    return {
        "a": b"from .b import f\n\ndef g():\n    return f()\n",
        "b": b"def f():\n    return 1\n",
        "c": b"def h():\n    from .b import f  # an import inside a function counts too\n    return f()\n",
        "d": b"import numpy\n",
    }


def test_digest_follows_transitive_imports():
    src = _sources()
    src["e"] = b"from .a import g\n"
    before = module_digests(src)
    src["b"] = b"def f():\n    return 2\n"
    after = module_digests(src)
    assert stale_modules(before, after) == ["a", "b", "c", "e"]  # e reaches b through a
    assert before["d"] == after["d"]
    assert stale_modules(after, after) == []
    assert stale_modules({}, after) == sorted(after)


def _write_package(tmp_path, sources):
    pkg = tmp_path / "pkg"
    pkg.mkdir(exist_ok=True)
    for name, src in sources.items():
        (pkg / f"{name}.py").write_bytes(src)
    return pkg


def _fake_cache_files(cache, names):
    cache.mkdir(exist_ok=True)
    for name in names:
        (cache / f"{name}.f-1.py311.nbi").write_bytes(b"index")
        (cache / f"{name}.f-1.py311.1.nbc").write_bytes(b"code")


def test_drop_stale_caches_deletes_only_dependents_of_a_changed_module(tmp_path):
    pkg = _write_package(tmp_path, _sources())
    cache = tmp_path / "cache"
    _fake_cache_files(cache, "abcd")
    # no stamp yet: nothing is known to be fresh
    assert drop_stale_caches(pkg, cache) == ["a", "b", "c", "d"]
    assert not list(cache.glob("*.nb?"))
    assert (cache / STAMP_NAME).exists()
    _fake_cache_files(cache, "abcd")
    assert drop_stale_caches(pkg, cache) == []
    assert len(list(cache.glob("*.nb?"))) == 8
    (pkg / "b.py").write_bytes(b"def f():\n    return 2\n")
    assert drop_stale_caches(pkg, cache) == ["a", "b", "c"]
    assert sorted(p.name.split(".")[0] for p in cache.glob("*.nb?")) == ["d", "d"]


def test_drop_stale_caches_never_raises(tmp_path):
    assert drop_stale_caches(tmp_path / "missing", tmp_path / "cache") == []
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    pkg = _write_package(tmp_path, _sources())
    assert drop_stale_caches(pkg, blocker) == []


_KERNELS = {
    "__init__": "from annlib.kernels.cache_guard import drop_stale_caches\n"
                "import os\n"
                "drop_stale_caches(os.path.dirname(__file__))\n",
    "callee": "import numba\n\n@numba.njit(cache=True)\ndef value():\n    return {value}\n",
    "caller": "import numba\nfrom .callee import value\n\n@numba.njit(cache=True)\ndef twice():\n"
              "    return 2 * value()\n",
}


def _run_caller(tmp_path, cache):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache),
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", "from kpkg.caller import twice; print(twice())"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def test_editing_a_callee_recompiles_its_cached_caller(tmp_path):
    # numba alone keys the caller's cache on caller.py: the old callee would stay compiled in
    pkg = tmp_path / "kpkg"
    pkg.mkdir()
    cache = tmp_path / "numba-cache"
    for name, src in _KERNELS.items():
        (pkg / f"{name}.py").write_text(textwrap.dedent(src).replace("{value}", "1"))
    assert _run_caller(tmp_path, cache) == 2
    assert list(cache.rglob("caller.*.nbi"))
    (pkg / "callee.py").write_text(_KERNELS["callee"].replace("{value}", "5"))
    assert _run_caller(tmp_path, cache) == 10
