"""Synthetic data sets with exact ground truth, for tests and quick experiments."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ._arrays import check_k
from ._metrics import to_distance, to_metric
from .dataset import Dataset
from .groundtruth import exact_neighbors

__all__ = ["clustered"]


def clustered(
    n: int,
    d: int,
    n_queries: int = 100,
    n_clusters: Optional[int] = None,
    metric: str = "l2",
    seed: int = 0,
    k: int = 100,
) -> Dataset:
    """Gaussian blobs of varied size and spread, with queries from the same distribution.

    Cluster centres are standard normal; each cluster has its own spread (log-uniform over
    0.1 to 0.6, scaled per dimension by a factor in 0.5 to 1.5) and its own share of the points
    (Dirichlet weights), so density varies the way it does in real embeddings. Queries are
    fresh draws from the same mixture, never copies of train points. Same arguments, same
    data, on every machine.

    Parameters
    ----------
    n : int
        Number of train vectors.
    d : int
        Dimension.
    n_queries : int, default 100
        Number of query vectors.
    n_clusters : int, optional
        Number of blobs; default ``clip(round(sqrt(n) / 2), 2, 100)``.
    metric : str, default "l2"
        Metric of the ground truth: ``"l2"``, ``"cosine"``, ``"ip"`` or their
        ann-benchmarks names.
    seed : int, default 0
        Seed of ``numpy.random.default_rng``.
    k : int, default 100
        Ground-truth neighbours per query; must not exceed ``n``.

    Returns
    -------
    Dataset
        float32 vectors, exact ``neighbors`` (int64) and ``distances`` (float32), ``path``
        None. Write it with ``write_hdf5(path, ds.train, ds.test, ds.metric, ds.k)``.

    Raises
    ------
    ValueError
        If ``n``, ``d``, ``n_queries`` or ``n_clusters`` is below 1, ``k`` is out of range, or
        the metric is unknown.
    """
    for argument, value in (("n", n), ("d", d), ("n_queries", n_queries)):
        if int(value) < 1:
            raise ValueError(f"{argument}: expected >= 1, got {value}")
    n, d, n_queries = int(n), int(d), int(n_queries)
    metric = to_metric(metric)
    k = check_k(k, n)
    if n_clusters is None:
        n_clusters = int(np.clip(round(np.sqrt(n) / 2), 2, 100))
    if int(n_clusters) < 1:
        raise ValueError(f"n_clusters: expected >= 1, got {n_clusters}")
    c = int(n_clusters)

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((c, d))
    spread = np.exp(rng.uniform(np.log(0.1), np.log(0.6), size=(c, 1)))
    spread = spread * rng.uniform(0.5, 1.5, size=(c, d))
    weights = rng.dirichlet(np.full(c, 2.0))
    total = n + n_queries
    labels = rng.choice(c, size=total, p=weights)
    points = centres[labels] + rng.standard_normal((total, d)) * spread[labels]
    points = points.astype(np.float32)
    train = np.ascontiguousarray(points[:n])
    test = np.ascontiguousarray(points[n:])

    ids, dists = exact_neighbors(train, test, metric, k)
    return Dataset(
        name=f"clustered-{n}x{d}-{metric}-seed{seed}",
        train=train,
        test=test,
        neighbors=ids,
        distances=dists.astype(np.float32),
        metric=metric,
        distance=to_distance(metric),
        path=None,
        attrs={"source": "annlib.datasets.clustered", "seed": int(seed), "n_clusters": c},
    )
