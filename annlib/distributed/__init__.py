"""Scale-out: one index API over several annlib indexes (shards).

:class:`ShardedIndex` splits the vectors into shards, each an ordinary annlib index, scatters a
search through an executor and merges the per-shard results with the library's merge kernel.
Executors: :class:`ThreadExecutor` (default; shards search in parallel in this process) and
:class:`SerialExecutor`. A Ray executor (one actor per shard) is not written yet.
"""

from .executors import Executor, SerialExecutor, ThreadExecutor
from .sharded import PARTITIONS, ShardedIndex

__all__ = ["ShardedIndex", "Executor", "ThreadExecutor", "SerialExecutor", "PARTITIONS"]
