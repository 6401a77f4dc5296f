"""TPU-KNN in JAX: brute-force scores by matmul, then the bin-wise approximate top-k.

For a chunk of queries ``Q`` and a database block ``X_b`` the scores are one matmul,
``s = t_b - Q @ X_b.T`` with the per-row term ``t = ||x||^2 / 2`` for squared L2 (then
``s = (||q - x||^2 - ||q||^2) / 2``, which ranks rows as the distance does) and ``t = 0`` for inner
product (cosine arrives as unit vectors).
Padding rows and rows a filter excludes have ``t = +inf``.

Bin-wise reduction (docs/tpuknn.md). Global row ``j`` belongs to bin ``j mod L``. Each block's
scores are reshaped to ``(q, c, L)`` and reduced with ``min`` over ``c`` -- one compare per score,
no sort, no heap -- and folded into a running ``(q, L)`` minimum that also remembers which block
each bin's minimum came from. After the last block an exact ``lax.top_k`` over the ``L`` bin
minima picks the ``k`` best bins, and only for those ``k`` bins the winning row inside the block is
recovered by re-scoring its ``c`` candidates. Keeping the arg-min out of the hot loop matters on
CPU: a value+index reduction there costs more than the matmul it follows. ``L`` comes from
:func:`annlib.accel.binning.num_bins` (XLA's rule), so the expected recall is the target's.

Sharding: each device runs the loop over its own blocks (bins are global, so the bin of a row does
not depend on where it is stored), takes its local top-k of bins, and the ``D * k`` local winners
are merged: where two devices report the same bin only the better one is kept (exactly what one
device holding everything would keep), then ``top_k``. The sharded result therefore equals the
single-device result.

Other modes: ``"exact"`` folds every block into a running exact top-k (``lax.top_k``), and
``"native"`` uses ``lax.approx_min_k``, whose approximation exists only in the TPU lowering (on CPU
and GPU it sorts: exact and slow), so it is chosen automatically only on TPU.
"""

from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from .binning import num_bins
from .buckets import query_chunks
from .sharding import AXIS, DeviceDatabase, backend_platform, shard_map

__all__ = ["search", "choose_mode", "MODES"]

MODES = ("bins", "exact", "native")
_INT_MAX = np.iinfo(np.int32).max


def choose_mode(n: int, k: int, recall_target: float, platform: str | None = None) -> str:
    """The reduction a search uses: ``"exact"`` when binning would keep every row (small ``n``
    or ``recall_target == 1``), ``"native"`` (``lax.approx_min_k``) on TPU, else ``"bins"``."""
    if num_bins(n, k, recall_target) >= n:
        return "exact"
    return "native" if (platform or backend_platform()) == "tpu" else "bins"


def _scores(q, x, t):
    """``t - q @ x.T`` in float32 (x may be bfloat16)."""
    prod = lax.dot_general(q.astype(x.dtype), x, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)
    return t[None, :] - prod


def _local_blocks(n_blocks, shards):
    """This device's index along the mesh and how many of its slots hold valid blocks."""
    s = lax.axis_index(AXIS)
    return s, jnp.maximum(n_blocks - s + shards - 1, 0) // shards


def _bins_shard(q, x, t, n_blocks, *, k, bins, shards):
    """Per-device bin-wise reduction; returns the local top-k bins (value, row, bin)."""
    capacity, block, _ = x.shape
    chunks = -(-block // bins)
    whole, rest = divmod(block, bins)
    s, local = _local_blocks(n_blocks[0], shards)
    nq = q.shape[0]

    def body(j, carry):
        best, where = carry
        sc = _scores(q, x[j], t[j])
        # Local bin of block row p is p mod L: whole rows of L bins, then a partial row.
        if whole:
            m = sc[:, : whole * bins].reshape(nq, whole, bins).min(axis=1)
            if rest:
                m = jnp.concatenate([jnp.minimum(m[:, :rest], sc[:, whole * bins:]), m[:, rest:]], axis=1)
        else:  # fewer rows than bins: bins past the block stay empty
            m = jnp.pad(sc, ((0, 0), (0, bins - block)), constant_values=jnp.inf)
        g = j * shards + s  # global block id
        if block % bins:
            m = jnp.roll(m, (g * block) % bins, axis=1)  # local bin -> global bin
        better = m < best  # strict: on ties the earlier (lower) row wins
        return jnp.where(better, m, best), jnp.where(better, g, where)

    init = (jnp.full((nq, bins), jnp.inf, jnp.float32), jnp.zeros((nq, bins), jnp.int32))
    best, where = lax.fori_loop(0, local, body, init)
    neg, b = lax.top_k(-best, k)
    g = jnp.take_along_axis(where, b, axis=1)
    # Recover the winning row: the rows of block g in bin b are p0 + i*bins, i < chunks.
    p = jnp.remainder(b - g * block, bins)[..., None] + bins * jnp.arange(chunks, dtype=jnp.int32)
    ok = p < block
    p = jnp.minimum(p, block - 1)
    slot = (g // shards)[..., None]
    cand = x[slot, p]  # (q, k, chunks, d)
    sc = t[slot, p] - jnp.einsum("qd,qkcd->qkc", q.astype(x.dtype), cand,
                                 preferred_element_type=jnp.float32)
    pick = jnp.argmin(jnp.where(ok, sc, jnp.inf), axis=-1)
    row = g * block + jnp.take_along_axis(p, pick[..., None], axis=-1)[..., 0]
    return -neg[None], row[None], b[None]


def _exact_shard(q, x, t, n_blocks, *, k, bins, shards):
    """Per-device exact top-k: every block folded into a running top-k."""
    capacity, block, _ = x.shape
    s, local = _local_blocks(n_blocks[0], shards)
    nq = q.shape[0]
    offsets = jnp.arange(block, dtype=jnp.int32)

    def body(j, carry):
        best, rows = carry
        sc = _scores(q, x[j], t[j])
        g = j * shards + s
        vals = jnp.concatenate([best, -sc], axis=1)
        ids = jnp.concatenate([rows, jnp.broadcast_to(g * block + offsets, sc.shape)], axis=1)
        top, pos = lax.top_k(vals, k)
        return top, jnp.take_along_axis(ids, pos, axis=1)

    init = (jnp.full((nq, k), -jnp.inf, jnp.float32), jnp.full((nq, k), -1, jnp.int32))
    best, rows = lax.fori_loop(0, local, body, init)
    return -best[None], rows[None], rows[None]  # bins unused: rows are distinct


def _native_shard(q, x, t, n_blocks, *, k, bins, shards, recall_target, n_rows):
    """Per-device ``lax.approx_min_k`` over the whole shard (fused with the matmul on TPU)."""
    capacity, block, d = x.shape
    s, _ = _local_blocks(n_blocks[0], shards)
    sc = _scores(q, x.reshape(capacity * block, d), t.reshape(capacity * block))
    vals, pos = lax.approx_min_k(sc, k, recall_target=recall_target,
                                 reduction_input_size_override=max(n_rows, capacity * block))
    rows = ((pos // block) * shards + s) * block + pos % block
    return vals[None], rows[None], rows[None]


def _merge(vals, rows, bins, k, dedupe):
    """Merge per-device lists (D, q, k) into the global top-k (q, k)."""
    d, nq, kk = vals.shape
    vals = jnp.moveaxis(vals, 0, 1).reshape(nq, d * kk)
    rows = jnp.moveaxis(rows, 0, 1).reshape(nq, d * kk)
    if dedupe and d > 1:
        bins = jnp.moveaxis(bins, 0, 1).reshape(nq, d * kk)
        # Sort by (bin, value, row); keep the first of each bin, as one device would have.
        bins, vals, rows = lax.sort((bins, vals, rows), dimension=1, num_keys=3)
        dup = jnp.concatenate([jnp.zeros((nq, 1), bool), bins[:, 1:] == bins[:, :-1]], axis=1)
        vals = jnp.where(dup, jnp.inf, vals)
    neg, pos = lax.top_k(-vals, k)
    return -neg, jnp.take_along_axis(rows, pos, axis=1)


@lru_cache(maxsize=None)
def _program(mesh, mode: str, k: int, bins: int, recall_target: float, n_rows: int):
    shards = mesh.devices.size
    if mode == "bins":
        local = partial(_bins_shard, k=k, bins=bins, shards=shards)
    elif mode == "exact":
        local = partial(_exact_shard, k=k, bins=bins, shards=shards)
    else:
        local = partial(_native_shard, k=k, bins=bins, shards=shards,
                        recall_target=recall_target, n_rows=n_rows)
    mapped = shard_map(local, mesh, in_specs=(P(), P(AXIS), P(AXIS), P()),
                       out_specs=(P(AXIS), P(AXIS), P(AXIS)))

    def run(q, x, t, n_blocks):
        vals, rows, bin_ids = mapped(q, x, t, n_blocks)
        return _merge(vals, rows, bin_ids, k, dedupe=mode == "bins")

    return jax.jit(run)


def search(
    db: DeviceDatabase,
    queries: np.ndarray,
    k: int,
    recall_target: float,
    *,
    terms=None,
    mode: str | None = None,
    n_effective: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate (or exact) top-k of every query against a device database.

    Parameters
    ----------
    db : DeviceDatabase
    queries : ndarray float32 (q, d)
        Prepared queries (unit rows for cosine).
    k : int
        ``1 <= k <= db.layout.n``.
    recall_target : float
        Expected recall in (0, 1]; sizes the number of bins.
    terms : jax.Array, optional
        Per-row score terms to use instead of ``db.terms`` (a filter: +inf on excluded rows).
    mode : {"bins", "exact", "native"}, optional
        Force a reduction; default :func:`choose_mode`.
    n_effective : int, optional
        Rows that can be returned (allowed by a filter); default all. Only decides ``"exact"``.

    Returns
    -------
    (ndarray float32 (q, k), ndarray int64 (q, k))
        Scores ``t - <q, x>`` ascending (not yet exact: re-score them) and row positions; -1 and
        +inf where a row has fewer than ``k`` candidates.
    """
    lay = db.layout
    n_eff = lay.n if n_effective is None else n_effective
    mode = mode or choose_mode(n_eff, k, recall_target)
    bins = num_bins(lay.n, k, recall_target) if mode == "bins" else k
    # Only the native op needs the target and the row count; leaving them out of the other
    # programs' cache keys lets targets with the same bin count, and adds, reuse a compilation.
    native = mode == "native"
    program = _program(db.mesh, mode, k, bins, float(recall_target) if native else 0.0,
                       lay.n if native else 0)
    x, t = db.vectors, db.terms if terms is None else terms
    n_blocks = jnp.full((1,), lay.blocks, jnp.int32)
    pending = []
    for start, stop, rows in query_chunks(queries.shape[0]):
        chunk = np.zeros((rows, queries.shape[1]), np.float32)
        chunk[: stop - start] = queries[start:stop]
        pending.append((stop - start, program(jax.device_put(chunk, db.replicated), x, t, n_blocks)))
    vals = np.concatenate([np.asarray(v)[:m] for m, (v, _) in pending])
    rows = np.concatenate([np.asarray(r)[:m] for m, (_, r) in pending]).astype(np.int64)
    bad = ~np.isfinite(vals) | (rows < 0) | (rows >= lay.n)
    rows[bad] = -1
    vals[bad] = np.inf
    return vals, rows
