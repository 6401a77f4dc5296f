"""How many bins the approximate top-k keeps (re-exported from :mod:`annlib.kernels.binning`).

The rule is shared by the JAX search here and by the numba bin-wise top-k that the CPU paths
(attention's ``"approx_topk"`` selector) run, so both keep the same number of bins, and therefore
the same recall, as ``jax.lax.approx_min_k`` on a TPU.
"""

from __future__ import annotations

from ..kernels.binning import (  # noqa: F401
    CHUNK_TILING,
    LANE_TILING,
    expected_recall,
    num_bins,
    reduction_output_size,
)

__all__ = ["reduction_output_size", "num_bins", "expected_recall", "LANE_TILING", "CHUNK_TILING"]
