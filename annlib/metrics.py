"""The metric table: public name -> internal proxy, normalisation and final correction.

Kernels rank by a *proxy* that is monotone in the public distance: squared L2 for
``"l2"`` and ``-<q, x>`` for ``"ip"`` and ``"cosine"`` (the latter on unit vectors). The proxy is
turned into the public distance (Euclidean, ``1 - cos`` or ``-<q, x>``) only on output, once per
returned neighbour.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import numpy as np

from ._validation import check_choice

__all__ = ["Metric", "METRICS", "ALIASES", "get_metric", "PROXY_L2SQ", "PROXY_NEG_IP"]

PROXY_L2SQ = 0  # kernel code: squared Euclidean distance
PROXY_NEG_IP = 1  # kernel code: negative inner product


@functools.lru_cache(maxsize=64)
def _float32_safe_magnitude(dim: int) -> float:
    """``sqrt(FLT_MAX / (8 dim))``, cached: every search checks its queries against it."""
    return float(np.sqrt(np.finfo(np.float32).max / (8.0 * max(1, dim))))


@dataclass(frozen=True)
class Metric:
    """How one public metric maps onto the kernels.

    Attributes
    ----------
    name : str
        Public name ("l2", "cosine", "ip").
    proxy : int
        Kernel proxy code (:data:`PROXY_L2SQ` or :data:`PROXY_NEG_IP`).
    normalize : bool
        Whether vectors and queries are scaled to unit norm before indexing/searching.
    """

    name: str
    proxy: int
    normalize: bool

    def prepare(self, X: np.ndarray) -> np.ndarray:
        """Return ``X`` as the kernels expect it (unit rows for cosine; zero rows stay zero).

        Cosine rows are first divided by their largest entry, so the norm is computed on values
        in [-1, 1]: no float32 overflow at 1e30 nor underflow at 1e-25.
        """
        if not self.normalize:
            return X
        scale = np.abs(X).max(axis=1, keepdims=True)
        scale[scale == 0] = 1.0  # zero rows stay zero
        Y = X / scale
        norms = np.sqrt(np.einsum("ij,ij->i", Y, Y))[:, None]
        norms[norms == 0] = 1.0
        Y /= norms
        return np.ascontiguousarray(Y, dtype=np.float32)

    def max_abs(self, dim: int) -> float:
        """Largest entry magnitude whose distances stay finite in float32, in dimension ``dim``.

        The kernels compute ``|q|^2 + |x|^2 - 2<q, x>`` (or ``<q, x>``) in float32; with every
        entry at most ``sqrt(FLT_MAX / (8 dim))`` none of the terms can overflow. Cosine
        normalises first, so any finite value is fine.
        """
        if self.normalize:
            return float("inf")
        return _float32_safe_magnitude(dim)

    def to_distance(self, proxy: np.ndarray) -> np.ndarray:
        """Convert proxy values to public distances in place where possible (inf stays inf)."""
        out = np.asarray(proxy, dtype=np.float32)
        if self.name == "l2":
            np.maximum(out, 0.0, out=out)  # float rounding can give tiny negatives
            np.sqrt(out, out=out)
        elif self.name == "cosine":
            np.add(out, 1.0, out=out)
        return out

    def to_proxy(self, distance: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_distance` (used when merging published results)."""
        d = np.asarray(distance, dtype=np.float32)
        if self.name == "l2":
            return d * d
        if self.name == "cosine":
            return d - 1.0
        return d


METRICS: dict[str, Metric] = {
    "l2": Metric("l2", PROXY_L2SQ, False),
    "cosine": Metric("cosine", PROXY_NEG_IP, True),
    "ip": Metric("ip", PROXY_NEG_IP, False),
}

# ann-benchmarks and other libraries' spellings.
ALIASES = {"euclidean": "l2", "angular": "cosine", "dot": "ip", "inner_product": "ip"}


def get_metric(name: str) -> Metric:
    """Look a metric up by name or alias.

    Raises
    ------
    ValueError
        Unknown name; the message lists the accepted names.
    """
    if isinstance(name, str) and name in ALIASES:
        name = ALIASES[name]
    check_choice("metric", name, list(METRICS) + list(ALIASES))
    return METRICS[name]
