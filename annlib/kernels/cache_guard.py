"""Drop numba's cached machine code when a kernel module a cached kernel calls has changed.

numba's ``cache=True`` keys a kernel's cached code on its own source file only (modification
time and size), but the code it stores has every kernel it calls compiled in: after an edit of
``distances.py`` the cached code of ``graph.py`` or ``fastscan.py`` would still run the old
distance loop. This module keeps, beside numba's cache files, a digest per kernel module of its
own source and of every kernel module it imports (transitively); when a digest differs from the
recorded one, that module's cache files are deleted before any kernel is loaded, and numba
compiles them again on first use.

It runs once, when :mod:`annlib.kernels` is imported, costs about a millisecond, and never
raises: any problem (no writable cache folder, another numba layout) leaves the cache as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

__all__ = ["module_digests", "stale_modules", "drop_stale_caches"]

STAMP_NAME = "annlib-kernel-sources.json"
_RELATIVE_IMPORT = re.compile(r"^\s*from \.(\w+) import", re.MULTILINE)


def module_digests(sources: dict[str, bytes]) -> dict[str, str]:
    """Digest of each module's source together with the sources of the modules it imports.

    Parameters
    ----------
    sources : dict
        Module name (file stem) -> source bytes. Imports are read from ``from .name import``
        lines; names not in ``sources`` are ignored.

    Returns
    -------
    dict
        Module name -> hex digest; it changes when the module or anything it reaches changes.
    """
    deps = {name: {m for m in _RELATIVE_IMPORT.findall(src.decode("utf-8", "replace")) if m in sources}
            for name, src in sources.items()}
    out = {}
    for name in sources:
        seen, todo = set(), [name]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(deps[m] - seen)
        h = hashlib.sha256()
        for m in sorted(seen):
            h.update(m.encode())
            h.update(hashlib.sha256(sources[m]).digest())
        out[name] = h.hexdigest()
    return out


def stale_modules(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """Modules whose digest is new or differs from the recorded one (sorted)."""
    return sorted(name for name, digest in current.items() if recorded.get(name) != digest)


def _numba_cache_dir(source_file: Path) -> Path | None:
    # the folder numba itself would choose for kernels of this file (same locators, same order)
    from numba.core.caching import CacheImpl

    def probe():
        pass

    for locator_class in CacheImpl._locator_classes:
        locator = locator_class.from_function(probe, str(source_file))
        if locator is not None:
            return Path(locator.get_cache_path())
    return None


def drop_stale_caches(package_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
                      ) -> list[str]:
    """Delete the numba cache files of kernel modules whose sources (or imports) changed.

    Parameters
    ----------
    package_dir : path, optional
        Folder of the kernel modules; default this package's folder.
    cache_dir : path, optional
        numba's cache folder for them; default the one numba chooses (``NUMBA_CACHE_DIR``, the
        ``__pycache__`` beside the sources, or the user-wide cache).

    Returns
    -------
    list of str
        The modules whose cache files were dropped (empty when nothing changed or on any error).
    """
    try:
        package = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
        sources = {p.stem: p.read_bytes() for p in sorted(package.glob("*.py")) if p.stem != "__init__"}
        # every module of the folder shares one cache folder: any of them locates it
        cache = Path(cache_dir) if cache_dir is not None else _numba_cache_dir(package / f"{min(sources)}.py")
        if cache is None or not sources:
            return []
        current = module_digests(sources)
        stamp = cache / STAMP_NAME
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            recorded = {}
        stale = stale_modules(recorded if isinstance(recorded, dict) else {}, current)
        if not stale:
            return []
        if cache.is_dir():
            for name in stale:
                for pattern in (f"{name}.*.nbi", f"{name}.*.nbc"):
                    for f in cache.glob(pattern):
                        try:
                            f.unlink()
                        except OSError:
                            pass
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"{STAMP_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(current, sort_keys=True))
        os.replace(tmp, stamp)  # atomic: a concurrent process reads the old or the new stamp
        return stale
    except Exception:  # a cache we cannot read or write is numba's business, not an import error
        return []
