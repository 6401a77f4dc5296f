"""The public ann-benchmarks data sets and where to download them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from ._metrics import to_metric

__all__ = ["RegistryEntry", "REGISTRY", "BASE_URL"]

BASE_URL = "http://ann-benchmarks.com"


@dataclass(frozen=True)
class RegistryEntry:
    """One downloadable data set.

    Parameters
    ----------
    name : str
        Name used by :func:`annlib.datasets.load`; the cached file is ``<name>.hdf5``.
    url : str
        Download address.
    distance : str
        ann-benchmarks ``distance`` attribute of the file (``"euclidean"`` or ``"angular"``).
    n, dim, n_queries : int or None
        Sizes as published, for information; the file is authoritative.
    approx_mb : int or None
        Published download size in MB, for information.
    sha256 : str or None
        Checked after download when given.
    expected_size : int or None
        Exact byte count, checked after download when given.
    note : str
        Anything a user should know about the set.
    """

    name: str
    url: str
    distance: str
    n: Optional[int] = None
    dim: Optional[int] = None
    n_queries: Optional[int] = None
    approx_mb: Optional[int] = None
    sha256: Optional[str] = None
    expected_size: Optional[int] = None
    note: str = ""

    @property
    def metric(self) -> str:
        """annlib metric name (``"l2"`` or ``"cosine"``)."""
        return to_metric(self.distance)


def _entry(name, distance, n, dim, n_queries, approx_mb, note=""):
    return RegistryEntry(
        name=name,
        url=f"{BASE_URL}/{name}.hdf5",
        distance=distance,
        n=n,
        dim=dim,
        n_queries=n_queries,
        approx_mb=approx_mb,
        note=note,
    )


# Sizes as listed by the ann-benchmarks project (100 ground-truth neighbours each). No
# checksums are published, so downloads are checked by length and by reading the layout.
REGISTRY: Dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        _entry("sift-128-euclidean", "euclidean", 1_000_000, 128, 10_000, 501),
        _entry("gist-960-euclidean", "euclidean", 1_000_000, 960, 1_000, 3600),
        _entry("mnist-784-euclidean", "euclidean", 60_000, 784, 10_000, 217),
        _entry("fashion-mnist-784-euclidean", "euclidean", 60_000, 784, 10_000, 217),
        _entry("glove-25-angular", "angular", 1_183_514, 25, 10_000, 121),
        _entry("glove-50-angular", "angular", 1_183_514, 50, 10_000, 235),
        _entry("glove-100-angular", "angular", 1_183_514, 100, 10_000, 463),
        _entry("glove-200-angular", "angular", 1_183_514, 200, 10_000, 918),
        _entry("nytimes-256-angular", "angular", 290_000, 256, 10_000, 301),
        _entry("deep-image-96-angular", "angular", 9_990_000, 96, 10_000, 3600),
        _entry(
            "lastfm-64-dot",
            "angular",
            292_385,
            65,
            50_000,
            135,
            note=(
                "64-d inner-product embeddings turned into an angular problem by the "
                "publishers with one extra coordinate, hence 65 dimensions and distance "
                "'angular' in the file"
            ),
        ),
    ]
}
