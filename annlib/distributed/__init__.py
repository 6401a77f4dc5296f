"""Scale-out: one index API over several annlib indexes (shards).

:class:`ShardedIndex` splits the vectors into shards, each an ordinary annlib index behind a
shard handle, scatters a search through an executor and merges the per-shard results with the
library's merge kernel. Executors: :class:`ThreadExecutor` (default; shards search in parallel in
this process), :class:`SerialExecutor`, and :class:`RayExecutor` (one Ray actor per shard; Ray is
imported only when one is made).
"""

from ..errors import ShardUnavailableError
from .executors import Executor, SerialExecutor, ThreadExecutor
from .ray_executor import RayExecutor
from .sharded import PARTITIONS, ShardedIndex, ShardedSearchResult
from .shards import LocalShard, ShardHandle, ShardSpec, ShardStats

__all__ = ["ShardedIndex", "ShardedSearchResult", "Executor", "ThreadExecutor", "SerialExecutor", "RayExecutor",
           "ShardUnavailableError", "ShardHandle", "LocalShard", "ShardSpec", "ShardStats", "PARTITIONS"]
