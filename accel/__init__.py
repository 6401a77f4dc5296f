"""annlib.accel: the JAX code of annlib (TPU-KNN search, sharding over devices).

Never imported by a plain ``import annlib``; :class:`annlib.TPUKNN` imports it on first use.

Modules
-------
- :mod:`.binning`   XLA's rule for the number of bins of the approximate top-k, expected recall
                    (pure Python)
- :mod:`.buckets`   query-batch and database-block shapes, so compilation happens once per bucket
                    (pure Python)
- :mod:`.sharding`  the device mesh and the blocked, sharded device copy of a database
- :mod:`.tpuknn`    scoring by matmul, the bin-wise reduction, the merge across devices
"""

from .binning import expected_recall, num_bins, reduction_output_size

__all__ = ["expected_recall", "num_bins", "reduction_output_size"]
