"""Compute kernels: the only place with numba code.

Family code decides *what* to score; these modules decide *how fast*:

- :mod:`.distances`  pairwise proxies (squared L2, negative inner product), norms
- :mod:`.topk`       bounded heaps, row-wise top-k, merging of partial results
- :mod:`.blockwise`  exact k-NN by blocked GEMM fused with a running top-k

Nothing here imports from the rest of annlib.
"""
