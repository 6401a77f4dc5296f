"""Exact k-nearest-neighbour ground truth in float64."""

from __future__ import annotations

import numpy as np

from ._arrays import as_vectors, check_k
from ._metrics import to_metric
from ._progress import Progress, reporter

__all__ = ["exact_neighbors"]

# Working-set budget in float64 elements (32 MiB) for one distance block and for one gathered
# candidate block; keeps memory flat whatever n, d and q are.
_BLOCK_ELEMENTS = 1 << 22
_EPS = np.finfo(np.float64).eps
# Columns per chunk when bounding the k-th smallest score by chunk minima.
_CHUNK = 64
# Rows per pass when only norms are needed.
_ROWS = 1 << 16


def exact_neighbors(train, test, metric, k, *, progress: Progress = False):
    """Exact k nearest neighbours of every query, computed in float64.

    Candidates are found with a blocked matrix product; every candidate within the product's
    rounding error of the k-th best is then re-scored directly from the vectors, so ids and
    distances are exact and equal distances (duplicate vectors) are ordered by lower id.

    Parameters
    ----------
    train : array_like, shape (n, d)
        Base vectors, any real dtype; rounded to float32 first, as files store them.
    test : array_like, shape (q, d)
        Query vectors, same rules.
    metric : str
        ``"l2"`` / ``"euclidean"`` (Euclidean distance, not squared), ``"cosine"`` /
        ``"angular"`` (``1 - cos`` of the normalised vectors; a zero vector has distance 1 to
        everything) or ``"ip"`` / ``"dot"`` (``-<q, x>``).
    k : int
        Neighbours per query, ``1 <= k <= n``.
    progress : bool or callable, default False
        True for a progress bar over the base blocks, or a callable ``(done, total)``.

    Returns
    -------
    ids : numpy.ndarray
        ``(q, k)`` int64 ids into ``train``, best first.
    distances : numpy.ndarray
        ``(q, k)`` float64 distances matching ``ids``.

    Raises
    ------
    TypeError
        If an input is not a real numeric array or ``k`` is not an integer.
    ValueError
        For an unknown metric, inputs that are not 2-D, empty, non-finite or of different
        dimensions, or ``k`` outside ``1..n``.
    """
    metric = to_metric(metric)
    X = as_vectors(train, "train")
    Q = as_vectors(test, "test")
    if X.shape[1] != Q.shape[1]:
        raise ValueError(
            f"test: dimension {Q.shape[1]} differs from the train dimension {X.shape[1]}"
        )
    n, d = X.shape
    q = Q.shape[0]
    k = check_k(k, n)

    Q64 = Q.astype(np.float64)
    if metric == "cosine":
        Q64 = _normalise(Q64)
    q_sq = (Q64 * Q64).sum(axis=1)
    x_sq_max = 1.0 if metric == "cosine" else _max_sq_norm(X)
    # Twice a worst-case bound on the rounding error of a ranking score (a length-d dot
    # product plus norms): any score within tol of the k-th best may really be in the top k.
    err = q_sq + x_sq_max if metric == "l2" else np.sqrt(q_sq * x_sq_max)
    tol = 4.0 * (d + 2) * _EPS * err

    # Base blocks hold whole score chunks, so only the last block has a ragged tail, and at
    # least k rows, so every query has k entries in the band after the first block.
    nb = int(min(n, max(1024, k, _BLOCK_ELEMENTS // d // _CHUNK * _CHUNK)))
    # The band: per query, every (id, score) within tol of its k-th best score so far.
    band_rows = np.empty(0, np.int64)
    band_ids = np.empty(0, np.int64)
    band_s = np.empty(0, np.float64)

    starts = range(0, n, nb)
    with reporter(progress, len(starts), desc="ground truth", unit="block") as bar:
        for start in starts:
            stop = min(n, start + nb)
            Xb = X[start:stop].astype(np.float64)
            if metric == "cosine":
                Xb = _normalise(Xb)
            x_sq = (Xb * Xb).sum(axis=1)
            kk = min(k, stop - start)
            qb = int(max(1, min(q, _BLOCK_ELEMENTS // (stop - start))))
            parts_r, parts_i, parts_s = [band_rows], [band_ids], [band_s]
            for qs in range(0, q, qb):
                qe = min(q, qs + qb)
                S = _scores(Xb, x_sq, Q64[qs:qe], metric)
                rows, cols = _candidates(S, kk, tol[qs:qe])
                parts_r.append(rows.astype(np.int64) + qs)
                parts_i.append(cols.astype(np.int64) + start)
                parts_s.append(S[rows, cols])
            band_rows, band_ids, band_s = _prune(
                np.concatenate(parts_r), np.concatenate(parts_i), np.concatenate(parts_s),
                q, k, tol,
            )
            bar.update(1)

    dist = _exact(X, Q64, band_rows, band_ids, metric)
    order = np.lexsort((band_ids, dist, band_rows))
    take = order[_first_k(band_rows[order], q, k)]
    return band_ids[take].reshape(q, k), dist[take].reshape(q, k)


def _normalise(A: np.ndarray) -> np.ndarray:
    norms = np.sqrt((A * A).sum(axis=1, keepdims=True))
    # Zero vectors stay zero: cosine similarity 0, distance 1, instead of NaN.
    norms[norms == 0] = 1.0
    return A / norms


def _max_sq_norm(X: np.ndarray) -> float:
    return max(
        float((X[s : s + _ROWS].astype(np.float64) ** 2).sum(axis=1).max())
        for s in range(0, X.shape[0], _ROWS)
    )


def _scores(Xb, x_sq, Qb, metric):
    """Ranking scores (smaller is better) of a query block against a base block."""
    S = Qb @ Xb.T
    if metric == "l2":
        # |x|^2 - 2<q, x>: |q|^2 is constant per row and left out.
        S *= -2.0
        S += x_sq[None, :]
    else:
        np.negative(S, out=S)
    return S


def _candidates(S, kk, tol):
    """(row, column) pairs whose score is within ``tol`` of the row's kk-th smallest score.

    The kk-th smallest of per-chunk minima bounds the kk-th smallest score from above (kk
    chunks each hold a score no larger), so one comparison pass replaces a full selection
    over every row.
    """
    qb, m = S.shape
    chunks = m // _CHUNK
    if chunks >= kk:
        body = S[:, : chunks * _CHUNK].reshape(qb, chunks, _CHUNK)
        mins = body.min(axis=2)
        bound = np.partition(mins, kk - 1, axis=1)[:, kk - 1] + tol
        # Only chunks whose minimum passes the bound can hold candidates; look inside those.
        c_rows, c_idx = np.nonzero(mins <= bound[:, None])
        hit_pair, offset = np.nonzero(body[c_rows, c_idx] <= bound[c_rows][:, None])
        rows = c_rows[hit_pair]
        cols = c_idx[hit_pair] * _CHUNK + offset
        if chunks * _CHUNK < m:
            t_rows, t_cols = np.nonzero(S[:, chunks * _CHUNK :] <= bound[:, None])
            rows = np.concatenate([rows, t_rows])
            cols = np.concatenate([cols, t_cols + chunks * _CHUNK])
        vals = S[rows, cols]
        order = np.lexsort((vals, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
        kth = vals[np.searchsorted(rows, np.arange(qb)) + kk - 1]
    else:
        kth = np.partition(S, kk - 1, axis=1)[:, kk - 1] if kk < m else S.max(axis=1)
        rows, cols = np.nonzero(S <= (kth + tol)[:, None])
        vals = S[rows, cols]
    keep = vals <= (kth + tol)[rows]
    return rows[keep], cols[keep]


def _prune(rows, ids, scores, q, k, tol):
    """Keep, per query, the entries within ``tol`` of its k-th best score (every query has >= k)."""
    order = np.lexsort((ids, scores, rows))
    rows, ids, scores = rows[order], ids[order], scores[order]
    kth = scores[np.searchsorted(rows, np.arange(q)) + k - 1]
    keep = scores <= (kth + tol)[rows]
    return rows[keep], ids[keep], scores[keep]


def _first_k(sorted_rows, q, k):
    """Positions of the first k entries of each query in a row-sorted array."""
    starts = np.searchsorted(sorted_rows, np.arange(q))
    return (starts[:, None] + np.arange(k)[None, :]).ravel()


def _exact(X, Q64, rows, ids, metric):
    """Distances of pairs (``Q64[rows]``, ``X[ids]``), straight from the vectors.

    Each value is a reduction over the last axis of a (pairs, d) array, so two equal base
    vectors always get bit-identical distances and the id tie-break is deterministic.
    """
    out = np.empty(len(rows))
    step = max(1, _BLOCK_ELEMENTS // X.shape[1])
    for s in range(0, len(rows), step):
        V = X[ids[s : s + step]].astype(np.float64)
        Qr = Q64[rows[s : s + step]]
        if metric == "l2":
            V -= Qr
            out[s : s + step] = np.sqrt((V * V).sum(axis=-1))
        else:
            if metric == "cosine":
                V = _normalise(V)
            out[s : s + step] = (V * Qr).sum(axis=-1)
    if metric == "cosine":
        np.maximum(1.0 - out, 0.0, out=out)
    elif metric == "ip":
        np.negative(out, out=out)
    return out
