"""Stand-in for ann-benchmarks' ``BaseANN``, used only where that package is not importable.

It has the methods the harness calls with the harness' default behaviour, so the annlib module
can be imported, tested and used outside an ann-benchmarks checkout. Inside one, the harness'
own class is used instead (see module.py).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def resident_kb() -> float:
    """Memory of this process in kB, as the harness measures it (resident set size).

    With psutil (which the harness installs) the current RSS; without it the peak RSS from
    ``resource``, the best the standard library offers (a peak only grows, so differences taken
    around a build still bound what the build added).
    """
    try:
        import psutil
    except ImportError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports kB, macOS bytes
        return float(peak) / 1024 if sys.platform == "darwin" else float(peak)
    return psutil.Process().memory_info().rss / 1024


class BaseANN:
    """The interface ann-benchmarks' runner drives: build, query settings, queries, memory, name."""

    name = "BaseANN"

    def done(self) -> None:
        """Release what the algorithm holds."""

    def get_memory_usage(self) -> float | None:
        """Current memory use of the process in kB (the runner subtracts the value before ``fit``)."""
        return resident_kb()

    def fit(self, X: np.ndarray) -> None:
        """Build the index over ``X``."""

    def query(self, q: np.ndarray, n: int) -> Any:
        """Ids of the ``n`` nearest neighbours of ``q``."""
        return []

    def batch_query(self, X: np.ndarray, n: int) -> None:
        """Answer every query of ``X``; the runner then reads :meth:`get_batch_results`."""
        self.res = [self.query(q, n) for q in X]

    def get_batch_results(self) -> Any:
        """The ids found by the last :meth:`batch_query`, one sequence per query."""
        return self.res

    def get_additional(self) -> dict[str, Any]:
        """Extra attributes stored with the results."""
        return {}

    def __str__(self) -> str:
        return self.name
