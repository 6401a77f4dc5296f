"""Giving freed build memory back to the operating system.

A build allocates and frees many large temporary arrays (k-means assignments, residuals, codes
being trained). glibc keeps freed heap memory for reuse instead of returning it, and raises its
threshold for using fresh mappings after large frees, so the process stays hundreds of MB above
what the index holds. ``malloc_trim`` hands the free part back; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["release_free_memory"]

_trim = None


def release_free_memory() -> bool:
    """Return freed heap memory to the OS where the C library allows it (glibc's ``malloc_trim``).

    Returns
    -------
    bool
        True when memory was trimmed; False when the C library has no such call. Never raises.
    """
    global _trim
    if _trim is None:
        _trim = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _trim = libc.malloc_trim
                _trim.argtypes = [ctypes.c_size_t]
                _trim.restype = ctypes.c_int
            except (OSError, AttributeError):  # musl and others have no malloc_trim
                _trim = False
    if not _trim:
        return False
    return bool(_trim(0))
