"""The one-line notice that a family's kernels are being compiled (first use on a machine).

Numba compiles a kernel on its first call and, with ``cache=True``, stores the result beside the
source (or in ``NUMBA_CACHE_DIR``); a later process loads it. A family names kernels its first
build and searches always run (``first_kernels``); when one of them has no cache index yet, they
are about to compile, and the user is told why the calls are slow.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings

from .errors import CompilationNotice

__all__ = ["notice_compilation"]

_checked: set[str] = set()
_lock = threading.Lock()


def _cache_index_path(kernel) -> str | None:
    """Where numba keeps the cache index of a ``cache=True`` kernel (None when unknown)."""
    cache = getattr(kernel, "_cache", None)
    return getattr(getattr(cache, "_cache_file", None), "_index_path", None)


def notice_compilation(family_cls: type) -> bool:
    """Warn (:class:`CompilationNotice`) once per family and process when its kernels compile.

    Checks the kernels named by ``family_cls.first_kernels`` (``"module:function"``); never
    raises: a kernel it cannot find or inspect is skipped. Returns whether it warned (the
    family's kernels are about to compile).
    """
    name = family_cls.__name__
    with _lock:
        if name in _checked:
            return False
        _checked.add(name)
    for ref in getattr(family_cls, "first_kernels", ()):
        try:
            module, attr = ref.split(":")
            path = _cache_index_path(getattr(importlib.import_module(module), attr))
        except Exception:  # a renamed kernel or another numba version: no notice, no failure
            continue
        if path is not None and not os.path.exists(path):
            warnings.warn(f"annlib: compiling {name}'s kernels for this machine on first use (seconds, up to "
                          "half a minute); later processes load them from the cache", CompilationNotice,
                          stacklevel=4)
            return True
    return False
