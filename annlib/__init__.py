"""annlib: approximate nearest-neighbour search on one API and one set of kernels.

>>> import annlib
>>> index = annlib.Index.build(vectors, method="bruteforce", metric="l2")   # doctest: +SKIP
>>> ids, distances = index.search(queries, k=10)                          # doctest: +SKIP

Families: :class:`BruteForce` (exact). ``import annlib`` never imports jax, h5py or scikit-learn.
"""

from .api import Index, SearchResult, __version__, families, get_family, load, register_family
from .config import get_num_threads, set_num_threads, threads
from .errors import AnnlibError, CompilationNotice, DimensionMismatchError, IndexFormatError, NotBuiltError
from .indexes.bruteforce import BruteForce
from .metrics import METRICS
from .tune import TuningResult, tune

__all__ = [
    "Index", "SearchResult", "load", "families", "get_family", "register_family",
    "BruteForce",
    "set_num_threads", "get_num_threads", "threads",
    "AnnlibError", "IndexFormatError", "DimensionMismatchError", "NotBuiltError", "CompilationNotice",
    "METRICS", "__version__", "tune", "TuningResult",
    "HNSW", "Partitioned", "TPUKNN", "MahalanobisSketch",
]

# Families other than the oracle load on first use, so `import annlib` stays light.
_LAZY_FAMILIES = {"HNSW": "hnsw", "Partitioned": "partitioned", "TPUKNN": "tpuknn",
                  "MahalanobisSketch": "mahalanobis"}


# Subpackages reachable as attributes (``annlib.attention.KVCache``) without importing them eagerly.
_LAZY_SUBPACKAGES = ("attention", "distributed")


def __getattr__(name: str):
    if name in _LAZY_FAMILIES:
        return get_family(_LAZY_FAMILIES[name])
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'annlib' has no attribute {name!r}")
