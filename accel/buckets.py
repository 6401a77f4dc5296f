"""Shape buckets: the few array shapes the compiled search ever sees.

XLA compiles one program per input shape. A search with a new batch size, or after ``add`` grew
the database by one row, must not trigger a compilation, so every shape is rounded to a bucket:

* query batches are cut into chunks of at most :data:`MAX_QUERY_BUCKET` rows, and a chunk is
  padded up to the next of (1, 8, 32, 128, 512): five programs cover every batch size and no
  chunk does more than four times the work it needs;
* the database is stored in blocks of ``block`` rows, and the number of blocks per device is
  rounded up so that appending rows usually fits in the capacity already compiled for (the loop
  over blocks has a run-time trip count, so spare capacity costs memory, not time).

Pure Python: importing this module does not import jax.
"""

from __future__ import annotations

__all__ = [
    "MAX_QUERY_BUCKET",
    "query_buckets",
    "query_chunks",
    "block_rows",
    "blocks_capacity",
]

# Largest query chunk searched at once: 512 queries x 2048 scores x 4 bytes = 4 MiB of scores
# per database block, small enough to stay in cache between the matmul and the reduction, large
# enough for the matmul to run near its peak (measured on the shared sets: 256..1024 are within
# the noise of each other, 128 is clearly slower).
MAX_QUERY_BUCKET = 512
_QUERY_BUCKETS = (1, 8, 32, 128, 512)

# Rows per database block: a block of vectors of about this many bytes keeps the matmul efficient
# while the block's scores (MAX_QUERY_BUCKET x block) stay cache-sized.
_BLOCK_BYTES = 1 << 20
MIN_BLOCK, MAX_BLOCK = 1024, 4096


def query_buckets() -> tuple[int, ...]:
    """The padded chunk sizes a search can compile for."""
    return _QUERY_BUCKETS


def _bucket(rows: int) -> int:
    for size in _QUERY_BUCKETS:
        if rows <= size:
            return size
    return MAX_QUERY_BUCKET


def query_chunks(n_queries: int) -> list[tuple[int, int, int]]:
    """Split ``n_queries`` rows into ``(start, stop, padded_rows)`` chunks.

    Every chunk but the last has :data:`MAX_QUERY_BUCKET` rows; the last is padded to its bucket.
    """
    out = []
    for start in range(0, n_queries, MAX_QUERY_BUCKET):
        stop = min(n_queries, start + MAX_QUERY_BUCKET)
        out.append((start, stop, _bucket(stop - start)))
    return out


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def block_rows(n: int, dim: int, itemsize: int = 4) -> int:
    """Rows per database block for ``n`` vectors of dimension ``dim``.

    About 1 MiB of vectors per block, a power of two in [1024, 4096]; never more than ``n``
    rounded up to a multiple of 128 (a small database is one block).
    """
    rows = min(MAX_BLOCK, max(MIN_BLOCK, _pow2_floor(_BLOCK_BYTES // max(1, dim * itemsize))))
    small = -(-max(1, n) // 128) * 128
    return min(rows, small)


def blocks_capacity(blocks: int) -> int:
    """Blocks to allocate per device for ``blocks`` used ones: at most 12.5% spare."""
    if blocks <= 8:
        return max(1, blocks)
    step = 1 << (blocks.bit_length() - 4)
    return -(-blocks // step) * step
