"""The machine a run happened on, and control of every thread pool during it.

Absolute timings on a shared machine drift; what makes two runs comparable is knowing what
they ran on: library versions, the BLAS kernel actually selected (an environment pin such as
``OPENBLAS_CORETYPE`` changes it), the number of threads and how busy the machine was.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from importlib import metadata
from typing import Iterator

__all__ = [
    "DISTRIBUTIONS",
    "library_versions",
    "blas_info",
    "machine_info",
    "thread_environment",
    "load_average",
    "limit_threads",
]

#: Distributions whose versions go into every results file (when installed).
DISTRIBUTIONS = (
    "annlib",
    "numpy",
    "numba",
    "scipy",
    "jax",
    "threadpoolctl",
    "faiss-cpu",
    "hnswlib",
    "scann",
    "pynndescent",
)

# Variables that change which kernel or how many threads BLAS/OpenMP/numba use.
_THREAD_VARIABLES = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER",
)


def library_versions(names=DISTRIBUTIONS) -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def blas_info() -> list[dict]:
    """The BLAS and OpenMP libraries loaded in this process, with the kernel each selected.

    Only libraries already loaded are seen, so call this after the methods have run. File
    paths are reduced to the file name: the record should not depend on where things live.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "prefix", "version", "architecture",
            "threading_layer", "num_threads")
    out = []
    for lib in threadpool_info():
        entry = {key: lib[key] for key in keep if key in lib}
        entry["file"] = os.path.basename(lib.get("filepath", ""))
        out.append(entry)
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, logical cores, operating system and Python build."""
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def thread_environment() -> dict[str, str]:
    """The environment variables that pin BLAS kernels or thread counts, when set."""
    return {name: os.environ[name] for name in _THREAD_VARIABLES if name in os.environ}


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages, or None where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


@contextlib.contextmanager
def limit_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` threads in BLAS, OpenMP, numba and annlib, then restore.

    Libraries imported inside the body are not covered by the BLAS/OpenMP limit (it applies to
    what is loaded on entry), which is why each adapter also sets its own library's count.

    Parameters
    ----------
    n : int
        Threads for every pool; 1 for single-threaded measurements.
    """
    if n < 1:
        raise ValueError(f"threads must be >= 1; got {n}")
    from threadpoolctl import threadpool_limits

    with contextlib.ExitStack() as stack:
        stack.enter_context(threadpool_limits(limits=n))
        annlib_threads = _annlib_threads()
        if annlib_threads is not None:
            stack.enter_context(annlib_threads(n))  # numba and BLAS as annlib sets them
        numba = sys.modules.get("numba")  # loaded by a baseline (pynndescent) or by annlib
        if numba is not None:
            previous = numba.get_num_threads()
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            stack.callback(numba.set_num_threads, previous)
        yield


def _annlib_threads():
    """annlib's ``threads(n)`` context manager when the library provides it."""
    try:
        import annlib
    except ImportError:
        return None
    return getattr(annlib, "threads", None)
