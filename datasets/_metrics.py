"""Translation between annlib metric names and ann-benchmarks ``distance`` attributes."""

from __future__ import annotations

__all__ = ["to_metric", "to_distance", "ACCEPTED_METRICS"]

# ann-benchmarks attribute -> annlib metric.  "dot" is not used by the public ann-benchmarks
# files (their lastfm set is stored as angular) but some derived files use it for inner product.
_DISTANCE_TO_METRIC = {"euclidean": "l2", "angular": "cosine", "dot": "ip"}
_METRIC_TO_DISTANCE = {v: k for k, v in _DISTANCE_TO_METRIC.items()}

ACCEPTED_METRICS = ("l2", "cosine", "ip", "euclidean", "angular", "dot")


def to_metric(name: str, *, argument: str = "metric") -> str:
    """Return the annlib metric name for an annlib or ann-benchmarks name.

    Parameters
    ----------
    name : str
        One of ``"l2"``, ``"cosine"``, ``"ip"`` or their ann-benchmarks spellings
        ``"euclidean"``, ``"angular"``, ``"dot"`` (case-insensitive).
    argument : str, default "metric"
        Name of the caller's argument, used in the error message.

    Returns
    -------
    str
        ``"l2"``, ``"cosine"`` or ``"ip"``.

    Raises
    ------
    ValueError
        If ``name`` is not one of the accepted names.
    """
    key = name.lower() if isinstance(name, str) else name
    if key in _METRIC_TO_DISTANCE:
        return key
    if key in _DISTANCE_TO_METRIC:
        return _DISTANCE_TO_METRIC[key]
    raise ValueError(
        f"{argument}: expected one of {', '.join(map(repr, ACCEPTED_METRICS))}, got {name!r}"
    )


def to_distance(name: str, *, argument: str = "metric") -> str:
    """Return the ann-benchmarks ``distance`` attribute for an annlib or ann-benchmarks name.

    Parameters
    ----------
    name : str
        Any name accepted by :func:`to_metric`.
    argument : str, default "metric"
        Name of the caller's argument, used in the error message.

    Returns
    -------
    str
        ``"euclidean"``, ``"angular"`` or ``"dot"``.

    Raises
    ------
    ValueError
        If ``name`` is not one of the accepted names.
    """
    return _METRIC_TO_DISTANCE[to_metric(name, argument=argument)]
