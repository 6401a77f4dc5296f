"""The on-disk format of an annlib index (described in docs/api.md, "Persistence").

One self-describing file::

    bytes 0-7    magic  b"ANNLIB\\x00\\x01"
    bytes 8-11   format version (uint32, little endian)
    bytes 12-15  header length in bytes (uint32)
    bytes 16-19  CRC-32 of the header (uint32)
    bytes 20-23  reserved (zero)
    header       UTF-8 JSON: family, metric, build parameters, family metadata, array table
    payload      each array's raw bytes (C order, little endian), 64-byte aligned

The array table gives each array's name, dtype, shape, offset, byte count and CRC-32, so any
corruption or truncation is detected before an index object is created, and arrays can be
memory-mapped in place. Files are written under a temporary name in the target folder and renamed
into place, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import IndexFormatError

__all__ = ["FORMAT_VERSION", "MAGIC", "write_index_file", "read_index_file"]

MAGIC = b"ANNLIB\x00\x01"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIII4x")
_ALIGN = 64
_CRC_CHUNK = 1 << 24


def _crc32(arr: np.ndarray) -> int:
    if arr.nbytes == 0:
        return 0
    view = memoryview(np.ascontiguousarray(arr)).cast("B")
    crc = 0
    for start in range(0, len(view), _CRC_CHUNK):
        crc = zlib.crc32(view[start:start + _CRC_CHUNK], crc)
    return crc & 0xFFFFFFFF


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a value of type {type(value).__name__} in an index file")


def write_index_file(
    path: str | os.PathLike,
    *,
    family: str,
    metric: str,
    params: Mapping[str, Any],
    meta: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    library_version: str,
) -> None:
    """Write an index atomically.

    Parameters
    ----------
    path : path-like
        Destination; an existing file is replaced only once the new one is complete.
    family, metric : str
        Registered family name and metric name.
    params : mapping
        Build parameters (JSON-serialisable values).
    meta : mapping
        Family metadata (JSON-serialisable values).
    arrays : mapping of str to ndarray
        Payload arrays (numeric dtypes).
    library_version : str
        Recorded for diagnostics.

    Raises
    ------
    OSError
        The folder is not writable; nothing is left behind.
    """
    path = Path(path)
    table = []
    offset = 0
    prepared = {}
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        prepared[name] = arr
        offset = (offset + _ALIGN - 1) // _ALIGN * _ALIGN
        table.append({
            "name": name, "dtype": arr.dtype.str, "shape": list(arr.shape),
            "offset": offset, "nbytes": int(arr.nbytes), "crc32": _crc32(arr),
        })
        offset += arr.nbytes
    header = {
        "format_version": FORMAT_VERSION,
        "library_version": library_version,
        "family": family,
        "metric": metric,
        "params": _to_jsonable(dict(params)),
        "meta": _to_jsonable(dict(meta)),
        "arrays": table,
    }
    # Offsets are relative to the payload start, which depends on the header length.
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    payload_start = (_PREFIX.size + len(header_bytes) + _ALIGN - 1) // _ALIGN * _ALIGN
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes), zlib.crc32(header_bytes) & 0xFFFFFFFF)

    folder = path.parent if str(path.parent) else Path(".")
    _remove_orphans(folder, path.name)
    # The writer's pid is in the name, so a later save can tell an orphan of a killed writer
    # from a file another live process is still writing.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    _OPEN_TEMPS.add(Path(tmp_name).name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(prefix)
            fh.write(header_bytes)
            for entry in table:
                fh.write(b"\x00" * (payload_start + entry["offset"] - fh.tell()))
                if entry["nbytes"]:
                    fh.write(memoryview(prepared[entry["name"]]).cast("B"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        _OPEN_TEMPS.discard(Path(tmp_name).name)
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _OPEN_TEMPS.discard(Path(tmp_name).name)


def _remove_orphans(folder: Path, name: str) -> None:
    """Delete temporary files of earlier saves to ``name`` whose writer process is gone."""
    try:
        candidates = list(folder.glob(f".{glob_escape(name)}.*.tmp"))
    except OSError:
        return
    for tmp in candidates:
        parts = tmp.name[len(name) + 2:].split(".")
        if not parts or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        if pid != os.getpid() and _process_alive(pid):
            continue
        if pid == os.getpid() and tmp.name in _OPEN_TEMPS:
            continue
        try:
            tmp.unlink()
        except OSError:
            pass


def glob_escape(text: str) -> str:
    """``text`` with glob metacharacters escaped."""
    import glob

    return glob.escape(text)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


_OPEN_TEMPS: set[str] = set()


def read_index_file(path: str | os.PathLike, *, mmap: bool = False, verify: bool = True) -> dict[str, Any]:
    """Read and check an index file.

    Parameters
    ----------
    path : path-like
    mmap : bool, default False
        Memory-map the arrays copy-on-write (never written back) instead of reading them.
    verify : bool, default True
        Check every array's CRC-32 (reads each mapped array once). The header is always checked.

    Returns
    -------
    dict
        The header fields (``family``, ``metric``, ``params``, ``meta``, ...) plus ``arrays``,
        a dict of name to ndarray.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    IndexFormatError
        Not an annlib file, an unsupported version, a corrupt header, truncation, or a checksum
        mismatch.
    """
    path = Path(path)
    if path.is_dir():
        raise IndexFormatError(f"{path} is a folder, not an annlib index file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw_prefix = fh.read(_PREFIX.size)
        if len(raw_prefix) < _PREFIX.size or raw_prefix[:8] != MAGIC:
            raise IndexFormatError(f"{path} is not an annlib index file (bad magic bytes)")
        magic, version, header_len, header_crc = _PREFIX.unpack(raw_prefix)
        if version != FORMAT_VERSION:
            if 0 < version < 1000:  # a plausible version number: a file of another release
                raise IndexFormatError(
                    f"{path} has index format version {version}; this annlib reads version {FORMAT_VERSION}"
                )
            raise IndexFormatError(f"{path} is corrupt: the format version field holds {version}")
        if _PREFIX.size + header_len > size:
            raise IndexFormatError(f"{path} is truncated: the header runs past the end of the file")
        header_bytes = fh.read(header_len)
    if zlib.crc32(header_bytes) & 0xFFFFFFFF != header_crc:
        raise IndexFormatError(f"{path} is corrupt: header checksum mismatch")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        table = header["arrays"]
        for key in ("family", "metric", "params", "meta"):
            header[key]
    except (ValueError, KeyError, TypeError) as exc:
        raise IndexFormatError(f"{path} is corrupt: unreadable header ({exc})") from None
    payload_start = (_PREFIX.size + header_len + _ALIGN - 1) // _ALIGN * _ALIGN
    arrays: dict[str, np.ndarray] = {}
    for entry in table:
        try:
            name, dtype = entry["name"], np.dtype(entry["dtype"])
            shape, start, nbytes = tuple(entry["shape"]), payload_start + entry["offset"], entry["nbytes"]
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"{path} is corrupt: bad array entry ({exc})") from None
        if (not isinstance(start, int) or not isinstance(nbytes, int) or entry["offset"] < 0 or nbytes < 0
                or any(not isinstance(s, int) or s < 0 for s in shape) or not isinstance(name, str)):
            raise IndexFormatError(f"{path} is corrupt: array entry {name!r} has a negative or non-integer field")
        if dtype.hasobject or int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != nbytes:
            raise IndexFormatError(f"{path} is corrupt: array {name!r} has inconsistent shape and size")
        if start + nbytes > size:
            raise IndexFormatError(f"{path} is truncated: array {name!r} runs past the end of the file")
        if nbytes == 0:
            arr = np.zeros(shape, dtype=dtype)
        elif mmap:
            # copy-on-write: pages stay shared with the file, and the kernels see the same
            # writable array type as for a built index (no second compiled version)
            arr = np.memmap(path, dtype=dtype, mode="c", offset=start, shape=shape)
        else:
            with open(path, "rb") as fh:
                fh.seek(start)
                buf = fh.read(nbytes)
            if len(buf) != nbytes:
                raise IndexFormatError(f"{path} is truncated while reading array {name!r}")
            arr = np.frombuffer(bytearray(buf), dtype=dtype).reshape(shape)
        if verify and _crc32(arr) != entry.get("crc32"):
            raise IndexFormatError(f"{path} is corrupt: checksum mismatch in array {name!r}")
        arrays[name] = arr
    # The writer ends the file with the last array; anything after it is another file's bytes
    # (concatenation, a partly overwritten file) and the header does not describe it.
    end = max([_PREFIX.size + header_len] + [payload_start + e["offset"] + e["nbytes"] for e in table])
    if size != end:
        raise IndexFormatError(f"{path} is corrupt: {size - end} bytes follow the last array")
    header["arrays"] = arrays
    return header
