"""How good a top-k attention result is, against full attention and against exact top-k.

For each query and head, with ``p`` the full softmax over all keys, ``S`` the attended set and
``T`` the exact top keys at the same count (same sink and window):

* ``mass_recall`` = ``sum_{i in S} p_i``, the share of the softmax mass the selection carries;
* ``key_recall`` = ``|S ∩ T| / |T|`` over the retrieved keys (sink and window excluded);
* ``error`` = ``||o_S - o|| / ||o||`` and ``error_vs_topk`` = ``||o_S - o_T|| / ||o_T||``;
* ``topk_error`` = ``||o_T - o|| / ||o||`` and ``topk_mass``: what exact top-k itself reaches;
* ``error_bound`` = ``2 (1 - mass_recall) max_i ||v_i||`` with ``abs_error`` = ``||o_S - o||``:
  the bound of ALGORITHMS §6.1 (``abs_error <= error_bound`` always).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels.attention import attend_selected
from ..kernels.topk import topk_rows

__all__ = ["AttentionQuality", "measure_quality"]


@dataclass
class AttentionQuality:
    """Per (query head, query) quality measures; every field float64 (query_heads, m).

    See the module docstring for definitions.
    """

    mass_recall: np.ndarray
    key_recall: np.ndarray
    error: np.ndarray
    error_vs_topk: np.ndarray
    topk_error: np.ndarray
    topk_mass: np.ndarray
    abs_error: np.ndarray
    error_bound: np.ndarray

    def summary(self) -> dict[str, float]:
        """Means over heads and queries (and the worst bound slack, which must be >= 0)."""
        return {
            "mass_recall": float(self.mass_recall.mean()),
            "key_recall": float(self.key_recall.mean()),
            "error": float(self.error.mean()),
            "error_vs_topk": float(self.error_vs_topk.mean()),
            "topk_error": float(self.topk_error.mean()),
            "topk_mass": float(self.topk_mass.mean()),
            "bound_slack_min": float((self.error_bound - self.abs_error).min()),
        }


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = np.linalg.norm(a - b, axis=-1)
    den = np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), num)


def measure_quality(Q: np.ndarray, keys: np.ndarray, values: np.ndarray, selected: np.ndarray,
                    output: np.ndarray, kept: np.ndarray, scale: float) -> AttentionQuality:
    """Quality of attention outputs computed over ``selected`` keys.

    Parameters
    ----------
    Q : float32 (query_heads, m, d)
    keys, values : float32 (kv_heads, n, d) and (kv_heads, n, dv)
    selected : int64 (query_heads, m, width), -1 padded
    output : float32 (query_heads, m, dv)
    kept : int64 positions always attended (sink and window)
    scale : float

    Returns
    -------
    AttentionQuality
    """
    qh, m, d = Q.shape
    kvh, n, _ = keys.shape
    group = qh // kvh
    shape = (qh, m)
    fields = {name: np.zeros(shape) for name in AttentionQuality.__dataclass_fields__}
    kept_mask = np.zeros(n, dtype=bool)
    kept_mask[kept] = True
    for h in range(qh):
        K = keys[h // group]
        Vv = values[h // group]
        vmax = float(np.sqrt(np.einsum("ij,ij->i", Vv, Vv, dtype=np.float64).max()))
        S = (Q[h].astype(np.float64) @ K.T.astype(np.float64)) * scale
        P = np.exp(S - S.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)
        full = P @ Vv.astype(np.float64)
        topk_sel = np.full(selected[h].shape, -1, dtype=np.int64)
        for j in range(m):
            row = selected[h, j]
            row = row[row >= 0]
            retrieved = row[~kept_mask[row]]
            count = retrieved.shape[0]
            if count:
                # exact top keys outside sink and window, by the kernels' top-k (+inf never chosen)
                neg = np.where(kept_mask, np.inf, -S[j]).astype(np.float32)[None, :]
                best = topk_rows(neg, count)[1][0]
            else:
                best = np.zeros(0, np.int64)
            both = np.intersect1d(retrieved, best, assume_unique=True).shape[0]
            fields["key_recall"][h, j] = both / count if count else 1.0
            fields["mass_recall"][h, j] = P[j, row].sum()
            t_row = np.concatenate([row[kept_mask[row]], best])
            topk_sel[j, :t_row.shape[0]] = t_row
            fields["topk_mass"][h, j] = P[j, t_row].sum()
        o_t, _, _ = attend_selected(np.ascontiguousarray(Q[h]), K, Vv, topk_sel, scale)
        fields["error"][h] = _rel(output[h].astype(np.float64), full)
        fields["topk_error"][h] = _rel(o_t.astype(np.float64), full)
        fields["error_vs_topk"][h] = _rel(output[h].astype(np.float64), o_t.astype(np.float64))
        fields["abs_error"][h] = np.linalg.norm(output[h] - full, axis=-1)
        # float32 outputs: allow their rounding on top of the analytic bound
        fields["error_bound"][h] = 2.0 * np.clip(1.0 - fields["mass_recall"][h], 0.0, None) * vmax \
            + 1e-5 * (vmax + np.linalg.norm(full, axis=-1))
    return AttentionQuality(**fields)
