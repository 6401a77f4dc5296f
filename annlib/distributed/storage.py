"""Where shard artefacts live: a local (or network-mounted) path, or a URI.

A plain path (or a ``file://`` URI) is used with the standard library. Any other URI
(``s3://bucket/prefix``, ``gs://...``, ``memory://...``) goes through fsspec, imported only then;
an index file is written to a local temporary file and uploaded, and read by downloading it to a
local temporary folder first (so it can still be memory-mapped).

Every function takes a *location*: a string naming a file or folder in one of these forms.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from typing import Any

import numpy as np

from .. import _validation as V
from ..api import Index, load as load_index

__all__ = ["is_remote", "join", "makedirs", "write_bytes", "read_bytes", "exists", "remove_tree",
           "save_index", "load_index_at", "save_arrays", "load_arrays", "new_folder"]


def _plain(location: str) -> str | None:
    """The local path of ``location``, or None when it is a URI fsspec must serve."""
    if location.startswith("file://"):
        return location[len("file://"):]
    return None if "://" in location else location


def is_remote(location: str) -> bool:
    """True when ``location`` is a URI other than ``file://``."""
    return _plain(location) is None


def _fs(location: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError as exc:
        raise V.storage_needs_fsspec(location, exc) from None
    return fsspec.core.url_to_fs(location)


def join(root: str, *names: str) -> str:
    """``root`` followed by ``names``, with ``/`` for URIs and the OS separator for paths."""
    plain = _plain(root)
    if plain is not None and not root.startswith("file://"):
        return os.path.join(root, *names)
    return "/".join([root.rstrip("/"), *names])


def makedirs(location: str) -> None:
    """Create the folder ``location`` (and its parents) if missing."""
    plain = _plain(location)
    if plain is not None:
        os.makedirs(plain, exist_ok=True)
    else:
        fs, path = _fs(location)
        fs.makedirs(path, exist_ok=True)


def new_folder(root: str, prefix: str) -> str:
    """A new, uniquely named folder under ``root`` (created)."""
    location = join(root, f"{prefix}-{uuid.uuid4().hex[:12]}")
    makedirs(location)
    return location


def write_bytes(location: str, data: bytes) -> None:
    """Write ``data`` to ``location``; a local file is written to a temporary name and renamed."""
    plain = _plain(location)
    if plain is not None:
        tmp = f"{plain}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, plain)
    else:
        fs, path = _fs(location)
        with fs.open(path, "wb") as fh:
            fh.write(data)


def read_bytes(location: str) -> bytes:
    """The bytes of the file at ``location``.

    Raises
    ------
    FileNotFoundError
        No file there.
    """
    plain = _plain(location)
    if plain is not None:
        with open(plain, "rb") as fh:
            return fh.read()
    fs, path = _fs(location)
    with fs.open(path, "rb") as fh:
        return fh.read()


def exists(location: str) -> bool:
    """Whether a file or folder is at ``location``."""
    plain = _plain(location)
    if plain is not None:
        return os.path.exists(plain)
    fs, path = _fs(location)
    return bool(fs.exists(path))


def remove_tree(location: str) -> None:
    """Remove the folder ``location`` and everything in it (nothing when it is missing)."""
    plain = _plain(location)
    if plain is not None:
        shutil.rmtree(plain, ignore_errors=True)
    else:
        fs, path = _fs(location)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def save_index(index: Index, location: str) -> None:
    """``index.save`` to ``location`` (uploaded through a local temporary file for a URI)."""
    plain = _plain(location)
    if plain is not None:
        index.save(plain)
        return
    fs, path = _fs(location)
    with tempfile.TemporaryDirectory(prefix="annlib-upload-") as tmp:
        local = os.path.join(tmp, "index.annlib")
        index.save(local)
        fs.put_file(local, path)


def load_index_at(location: str, *, mmap: bool = False) -> Index:
    """``annlib.load`` of the file at ``location`` (downloaded to a local temporary file first
    for a URI; the copy stays for the life of the process when memory-mapped)."""
    plain = _plain(location)
    if plain is not None:
        return load_index(plain, mmap=mmap)
    fs, path = _fs(location)
    tmp = tempfile.mkdtemp(prefix="annlib-download-")
    local = os.path.join(tmp, "index.annlib")
    fs.get_file(path, local)
    index = load_index(local, mmap=mmap)
    if not mmap:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def save_arrays(location: str, **arrays: np.ndarray) -> None:
    """Write named arrays as one ``.npz`` file at ``location``."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(location, buf.getvalue())


def load_arrays(location: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file written by :func:`save_arrays` (no pickled objects)."""
    with np.load(io.BytesIO(read_bytes(location)), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
