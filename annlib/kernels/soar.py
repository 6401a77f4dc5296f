"""SOAR spilled assignments (Sun et al., NeurIPS 2023; docs/partitioned.md, step 2).

For a point ``x`` with primary centre ``c`` and residual ``r = x - c``, a secondary centre ``c'``
is chosen to minimise the orthogonality-amplified loss

    L(c') = ||x - c'||^2 + lam * <x - c', r_hat>^2,        r_hat = r / ||r||

(``r_hat = 0`` when ``||r||^2 < 1e-7``, as in ScaNN). The batched form needs two GEMMs per block
of points, ``X C^T`` and ``R_hat C^T``, since ``<x - c', r_hat> = <x, r_hat> - <c', r_hat>``.
"""

from __future__ import annotations

import numba
import numpy as np

from .threads import run_split
from .topk import sorted_insert

__all__ = ["soar_assign", "ZERO_RESIDUAL"]

# Squared residual norm below which the residual direction is undefined (ScaNN's threshold).
ZERO_RESIDUAL = 1e-7
SOAR_BLOCK = 4096
SOAR_MIN_SPLIT = 1024  # fewest points a worker thread gets


@numba.njit(cache=True, nogil=True)
def _select_block(S, P, xnorm, xr, cnorm, prim, lam, exclude_primary, out, offset):
    """For each point keep the ``spills`` centres of smallest loss.

    With ``exclude_primary`` the primary centre is never a candidate; otherwise it competes
    (ScaNN's semantics) and only centres whose loss beats the primary's own loss
    ``(1 + lam) ||r||^2`` are taken, so a point may get fewer spilled copies or none.
    ``out`` rows are -1 padded.
    """
    spills = out.shape[1]
    width = spills + 1
    for i in range(S.shape[0]):
        best_v = np.full(width, np.inf, dtype=np.float64)
        best_j = np.full(width, -1, dtype=np.int64)
        p = prim[i]
        for j in range(S.shape[1]):
            if exclude_primary and j == p:
                continue
            proj = xr[i] - P[i, j]
            v = xnorm[i] - 2.0 * S[i, j] + cnorm[j] + lam * proj * proj
            if v < best_v[width - 1]:  # into the short sorted list of the best candidates
                sorted_insert(best_v, best_j, width - 1, v, j)
        filled = 0
        for t in range(width):
            j = best_j[t]
            if filled == spills:
                break
            if j < 0 or j == p:
                # the primary won a slot: under ScaNN's rule the point does not spill there, and
                # nothing ranked after the primary is taken in its place
                if j == p:
                    break
                continue
            out[offset + i, filled] = j
            filled += 1
        for t in range(filled, spills):
            out[offset + i, t] = -1


def soar_assign(
    X: np.ndarray,
    C: np.ndarray,
    primary: np.ndarray,
    lam: float,
    *,
    spills: int = 1,
    exclude_primary: bool = False,
    block: int = SOAR_BLOCK,
    threads: int = 1,
) -> np.ndarray:
    """Secondary (spilled) centres of every point under the SOAR loss.

    Parameters
    ----------
    X : float32 (n, d)
    C : float32 (k, d)
        Centres.
    primary : int (n,)
        Primary centre of each point (normally its nearest centre).
    lam : float
        The loss weight lambda >= 0. ``lam = 0`` is plain distance.
    spills : int, default 1
        Extra assignments per point (at most).
    exclude_primary : bool, default False
        False: the primary competes and, if it wins, the point is not spilled (ScaNN; with
        ``lam = 0`` nothing spills). True: the best non-primary centres are taken (with
        ``lam = 0`` every point goes to its second-nearest centre).
    block : int, default 4096
        Points per GEMM block.
    threads : int, default 1
        Worker threads, each taking a contiguous range of the points with single-threaded GEMM
        and the serial selection (the result does not depend on it).

    Returns
    -------
    int32 (n, spills)
        Secondary centres, best first, -1 where the point is not spilled.
    """
    n = X.shape[0]
    out = np.full((n, spills), -1, dtype=np.int32)
    cnorm = np.einsum("ij,ij->i", C, C).astype(np.float32)
    primary = np.asarray(primary, dtype=np.int64)

    def rows(lo, hi):
        for s in range(lo, hi, block):
            e = min(hi, s + block)
            Xb = X[s:e]
            R = Xb - C[primary[s:e]]
            rn2 = np.einsum("ij,ij->i", R, R)
            scale = np.where(rn2 < ZERO_RESIDUAL, 0.0, 1.0 / np.sqrt(np.maximum(rn2, ZERO_RESIDUAL)))
            Rh = (R * scale[:, None].astype(np.float32)).astype(np.float32)
            S = Xb @ C.T
            P = Rh @ C.T
            xnorm = np.einsum("ij,ij->i", Xb, Xb).astype(np.float32)
            xr = np.einsum("ij,ij->i", Xb, Rh).astype(np.float32)
            _select_block(S, P, xnorm, xr, cnorm, primary[s:e], float(lam), bool(exclude_primary), out, s)

    run_split(rows, n, threads, SOAR_MIN_SPLIT)
    return out
