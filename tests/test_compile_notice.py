"""The one-line notice when a family's kernels compile on first use (and only then)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import annlib
from annlib import _compile_notice


class _Kernel:
    """Stands in for a numba dispatcher: only the cache-index path is read."""

    def __init__(self, path):
        self._cache = type("C", (), {"_cache_file": type("F", (), {"_index_path": str(path)})()})()


def _family(tmp_path, name, exists):
    path = tmp_path / f"{name}.nbi"
    if exists:
        path.write_bytes(b"")
    module = type(sys)("annlib_test_kernels_" + name)
    module.kernel = _Kernel(path)
    sys.modules[module.__name__] = module
    return type(name, (), {"first_kernels": (f"{module.__name__}:kernel",)})


def test_notice_once_per_family_when_its_kernel_is_not_cached(tmp_path):
    cold = _family(tmp_path, "ColdFamily", exists=False)
    warm = _family(tmp_path, "WarmFamily", exists=True)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        _compile_notice.notice_compilation(cold)
        _compile_notice.notice_compilation(cold)  # once per process
        _compile_notice.notice_compilation(warm)
        _compile_notice.notice_compilation(type("Broken", (), {"first_kernels": ("no.such.module:k",)}))
    assert [type(w.message) for w in got] == [annlib.CompilationNotice]
    assert "compiling ColdFamily's kernels" in str(got[0].message)
    assert issubclass(annlib.CompilationNotice, UserWarning)


def test_real_families_name_kernels_numba_caches():
    for name in ("HNSW", "Partitioned", "BruteForce", "TPUKNN", "MahalanobisSketch"):
        cls = getattr(annlib, name)
        for ref in cls.first_kernels:
            module, attr = ref.split(":")
            kernel = getattr(__import__(module, fromlist=[attr]), attr)
            assert _compile_notice._cache_index_path(kernel), ref


def test_fresh_cache_build_warns_and_cached_build_does_not(tmp_path):
    script = (
        "import warnings, numpy as np, annlib\n"
        "X = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)\n"
        "with warnings.catch_warnings(record=True) as got:\n"
        "    warnings.simplefilter('always')\n"
        "    annlib.Partitioned(num_leaves=8, default_recall=None).build(X)\n"
        "print(sum(isinstance(w.message, annlib.CompilationNotice) for w in got))\n")
    # no compile-ahead children: this build never searches, they would outlive the process
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_NUM_THREADS": "1", "ANNLIB_COMPILE_AHEAD": "0"}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                           timeout=600) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:]
    assert [r.stdout.strip().splitlines()[-1] for r in runs] == ["1", "0"]
