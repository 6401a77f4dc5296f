"""Compute kernels: the only place with numba code.

Family code decides *what* to score; these modules decide *how fast*:

- :mod:`.distances`    pairwise proxies (squared L2, negative inner product), norms, re-scoring
- :mod:`.topk`         bounded heaps, row-wise top-k, merging of partial results
- :mod:`.blockwise`    exact k-NN by blocked GEMM fused with a running top-k
- :mod:`.threads`      BLAS thread limits and the worker pool of multi-threaded kernels
- :mod:`.beam`, :mod:`.graph`, :mod:`.finger`   HNSW walks, insertion, repair; FINGER estimates
- :mod:`.cluster`, :mod:`.soar`                 k-means leaves; SOAR spilled assignments
- :mod:`.quantization`, :mod:`.fastscan`, :mod:`.lut16`   PQ (plain / anisotropic), int8,
  4-bit look-up-table scanning and re-ranking
- :mod:`.jl`, :mod:`.sketch`, :mod:`.siphash`   JL sketch sizing, sketch scoring and updates,
  keyed choice of sketch copies
- :mod:`.cache_guard`  drops numba's cached code of modules whose callees' sources changed

Nothing here imports from the rest of annlib.
"""

from .cache_guard import drop_stale_caches as _drop_stale_caches

# before any kernel loads cached code: code compiled against an older version of a module it
# calls is dropped (numba checks only a kernel's own file)
_drop_stale_caches()
