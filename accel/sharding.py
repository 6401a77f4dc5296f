"""Where the database lives: a 1-D device mesh and a blocked, striped, sharded layout.

The database is cut into blocks of ``block`` rows. Global block ``b`` (rows ``b*block`` ..
``(b+1)*block - 1``) is stored on device ``b % D`` in slot ``b // D``, so the blocks of a growing
database are dealt round-robin and every device holds the same number of them (give or take one)
whatever the size: the per-device work stays balanced. A device's slots are the rows
``[s*capacity, (s+1)*capacity)`` of one global array sharded along its first axis with
``jax.sharding.NamedSharding(mesh, PartitionSpec("db"))``, so the same program runs on one CPU, on
several accelerators, and across hosts after ``jax.distributed.initialize()`` (the mesh is built
from ``jax.devices()``, which then lists every process's devices).

Padding rows (the tail of the last block, spare capacity) hold zero vectors whose half squared
norm is ``+inf``, so their score is ``+inf`` and they are never selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .buckets import block_rows, blocks_capacity

__all__ = ["AXIS", "device_mesh", "Layout", "DeviceDatabase", "shard_map", "backend_platform"]

AXIS = "db"  # the mesh axis the database is split along


def backend_platform() -> str:
    """Platform of the default JAX backend: "cpu", "gpu" or "tpu"."""
    return jax.devices()[0].platform


@lru_cache(maxsize=None)
def _mesh(devices: tuple) -> Mesh:
    return Mesh(np.array(devices), (AXIS,))


def device_mesh(shards: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``shards`` devices of ``jax.devices()`` (all when None).

    Raises
    ------
    ValueError
        More shards than devices.
    """
    devices = jax.devices()
    if shards is None:
        shards = len(devices)
    if shards > len(devices):
        raise ValueError(
            f"shards={shards} but only {len(devices)} JAX device(s) are visible "
            f"({devices[0].platform}); use shards=None or at most {len(devices)}")
    return _mesh(tuple(devices[:shards]))


def shard_map(fn, mesh, in_specs, out_specs):
    """``jax.shard_map`` without replication checks (older JAX: ``jax.experimental.shard_map``)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # pragma: no cover - old JAX

    return legacy(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


@dataclass(frozen=True)
class Layout:
    """Shapes of the device copy of a database.

    Attributes
    ----------
    n : int
        Vectors stored (valid rows).
    dim : int
    block : int
        Rows per block.
    shards : int
        Devices ``D`` the blocks are dealt to.
    capacity : int
        Block slots per device (>= the blocks it holds).
    """

    n: int
    dim: int
    block: int
    shards: int
    capacity: int

    @property
    def blocks(self) -> int:
        """Blocks holding at least one valid row."""
        return -(-self.n // self.block)

    @property
    def rows(self) -> int:
        """Rows of the padded global array (all devices, all slots)."""
        return self.shards * self.capacity * self.block

    def fits(self, n: int) -> bool:
        """Whether ``n`` rows fit without growing the capacity."""
        return -(-n // self.block) <= self.shards * self.capacity and n > 0

    @classmethod
    def plan(cls, n: int, dim: int, shards: int, block: int | None = None) -> "Layout":
        """Layout for ``n`` vectors over ``shards`` devices, with a little spare capacity."""
        block = block or block_rows(n, dim)
        per_device = -(-(-(-n // block)) // shards)
        return cls(n, dim, block, shards, blocks_capacity(per_device))

    def slots(self, blocks: np.ndarray) -> np.ndarray:
        """Row of the global (slot-ordered) array that holds each global block."""
        blocks = np.asarray(blocks)
        return (blocks % self.shards) * self.capacity + blocks // self.shards

    def to_slot_order(self, arr: np.ndarray, fill) -> np.ndarray:
        """Pad ``arr`` (n, ...) to the full capacity and reorder its blocks into slot order."""
        total = self.shards * self.capacity
        padded = np.full((total * self.block,) + arr.shape[1:], fill, dtype=arr.dtype)
        padded[: arr.shape[0]] = arr
        blocked = padded.reshape((self.capacity, self.shards, self.block) + arr.shape[1:])
        return np.ascontiguousarray(blocked.swapaxes(0, 1)).reshape((total, self.block) + arr.shape[1:])


def _put(host: np.ndarray, sharding: NamedSharding):
    """A global array from a host array every process holds (works under jax.distributed too)."""
    if jax.process_count() == 1:
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])  # pragma: no cover


class DeviceDatabase:
    """The device copy of an index's vectors, blocked and sharded (see the module docstring).

    Immutable once made: :meth:`appended` returns a new database, so a search holding this one
    keeps a consistent copy whatever a writer does, and a failed append changes nothing.

    Parameters
    ----------
    vectors : ndarray float32 (n, d)
        Prepared vectors (unit rows for cosine).
    half_sqnorms : ndarray float32 (n,)
        ``||x||^2 / 2`` for squared L2, zeros for inner product: the per-row term of the score.
    dtype : {"float32", "bfloat16"}
        Storage and matmul type of the vectors on the devices (scores accumulate in float32).
    shards : int or None
        Devices to split over (None: all).
    block : int, optional
        Rows per block (default :func:`annlib.accel.buckets.block_rows`).
    """

    def __init__(self, vectors, half_sqnorms, *, dtype="float32", shards=None, block=None):
        self.mesh = device_mesh(shards)
        self.dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        self.layout = Layout.plan(vectors.shape[0], vectors.shape[1], self.mesh.devices.size, block)
        self.vectors, self.terms = self._upload(vectors, half_sqnorms)

    def _with(self, layout: "Layout", vectors, terms) -> "DeviceDatabase":
        """A database on the same mesh and dtype with the given layout and device arrays."""
        new = object.__new__(DeviceDatabase)
        new.mesh, new.dtype = self.mesh, self.dtype
        new.layout, new.vectors, new.terms = layout, vectors, terms
        return new

    @property
    def sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(AXIS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def _upload(self, vectors, terms, layout: "Layout | None" = None):
        lay = self.layout if layout is None else layout
        host_x = lay.to_slot_order(np.asarray(vectors, dtype=self.dtype), 0)
        return _put(host_x, self.sharding), self.put_terms(terms, lay)

    def put_terms(self, terms: np.ndarray, layout: "Layout | None" = None):
        """Device copy of per-row score terms (n,), +inf on padding (also used for filters)."""
        lay = self.layout if layout is None else layout
        host_t = lay.to_slot_order(np.asarray(terms, dtype=np.float32), np.inf)
        return _put(host_t, self.sharding)

    def appended(self, n_added: int, all_vectors: np.ndarray, all_terms: np.ndarray) -> "DeviceDatabase":
        """A new database with the last ``n_added`` rows of ``all_vectors`` appended.

        The rows go into the last block and the next ones when the capacity allows; otherwise
        the new database is laid out again with more capacity. ``all_vectors`` (n, d) and
        ``all_terms`` (n,) hold every row, old and new. This database is left as it is.
        """
        lay = self.layout
        n_new = lay.n + n_added
        if not lay.fits(n_new):
            grown = Layout.plan(n_new, lay.dim, lay.shards, lay.block)
            return self._with(grown, *self._upload(all_vectors, all_terms, grown))
        first, last = lay.n // lay.block, -(-n_new // lay.block)
        blocks = np.arange(first, last)
        rows = slice(first * lay.block, min(n_new, last * lay.block))
        x = np.zeros(((last - first) * lay.block, lay.dim), dtype=self.dtype)
        t = np.full((last - first) * lay.block, np.inf, dtype=np.float32)
        x[: rows.stop - rows.start] = np.asarray(all_vectors[rows], dtype=self.dtype)
        t[: rows.stop - rows.start] = all_terms[rows]
        slots = jnp.asarray(lay.slots(blocks))
        vectors = _set_blocks(self.vectors, slots, x.reshape(-1, lay.block, lay.dim))
        terms = _set_blocks(self.terms, slots, t.reshape(-1, lay.block))
        return self._with(Layout(n_new, lay.dim, lay.block, lay.shards, lay.capacity), vectors, terms)

    def nbytes(self) -> int:
        """Bytes held on the devices (all shards)."""
        return int(self.vectors.nbytes + self.terms.nbytes)


@jax.jit
def _set_blocks(arr, slots, values):
    # A functional update (a new array): searches running concurrently keep the old one.
    return arr.at[slots].set(values.astype(arr.dtype))
