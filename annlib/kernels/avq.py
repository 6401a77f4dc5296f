"""Anisotropic re-fit of leaf centres ("tree AVQ"; docs/partitioned.md, ALGORITHMS §2.4.4).

For a leaf with members ``x_i`` and a parallel-cost multiplier ``eta``, the centre ``c`` is chosen
to minimise the score-aware loss of its members

    sum_i w_i [eta ||e_par||^2 + ||e_perp||^2],   e = x_i - c,   w_i = ||x_i||^(eta - 1)

where ``e_par`` is the part of ``e`` along ``x_i`` and ``e_perp`` the rest. Setting the gradient to
zero gives one ``d x d`` symmetric positive definite system per leaf,

    (sum_i w_i I + (eta - 1) sum_i w_i u_i u_i^T) c = eta sum_i w_i x_i,   u_i = x_i / ||x_i||,

(``w_i / ||x_i||^2 x_i x_i^T = w_i u_i u_i^T``). Its matrix is positive definite for every
``eta > 0``: ``sum_i w_i u_i u_i^T`` has eigenvalues in ``[0, sum_i w_i]``. After every leaf is
re-fitted, all centres are multiplied by one scalar, the least-squares scale of the members onto
their centres ``sum_j <c_j, sum_{i in j} x_i> / sum_j n_j ||c_j||^2`` (as ScaNN does).

Everything here is numpy and LAPACK (one small GEMM and one solve per leaf): nothing to compile.
"""

from __future__ import annotations

import numpy as np

from .threads import run_split

__all__ = ["avq_refit", "avq_loss"]

# Leaves per worker thread, at least (each leaf is one GEMM and one d x d solve).
MIN_SPLIT_LEAVES = 16


def _members(assign: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows sorted by leaf, offsets (L + 1,)) of an assignment."""
    assign = np.asarray(assign, dtype=np.int64)
    order = np.argsort(assign, kind="stable")
    offsets = np.zeros(L + 1, dtype=np.int64)
    np.cumsum(np.bincount(assign, minlength=L), out=offsets[1:])
    return order, offsets


def _weights(norms: np.ndarray, eta: float) -> np.ndarray:
    """``||x||^(eta - 1)`` divided by its largest value in the leaf (float64).

    The solution does not change when every weight of a leaf is scaled by one factor, and the
    division keeps large ``eta`` or large norms from overflowing. Zero vectors get weight 0 (their
    parallel direction is undefined; ScaNN does the same) except at ``eta = 1``, the plain mean.
    """
    if eta == 1.0:
        return np.ones_like(norms)
    ok = norms > 0
    logw = np.full(norms.shape, -np.inf)
    logw[ok] = (eta - 1.0) * np.log(norms[ok])
    if not ok.any():
        return np.zeros_like(norms)
    return np.exp(logw - logw[ok].max())


def _solve(U, w, total, eta, b, eye):
    """``(total I + (eta - 1) U^T diag(w) U)^-1 b``.

    With fewer members ``m`` than dimensions (high ``d``) the Woodbury identity turns the
    ``d x d`` system into an ``m x m`` one: with ``V = sqrt(|eta - 1| w) U`` and ``s`` the sign of
    ``eta - 1``, the solution is ``(b - V^T (s total I + V V^T)^-1 V b) / total``; the small
    matrix is definite (positive for ``s = 1``, negative for ``s = -1``, as ``V V^T`` has
    eigenvalues below ``|eta - 1| total < total`` then), so LAPACK's solve is stable for both.
    """
    m, d = U.shape
    if m < d:
        V = U * np.sqrt(abs(eta - 1.0) * w)[:, None]
        small = V @ V.T
        small[np.diag_indices(m)] += np.copysign(total, eta - 1.0)
        return (b - V.T @ np.linalg.solve(small, V @ b)) / total
    A = (eta - 1.0) * ((U * w[:, None]).T @ U)
    A += total * eye
    return np.linalg.solve(A, b)


def avq_refit(X: np.ndarray, C: np.ndarray, assign: np.ndarray, eta: float, *, rescale: bool = True,
              threads: int = 1) -> np.ndarray:
    """Centres re-fitted to minimise the anisotropic loss of their members.

    Parameters
    ----------
    X : float32 (n, d)
        The points (not modified, not kept).
    C : float32 (L, d)
        Current centres (not modified); a leaf without members, or whose members are all zero
        vectors (``eta != 1``), keeps its centre.
    assign : int (n,)
        Leaf of every point, in ``[0, L)`` (the primary assignment).
    eta : float
        Parallel-cost multiplier ``> 0``; 1 gives the member means.
    rescale : bool, default True
        Multiply all re-fitted centres by the least-squares scale of the members onto them (the
        loss of each leaf alone is minimal without it).
    threads : int, default 1
        Worker threads, each taking a contiguous range of the leaves (the result does not depend
        on it).

    Returns
    -------
    float32 (L, d)
        New centres (a new array).

    The caller checks ``eta`` and the shapes (the family's parameter checks).
    """
    eta = float(eta)
    L, d = C.shape
    order, offsets = _members(assign, L)
    out = np.array(C, dtype=np.float64)  # a copy: the caller's centres stay as they were

    def leaves(lo, hi):
        num = den = 0.0
        eye = np.eye(d)
        for j in range(lo, hi):
            s, e = offsets[j], offsets[j + 1]
            if s == e:
                continue
            Xj = X[order[s:e]].astype(np.float64)
            norms = np.sqrt(np.einsum("ij,ij->i", Xj, Xj))
            w = _weights(norms, eta)
            total = w.sum()
            if total <= 0:
                continue
            if eta == 1.0:
                c = Xj.mean(axis=0)
            else:
                U = Xj / np.where(norms > 0, norms, 1.0)[:, None]
                c = _solve(U, w, total, eta, eta * (w @ Xj), eye)
            if not np.isfinite(c).all():
                continue  # cannot happen for a positive definite system; kept as a guard
            out[j] = c
            sum_x = Xj.sum(axis=0)
            num += float(c @ sum_x)
            den += float(e - s) * float(c @ c)
        return num, den

    parts = run_split(leaves, L, threads, MIN_SPLIT_LEAVES)
    if rescale:
        num = sum(p[0] for p in parts)
        den = sum(p[1] for p in parts)
        # one scale for every centre, members or not (ScaNN's rule); a degenerate scale (no
        # member anywhere, or centres pointing away from their members) is not applied
        if den > 0 and np.isfinite(num / den) and num / den > 0:
            out *= num / den
    return out.astype(np.float32)


def avq_loss(X: np.ndarray, C: np.ndarray, assign: np.ndarray, eta: float) -> np.ndarray:
    """The anisotropic loss of every leaf, ``sum_i w_i [eta ||e_par||^2 + ||e_perp||^2]`` with
    ``w_i = ||x_i||^(eta - 1)`` (unnormalised; zero vectors weigh 0 unless ``eta = 1``).

    Parameters
    ----------
    X : float32 (n, d)
    C : float32 (L, d)
    assign : int (n,)
        Leaf of every point.
    eta : float
        Parallel-cost multiplier > 0.

    Returns
    -------
    float64 (L,)
        Loss per leaf (0 for leaves without members).
    """
    Xd = X.astype(np.float64)
    assign = np.asarray(assign, dtype=np.int64)
    E = Xd - C.astype(np.float64)[assign]
    norms = np.sqrt(np.einsum("ij,ij->i", Xd, Xd))
    ok = norms > 0
    par = np.zeros(len(Xd))
    par[ok] = np.einsum("ij,ij->i", E[ok], Xd[ok]) / norms[ok]
    sq = np.einsum("ij,ij->i", E, E)
    if eta == 1.0:
        w = np.ones(len(Xd))
    else:
        w = np.zeros(len(Xd))
        w[ok] = norms[ok] ** (eta - 1.0)
    per_point = w * (eta * par * par + (sq - par * par))
    return np.bincount(assign, weights=per_point, minlength=C.shape[0])
