"""Exception types raised by annlib.

Every exception is a subclass of a builtin (``ValueError``, ``TypeError``, ...), so code written
against numpy-style errors keeps working; catch :class:`AnnlibError` to catch only ours.
"""

from __future__ import annotations

__all__ = [
    "AnnlibError",
    "IndexFormatError",
    "DimensionMismatchError",
    "NotBuiltError",
    "ShardUnavailableError",
    "CompilationNotice",
]


class AnnlibError(Exception):
    """Base class mixed into every exception raised deliberately by annlib."""


class IndexFormatError(AnnlibError, ValueError):
    """A file given to :func:`annlib.load` is corrupt, truncated, of another version or not ours."""


class DimensionMismatchError(AnnlibError, ValueError):
    """Vectors whose dimension differs from the index's dimension."""


class NotBuiltError(AnnlibError, RuntimeError):
    """``search``/``add``/``save`` called on an index object before ``build``."""


class ShardUnavailableError(AnnlibError, RuntimeError):
    """A shard of a :class:`~annlib.distributed.ShardedIndex` could not answer, even after one
    restart from its saved artefact (or a write could not reach every shard and was undone)."""


class CompilationNotice(UserWarning):
    """Issued once per family and process when its kernels are compiled for this machine.

    The first build and searches of a family after installation compile its numba kernels
    (seconds; the longest, HNSW and Partitioned, 10-20 s on one core); later processes load them
    from numba's cache. Silence it with
    ``warnings.simplefilter("ignore", annlib.CompilationNotice)``.
    """

