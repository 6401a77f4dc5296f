"""The in-memory form of one benchmark data set."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["Dataset"]


# eq=False: comparing numpy arrays with == is elementwise and ambiguous in a bool context.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A benchmark data set: base vectors, queries and their exact nearest neighbours.

    Parameters
    ----------
    name : str
        Short name, e.g. ``"sift-128-euclidean"`` (the file stem for files read from disk).
    train : numpy.ndarray
        Base vectors, ``(n, d)`` float32, C-contiguous.
    test : numpy.ndarray
        Query vectors, ``(q, d)`` float32, C-contiguous.
    neighbors : numpy.ndarray
        Exact neighbour ids into ``train``, ``(q, k)`` int64, best first.
    distances : numpy.ndarray
        Their distances, ``(q, k)`` float32: Euclidean distance (not squared) for ``"l2"``,
        ``1 - cos`` for ``"cosine"``, ``-<q, x>`` for ``"ip"``.
    metric : str
        annlib metric name: ``"l2"``, ``"cosine"`` or ``"ip"``.
    distance : str
        The ann-benchmarks ``distance`` attribute the metric came from (``"euclidean"``,
        ``"angular"`` or ``"dot"``).
    path : pathlib.Path or None, default None
        File the data set was read from, if any.
    attrs : dict, default {}
        Other root attributes of the file (``source``, ``licence``, ``split_seed``, ...).
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    neighbors: np.ndarray
    distances: np.ndarray
    metric: str
    distance: str
    path: Optional[Path] = None
    attrs: Dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of base vectors."""
        return int(self.train.shape[0])

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.train.shape[1])

    @property
    def n_queries(self) -> int:
        """Number of queries."""
        return int(self.test.shape[0])

    @property
    def k(self) -> int:
        """Number of ground-truth neighbours stored per query."""
        return int(self.neighbors.shape[1])

    def __repr__(self) -> str:
        # The default repr would print the arrays.
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return (
            f"Dataset(name={self.name!r}, metric={self.metric!r}, n={self.n}, dim={self.dim}, "
            f"n_queries={self.n_queries}, k={self.k}{where})"
        )
