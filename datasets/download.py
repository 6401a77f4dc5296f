"""Fetching data set files over HTTP into the cache, all-or-nothing."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional, Union

from ._errors import DatasetFormatError, DownloadError
from ._progress import Progress, reporter
from .hdf5 import check_hdf5

__all__ = ["download", "DownloadError"]

_CHUNK = 1 << 20


def download(
    url: str,
    dest: Union[str, "os.PathLike[str]"],
    *,
    expected_size: Optional[int] = None,
    sha256: Optional[str] = None,
    progress: Progress = True,
    timeout: float = 60,
) -> Path:
    """Download an ann-benchmarks HDF5 file, verify it, and only then give it its final name.

    The body is streamed to a hidden temporary file in the destination folder. The final name
    is created (by an atomic rename) only after the byte count matches the server's
    ``Content-Length`` and ``expected_size``, the SHA-256 matches ``sha256``, and the file
    opens as HDF5 in the ann-benchmarks layout. On any failure the temporary file is deleted.

    Parameters
    ----------
    url : str
        Address to fetch (``http``, ``https`` or ``file``).
    dest : str or os.PathLike
        Final file name, or an existing folder to put the URL's file name in. Its folder is
        created if missing; an existing file of that name is replaced only on success.
    expected_size : int, optional
        Exact size in bytes, checked against ``Content-Length`` and the bytes received.
    sha256 : str, optional
        Hex SHA-256 digest the file must have (case-insensitive).
    progress : bool or callable, default True
        True for a byte-count progress bar, False for silence, or a callable ``(done, total)``
        (``total`` is None when the server sends no length).
    timeout : float, default 60
        Seconds to wait for the connection and for each read.

    Returns
    -------
    pathlib.Path
        The downloaded file.

    Raises
    ------
    DownloadError
        (an ``OSError``) on an HTTP error status, a connection failure or timeout, a body
        shorter or longer than announced (a truncated download), a size or checksum mismatch,
        or a body that is not an ann-benchmarks HDF5 file. Nothing is left under ``dest``.
    ValueError
        If ``dest`` is a folder and the URL has no file name.
    """
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / _file_name(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _fetch(url, out, expected_size, progress, timeout, dest.name)
            out.flush()
            os.fsync(out.fileno())
        if sha256 is not None and digest != sha256.strip().lower():
            raise DownloadError(f"{url}: SHA-256 mismatch, expected {sha256.lower()}, got {digest}")
        try:
            check_hdf5(tmp)
        except DatasetFormatError as exc:
            raise DownloadError(f"{url}: the downloaded file is not usable: {exc}") from exc
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _fetch(url, out, expected_size, progress, timeout, label) -> str:
    """Stream ``url`` into ``out``; return the SHA-256 hex digest of what was written."""
    request = urllib.request.Request(url, headers={"User-Agent": "annlib-datasets"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{url}: could not connect ({reason})") from exc

    with response:
        status = getattr(response, "status", None)
        if status is not None and status != 200 and urllib.parse.urlsplit(url).scheme != "file":
            raise DownloadError(f"{url}: unexpected HTTP status {status}")
        total = _content_length(response)
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(
                f"{url}: server announces {total} bytes, expected {expected_size}"
            )
        hasher = hashlib.sha256()
        done = 0
        with reporter(progress, total if total is not None else expected_size, label, "B") as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (http.client.HTTPException, OSError) as exc:
                    raise DownloadError(
                        f"{url}: connection failed after {done} bytes ({exc!r})"
                    ) from exc
                if not chunk:
                    break
                out.write(chunk)
                hasher.update(chunk)
                done += len(chunk)
                bar.update(len(chunk))
    # A closed connection ends the read loop quietly, so a short body is only visible here.
    if total is not None and done != total:
        raise DownloadError(f"{url}: truncated download, received {done} of {total} bytes")
    if expected_size is not None and done != expected_size:
        raise DownloadError(f"{url}: received {done} bytes, expected {expected_size}")
    return hasher.hexdigest()


def _content_length(response) -> Optional[int]:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def _file_name(url: str) -> str:
    name = os.path.basename(urllib.parse.urlsplit(url).path)
    if not name:
        raise ValueError(f"dest: {url!r} has no file name; give a file path as dest")
    return name
