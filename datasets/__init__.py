"""Benchmark data sets in the ann-benchmarks HDF5 layout.

Read and write ann-benchmarks files with exact ground truth, find data sets by name (cache
folder, the shared data folder, GloVe from PyPI, or a download from ann-benchmarks.com), and
generate synthetic clustered data.

Conventions:

* Metrics: the file attribute ``distance`` ``"euclidean"`` / ``"angular"`` maps to annlib's
  ``"l2"`` / ``"cosine"``; ``"dot"`` (not used by the public files) maps to ``"ip"``.
  Distances follow the library: Euclidean not squared, ``1 - cos``, ``-<q, x>``.
* Ground truth is exact: computed in float64 on the float32 values, ties by lower id.
* Cache folder: ``$ANNLIB_DATA``, else ``$XDG_CACHE_HOME/annlib``, else ``~/.cache/annlib``.
  Downloads land there as ``<name>.hdf5``; the GloVe set is built into its
  ``glove-6b-50d/`` subfolder.
* Every file is written under a temporary name and renamed into place, so a final name
  never holds a partial file.
* This package imports nothing from the rest of annlib; h5py and tqdm load on first use.

>>> from annlib.datasets import load, clustered
>>> ds = clustered(2000, 16, n_queries=10, k=10)
>>> ds.train.shape, ds.neighbors.shape
((2000, 16), (10, 10))
"""

from ._errors import DatasetFormatError, DownloadError
from .dataset import Dataset
from .download import download
from .glove import glove_6b_50d
from .groundtruth import exact_neighbors
from .hdf5 import check_hdf5, read_hdf5, write_hdf5
from .loader import available, load
from .paths import cache_dir
from .registry import REGISTRY, RegistryEntry
from .synthetic import clustered

__all__ = [
    "load",
    "available",
    "read_hdf5",
    "write_hdf5",
    "check_hdf5",
    "exact_neighbors",
    "clustered",
    "glove_6b_50d",
    "download",
    "Dataset",
    "DownloadError",
    "DatasetFormatError",
    "REGISTRY",
    "RegistryEntry",
    "cache_dir",
]
