"""Reading and writing data sets in the ann-benchmarks HDF5 layout.

Layout: datasets ``train`` (n x d float32), ``test`` (q x d float32), ``neighbors`` (q x k
int32), ``distances`` (q x k float32) and the root attribute ``distance``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from ._arrays import as_vectors
from ._errors import DatasetFormatError
from ._metrics import to_distance, to_metric
from ._progress import Progress
from .dataset import Dataset
from .groundtruth import exact_neighbors

__all__ = ["read_hdf5", "write_hdf5", "check_hdf5", "exact_neighbors"]

PathLike = Union[str, "os.PathLike[str]"]

_REQUIRED = ("train", "test", "neighbors", "distances")
# Attributes derived from the arrays; a caller may not set them to something inconsistent.
_RESERVED_ATTRS = ("distance", "dimension")


def check_hdf5(path: PathLike) -> Dict[str, Any]:
    """Check that a file is a readable HDF5 file in the ann-benchmarks layout, cheaply.

    Reads the structure, the attributes and the first and last row of every array (which
    catches files cut short), not the whole data.

    Parameters
    ----------
    path : str or os.PathLike
        File to check.

    Returns
    -------
    dict
        ``distance``, ``metric``, ``n``, ``dim``, ``n_queries`` and ``k``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    DatasetFormatError
        If the file is not HDF5, lacks one of the four arrays or the ``distance`` attribute,
        has inconsistent shapes, an unsupported distance, or unreadable data.
    """
    path = Path(path)
    with _open(path) as f:
        try:
            return _inspect(f, path, probe=True)
        except DatasetFormatError:
            raise
        except Exception as exc:  # h5py reports damaged data as OSError/KeyError/RuntimeError
            raise DatasetFormatError(f"{path}: unreadable ann-benchmarks data ({exc})") from exc


def read_hdf5(path: PathLike, *, name: Optional[str] = None) -> Dataset:
    """Read a data set in the ann-benchmarks HDF5 layout.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.hdf5`` file. gzip-compressed arrays are read transparently.
    name : str, optional
        Name of the returned data set; by default the file name without ``.hdf5``.

    Returns
    -------
    Dataset
        ``train``/``test`` as C-contiguous float32, ``neighbors`` int64, ``distances``
        float32, ``metric`` mapped from the ``distance`` attribute (``euclidean`` -> ``"l2"``,
        ``angular`` -> ``"cosine"``, ``dot`` -> ``"ip"``) and the other root attributes in
        ``attrs``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    DatasetFormatError
        If the file is not HDF5, is not in the ann-benchmarks layout (see :func:`check_hdf5`),
        cannot be read completely, or has neighbour ids outside ``0..n-1``.
    """
    path = Path(path)
    with _open(path) as f:
        try:
            info = _inspect(f, path, probe=False)
            train = np.ascontiguousarray(f["train"][...], dtype=np.float32)
            test = np.ascontiguousarray(f["test"][...], dtype=np.float32)
            neighbors = np.ascontiguousarray(f["neighbors"][...], dtype=np.int64)
            distances = np.ascontiguousarray(f["distances"][...], dtype=np.float32)
            attrs = {
                key: _plain(value) for key, value in f.attrs.items() if key != "distance"
            }
        except DatasetFormatError:
            raise
        except Exception as exc:
            raise DatasetFormatError(f"{path}: unreadable ann-benchmarks data ({exc})") from exc
    if neighbors.size and (neighbors.min() < 0 or neighbors.max() >= train.shape[0]):
        raise DatasetFormatError(
            f"{path}: 'neighbors' holds ids outside 0..{train.shape[0] - 1} "
            f"(min {neighbors.min()}, max {neighbors.max()})"
        )
    return Dataset(
        name=name if name is not None else _stem(path),
        train=train,
        test=test,
        neighbors=neighbors,
        distances=distances,
        metric=info["metric"],
        distance=info["distance"],
        path=path,
        attrs=attrs,
    )


def write_hdf5(
    path: PathLike,
    train,
    test,
    metric: str,
    k: int = 100,
    *,
    attrs: Optional[Mapping[str, Any]] = None,
    progress: Progress = False,
) -> Path:
    """Write a data set in the ann-benchmarks HDF5 layout, computing exact ground truth.

    Ground truth comes from :func:`exact_neighbors` (float64, ties broken by lower id). The
    file is written under a temporary name in the same folder and renamed into place, so the
    final name only ever holds a complete file, and an existing file survives a failed write.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; its folder is created if missing. An existing file is replaced.
    train : array_like, shape (n, d)
        Base vectors, any real dtype; stored as float32.
    test : array_like, shape (q, d)
        Query vectors; stored as float32.
    metric : str
        ``"euclidean"``/``"l2"``, ``"angular"``/``"cosine"`` or ``"dot"``/``"ip"``; stored
        as the ann-benchmarks ``distance`` attribute (``"euclidean"``, ``"angular"``,
        ``"dot"``). Only the first two are understood by ann-benchmarks itself.
    k : int, default 100
        Neighbours stored per query; must not exceed ``n``.
    attrs : mapping, optional
        Extra root attributes, e.g. ``{"source": ..., "licence": ...}``. Values must be
        storable by HDF5 (str, numbers, small arrays). ``distance`` and ``dimension`` are set
        from the data and may not be given.
    progress : bool or callable, default False
        Progress of the ground-truth computation: True for a bar, or ``(done, total)``.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    TypeError
        If an array is not real numeric or ``k`` is not an integer.
    ValueError
        For an unknown metric, bad arrays (see :func:`exact_neighbors`), ``k`` out of range,
        or a reserved key in ``attrs``.
    OSError
        If the file cannot be written; no partial file is left behind.
    """
    import h5py

    distance = to_distance(metric)
    extra = dict(attrs or {})
    reserved = [key for key in _RESERVED_ATTRS if key in extra]
    if reserved:
        raise ValueError(f"attrs: {', '.join(reserved)} is set from the data and may not be given")
    X = as_vectors(train, "train")
    Q = as_vectors(test, "test")
    ids, dists = exact_neighbors(X, Q, distance, k, progress=progress)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["distance"] = distance
            f.attrs["dimension"] = X.shape[1]
            f.attrs["point_type"] = "float"
            for key, value in extra.items():
                f.attrs[key] = value
            f.create_dataset("train", data=X)
            f.create_dataset("test", data=Q)
            f.create_dataset("neighbors", data=ids.astype(np.int32))
            f.create_dataset("distances", data=dists.astype(np.float32))
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class _open:
    """``h5py.File(path, "r")`` that reports foreign files as DatasetFormatError."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None

    def __enter__(self):
        import h5py

        if not self.path.is_file():
            raise FileNotFoundError(f"no such file: {self.path}")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise DatasetFormatError(f"{self.path}: not a readable HDF5 file ({exc})") from exc
        return self.file

    def __exit__(self, *exc):
        self.file.close()


def _inspect(f, path: Path, *, probe: bool) -> Dict[str, Any]:
    import h5py

    missing = [key for key in _REQUIRED if not isinstance(f.get(key), h5py.Dataset)]
    if missing:
        raise DatasetFormatError(
            f"{path}: not in the ann-benchmarks layout, missing {', '.join(missing)} "
            f"(has {', '.join(sorted(f.keys())) or 'nothing'})"
        )
    if "distance" not in f.attrs:
        raise DatasetFormatError(f"{path}: root attribute 'distance' is missing")
    distance = _plain(f.attrs["distance"])
    try:
        metric = to_metric(distance, argument="distance attribute")
    except ValueError as exc:
        raise DatasetFormatError(f"{path}: unsupported {exc}") from None

    shapes = {key: f[key].shape for key in _REQUIRED}
    for key in _REQUIRED:
        if len(shapes[key]) != 2 or f[key].dtype.kind not in "iuf":
            raise DatasetFormatError(
                f"{path}: '{key}' must be a 2-D numeric array, got shape {shapes[key]} "
                f"dtype {f[key].dtype}"
            )
    (n, d), (q, d_test) = shapes["train"], shapes["test"]
    if n == 0 or d == 0 or q == 0:
        raise DatasetFormatError(f"{path}: empty 'train' {shapes['train']} or 'test' {shapes['test']}")
    if d_test != d:
        raise DatasetFormatError(f"{path}: 'test' has dimension {d_test}, 'train' has {d}")
    if shapes["neighbors"][0] != q or shapes["distances"] != shapes["neighbors"]:
        raise DatasetFormatError(
            f"{path}: 'neighbors' {shapes['neighbors']} and 'distances' {shapes['distances']} "
            f"must both have shape ({q}, k)"
        )
    if probe:
        for key in _REQUIRED:
            rows = shapes[key][0]
            if rows:
                f[key][0]
                f[key][rows - 1]
    return {
        "distance": distance,
        "metric": metric,
        "n": int(n),
        "dim": int(d),
        "n_queries": int(q),
        "k": int(shapes["neighbors"][1]),
    }


def _plain(value):
    """HDF5 attribute value as a plain Python value where one exists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _stem(path: Path) -> str:
    return path.name[: -len(".hdf5")] if path.name.endswith(".hdf5") else path.stem


def _fsync(path: Path) -> None:
    # Make the bytes durable before the rename publishes them under the final name.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
