"""Exceptions raised by :mod:`annlib.datasets`.

They subclass builtins only, so this package does not depend on the core library.
"""

from __future__ import annotations

__all__ = ["DownloadError", "DatasetFormatError"]


class DownloadError(OSError):
    """A download failed, was truncated, or delivered something other than the expected file.

    Whenever this is raised, nothing is left under the destination name.
    """


class DatasetFormatError(ValueError):
    """A file is not a readable HDF5 file in the ann-benchmarks layout."""
