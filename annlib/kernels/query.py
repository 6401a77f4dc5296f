"""The two ends of a one-query search, inside the kernel: check and prepare the query, then turn
the proxies and positions into what :meth:`annlib.Index.search` returns.

The boundary's checks of a query's values (:func:`annlib._validation.as_vectors`: no NaN or
inf, every entry within the metric's float32 range) and the metric's preparation (unit length
for cosine, :meth:`annlib.metrics.Metric.prepare`) cost a dozen numpy calls per query; here they
are one pass over its ``d`` entries. A query that fails a check is not searched: the kernel
returns a non-zero status and the caller lets the ordinary path raise its error.

Public-distance codes (``out_metric``): :data:`OUT_L2` (Euclidean: the square root of the
squared-L2 proxy), :data:`OUT_COSINE` (``1 - cos``: the proxy ``-cos`` plus one), :data:`OUT_IP`
(the proxy itself).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["OUT_L2", "OUT_COSINE", "OUT_IP", "BAD_QUERY", "RAW_TERMS", "prepare_query", "finish_one"]

OUT_L2 = 0
OUT_COSINE = 1
OUT_IP = 2
BAD_QUERY = 1  # status: NaN, inf or an entry above the bound
# (bound, normalize, out_metric) for a query already checked and prepared, whose results are
# wanted as proxies and positions (the ordinary path's single queries): no bound beyond finite
# values, no normalisation, the proxy as it is (ip's public distance is the proxy), no ids
RAW_TERMS = (float(np.finfo(np.float32).max), False, OUT_IP)


@numba.njit(cache=True, nogil=True)
def prepare_query(q, bound, normalize, out):
    """Check ``q`` and write the query the kernels search with into ``out`` (d,).

    Returns 0, or :data:`BAD_QUERY` when an entry is NaN or infinite or above ``bound`` in
    magnitude (the metric's float32 range; cosine passes the largest float32, so only NaN and
    inf fail). With ``normalize`` the row is scaled to unit length as
    :meth:`annlib.metrics.Metric.prepare` does (first by its largest magnitude, then by its norm;
    a zero row stays zero), else copied. Compiled on its own, without fast-math, so the NaN
    tests hold whatever flags the caller uses.
    """
    d = q.shape[0]
    bad = 0
    top = np.float32(0.0)
    for t in range(d):
        v = abs(q[t])
        if not v <= bound:  # also true for NaN
            bad += 1
        if v > top:
            top = v
    if bad:
        return BAD_QUERY
    if not normalize:
        for t in range(d):
            out[t] = q[t]
        return 0
    scale = top if top > 0 else np.float32(1.0)
    acc = np.float32(0.0)
    for t in range(d):
        y = q[t] / scale
        out[t] = y
        acc += y * y
    norm = np.float32(np.sqrt(acc))
    if norm == 0:
        norm = np.float32(1.0)
    for t in range(d):
        out[t] = out[t] / norm
    return 0


@numba.njit(cache=True, nogil=True)
def finish_one(proxies, positions, k, out_metric, ids, out_d, out_i):
    """Write the first ``k`` results (proxies ascending, positions, -1 padded) as
    :meth:`annlib.Index.search` returns them: external ids (``ids[position]``; ``ids`` empty
    when ids are positions) and public distances (``out_metric``), +inf where there is none."""
    for j in range(k):
        p = positions[j] if j < positions.shape[0] else -1
        if p < 0:
            out_i[j] = -1
            out_d[j] = np.inf
            continue
        out_i[j] = ids[p] if ids.shape[0] > 0 else p
        v = proxies[j]
        if out_metric == OUT_L2:
            out_d[j] = np.sqrt(v) if v > 0 else np.float32(0.0)
        elif out_metric == OUT_COSINE:
            out_d[j] = v + np.float32(1.0)
        else:
            out_d[j] = v
