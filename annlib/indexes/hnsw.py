"""HNSW graph index, optionally accelerated by FINGER distance estimates on layer 0, or walked on
8-bit scalar-quantized codes with exact re-scoring (``walk="sq8"``).

The family decides what is scored (levels, batches, which rows to repair, when a filter is so
selective that an exact scan is cheaper); :mod:`annlib.kernels.graph`,
:mod:`annlib.kernels.finger` and :mod:`annlib.kernels.graph_sq8` do the walking and the arithmetic.

State: one :class:`HNSWGraph` (with an optional :class:`FingerPayload` or :class:`SQ8Codes`)
holds every array and scalar of a built index; it checks itself (:meth:`HNSWGraph.validate`)
and converts to and from the index file (:meth:`HNSWGraph.to_file`, :meth:`HNSWGraph.from_file`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numba
import numpy as np

from .. import _validation as V
from .._progress import progress_reporter
from .._state import bad_field, check_array, check_finite, check_range, require, take_array, take_meta
from ..api import Index
from ..kernels.distances import L2SQ
from ..metrics import _float32_safe_magnitude
from ..kernels.finger import (FingerArrays, cos_table, edge_payload, pair_statistics, payload_width,
                              sample_residuals)
from ..kernels.graph_sq8 import (CODE_MAX, SQ8Arrays, sq8_encode, sq8_fit, sq8_norms, sq8_one_query_table,
                                 sq8_relative_noise, sq8_search_one, sq8_search_queries)
from ..kernels.graph import (GraphArrays, bfs_order, insert_batch, link_reverse, new_one_query_scratch,
                             one_query_table, relabel_rows, repair_deleted, scratch_counts, search_one,
                             search_queries)
from ..kernels.query import RAW_TERMS

__all__ = ["HNSW", "HNSWGraph", "FingerPayload", "SQ8Codes"]

_F32 = np.dtype(np.float32)  # dtype objects: np.empty takes them without a lookup
_I64 = np.dtype(np.int64)

_MAX_LEVEL = 30
_FINGER_SAMPLES = 50_000


# ====================================================================================== state
@dataclass
class FingerPayload:
    """FINGER's part of an HNSW state: one basis for the whole graph, one payload row per node.

    Attributes
    ----------
    basis : float32 (r, d)
        Top-r right singular vectors of sampled edge residuals (1 <= r <= min(64, d)).
    codes : uint64 (capacity, payload_width(2M, r))
        Per node, everything an expansion reads (layout in :mod:`annlib.kernels.finger`):
        sign codes of its edges (bits r..63 zero), and through the float32 view ``payload``
        the edge terms (t_e, |e_res|), the node's projection and its squared norm.
    table : float32 (r + 1,)
        Estimated cosine per Hamming distance (with the distribution-matching correction and
        the search-time slack).
    distribution : (mu, sigma, mu_hat, sigma_hat) or None
        Exact vs estimated cosine statistics the table was corrected with (None: uncorrected).
    payload : float32 view of ``codes`` (derived, not a field of the file)
    """

    basis: np.ndarray
    codes: np.ndarray
    table: np.ndarray
    distribution: tuple[float, float, float, float] | None = None
    payload: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.payload = self.codes.view(np.float32)

    @property
    def rank(self) -> int:
        """Bits per edge code (rows of the basis)."""
        return int(self.basis.shape[0])

    def kernel_arrays(self) -> FingerArrays:
        """The arrays as the kernels take them."""
        return FingerArrays(self.basis, self.codes, self.payload, self.table)

    def validate(self, n: int, width0: int, dim: int) -> None:
        """Check shapes, code bits and finiteness for ``n`` nodes of layer-0 width ``width0``.

        Raises
        ------
        IndexFormatError
            Names the field (file names: finger_basis, finger_payload, finger_table, finger_dm).
        """
        check_array(self.basis, "finger_basis", np.float32, (None, dim))
        r = self.rank
        require(1 <= r <= min(64, dim), "finger_basis", f"rank must be in [1, {min(64, dim)}]; got {r}")
        check_finite(self.basis, "finger_basis")
        check_array(self.table, "finger_table", np.float32, (r + 1,))
        check_finite(self.table, "finger_table")
        check_array(self.codes, "finger_payload", np.uint64, (None, payload_width(width0, r)))
        require(self.codes.shape[0] >= n, "finger_payload", f"expected at least {n} rows; got {self.codes.shape[0]}")
        if n:
            # the Hamming distance indexes the (r + 1)-entry table: no code may have bits >= r
            if r < 64:
                bits = np.bitwise_or.reduce(self.codes[:n, :width0], axis=None)
                require(int(bits) >> r == 0, "finger_payload", f"edge codes have bits beyond rank {r}")
            floats = self.payload[:n, 2 * width0:4 * width0 + r + 1]
            check_finite(floats, "finger_payload")
        if self.distribution is not None:
            ok = len(self.distribution) == 4 and all(math.isfinite(v) for v in self.distribution)
            require(ok, "finger_dm", "expected null or four finite numbers")


# Widening of a re-fitted side of the codes' range, as a fraction of the new span: each re-fit
# costs O(n d), and without room a stream of adds each slightly past the range would pay it on
# every add; the step of a dimension grows by 1/16 per side passed (1/8 when an add passes both;
# the codes' noise ~1.13x / ~1.27x there). Integer dimensions keep step 1 while their values
# span at most 255 (sq8_fit).
REFIT_MARGIN = 1.0 / 16


@dataclass
class SQ8Codes:
    """The codes a ``walk="sq8"`` index walks on: every vector quantized to one byte per dimension.

    ``vector[j] ~ offset[j] + step[j] * codes[node, j]`` (:mod:`annlib.kernels.graph_sq8`). The
    range is fitted at build; an add whose vectors fall outside it fits it again over every
    vector (:meth:`covers`).

    Attributes
    ----------
    codes : uint8 (capacity, d)
        Node order, as ``HNSWGraph.vectors``.
    offset : float32 (d,)
    step : float32 (d,)
        Positive.
    norms : float32 (capacity,) (derived, not a field of the file)
        ``sum_j (step[j] * codes[node, j])^2``, the per-node term of the L2 proxy on codes.
    """

    codes: np.ndarray
    offset: np.ndarray
    step: np.ndarray
    norms: np.ndarray = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.norms is None:
            self.norms = np.zeros(self.codes.shape[0], np.float32)

    @classmethod
    def fit(cls, vectors: np.ndarray, n: int, previous: "SQ8Codes | None" = None) -> "SQ8Codes":
        """Codes of the first ``n`` rows of ``vectors`` (n >= 1), with room for all its rows.
        ``previous``: the codes whose range an add left; the sides it left are widened by
        :data:`REFIT_MARGIN` of the new span (:func:`~annlib.kernels.graph_sq8.sq8_fit`)."""
        if previous is None:
            offset, step = sq8_fit(vectors[:n])
        else:
            offset, step = sq8_fit(vectors[:n], (previous.offset, previous.step), REFIT_MARGIN)
        codes = np.zeros((vectors.shape[0], vectors.shape[1]), np.uint8)
        out = cls(codes=codes, offset=offset, step=step)
        out.encode(vectors, 0, n)
        return out

    def encode(self, vectors: np.ndarray, lo: int, hi: int) -> None:
        """(Re)compute the codes and norms of rows ``lo:hi`` from ``vectors`` (clipped to the range)."""
        sq8_encode(vectors[lo:hi], self.offset, self.step, self.codes[lo:hi])
        sq8_norms(self.codes[lo:hi], self.step, self.norms[lo:hi])

    def covers(self, X: np.ndarray) -> bool:
        """Whether every value of ``X`` (float32 (m, d)) rounds to a code without clipping."""
        if X.shape[0] == 0:
            return True
        lo = self.offset.astype(np.float64) - 0.5 * self.step
        hi = self.offset.astype(np.float64) + (CODE_MAX + 0.5) * self.step.astype(np.float64)
        return bool(np.all(X.min(axis=0) >= lo) and np.all(X.max(axis=0) <= hi))

    def encode_norms(self, n: int) -> None:
        """Recompute the derived norms of the first ``n`` rows (after a load)."""
        self.norms = np.zeros(self.codes.shape[0], np.float32)
        sq8_norms(self.codes[:n], self.step, self.norms[:n])

    def grown(self, used: int, rows: int) -> "SQ8Codes":
        """A copy with ``rows`` rows holding the first ``used`` (offset and step shared)."""
        return SQ8Codes(codes=_grown(self.codes, used, rows), offset=self.offset, step=self.step,
                        norms=_grown(self.norms, used, rows))

    def kernel_arrays(self) -> tuple:
        """The arrays as the kernels take them (:class:`~annlib.kernels.graph_sq8.SQ8Arrays` fields)."""
        return (self.codes, self.offset, self.step, self.norms)

    def validate(self, n: int, dim: int) -> None:
        """Check shapes, dtypes, a finite range and positive steps for ``n`` nodes of ``dim``.

        Raises
        ------
        IndexFormatError
            Names the field (file names: sq8_codes, sq8_offset, sq8_step).
        """
        check_array(self.codes, "sq8_codes", np.uint8, (None, dim))
        require(self.codes.shape[0] >= n, "sq8_codes", f"expected at least {n} rows; got {self.codes.shape[0]}")
        check_array(self.offset, "sq8_offset", np.float32, (dim,))
        check_finite(self.offset, "sq8_offset")
        check_array(self.step, "sq8_step", np.float32, (dim,))
        check_finite(self.step, "sq8_step")
        require(bool(np.all(self.step > 0)), "sq8_step", "every step must be > 0")
        # decoded values must keep the walk's float32 arithmetic finite, as stored vectors do
        # (codes are fitted to vectors within this bound)
        bound = _float32_safe_magnitude(dim)
        require(bool(np.all(np.abs(self.offset) <= bound)), "sq8_offset",
                f"every offset must be within +-{bound:.3g} (the float32-safe magnitude at d={dim})")
        top = self.offset.astype(np.float64) + 255.0 * self.step.astype(np.float64)
        require(bool(np.all(np.abs(top) <= bound)), "sq8_step",
                f"offset + 255 * step must be within +-{bound:.3g} (the float32-safe magnitude at d={dim})")


@dataclass
class HNSWGraph:
    """Every array and scalar of a built HNSW index, in node order.

    Nodes are numbered in the order the graph was laid out (breadth-first after a build, then
    appended); ``node_positions`` maps them to positions, the numbering the base class maps
    to ids. Per-node arrays have ``capacity`` rows, of which the first ``n`` are in use.

    Attributes
    ----------
    M : int
        Out-degree of layers >= 1; layer 0 keeps up to 2M.
    vectors : float32 (capacity, d)
        Stored (metric-prepared) vectors.
    levels : int32 (capacity,)
        Top layer of each node, in [0, 30].
    upper_start : int64 (capacity,)
        First row of ``links_upper`` owned by each node: node v owns rows
        ``upper_start[v] + l - 1`` for l = 1..levels[v]; in position order these are the
        cumulative sums of ``levels``.
    links_layer0 : int32 (capacity, 2M + 1)
        Layer 0: column 0 the neighbour count, then the neighbour node numbers.
    links_upper : int32 (>= max(1, n_upper_rows), M + 1)
        Layers >= 1, same row format.
    deleted : bool (capacity,)
        Tombstones.
    n, n_upper_rows, n_deleted : int
        Nodes in use, rows of ``links_upper`` in use, tombstones.
    entry, max_level : int
        Entry node (a live node of the top level; -1 when nothing is live) and its level.
    node_positions : int64 (n,) or None
        Position of each node (None: nodes are positions).
    finger : FingerPayload or None
    sq8 : SQ8Codes or None
        The codes of a ``walk="sq8"`` index.
    rng : numpy Generator
        Draws the levels of added nodes; its state is saved so load-then-add equals add.
    """

    M: int
    vectors: np.ndarray
    levels: np.ndarray
    upper_start: np.ndarray
    links_layer0: np.ndarray
    links_upper: np.ndarray
    deleted: np.ndarray
    n: int = 0
    n_upper_rows: int = 0
    n_deleted: int = 0
    entry: int = -1
    max_level: int = 0
    node_positions: np.ndarray | None = None
    finger: FingerPayload | None = None
    sq8: SQ8Codes | None = None
    rng: np.random.Generator | None = None
    # derived lookups, recomputed by refresh() after every change
    position_nodes: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    positions_padded: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    live_positions: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def empty(cls, M: int, vectors: np.ndarray, upper_rows: int, rng: np.random.Generator) -> "HNSWGraph":
        """A graph without nodes whose storage holds ``vectors`` (owned; capacity = its rows)
        and ``upper_rows`` rows of upper layers."""
        cap = vectors.shape[0]
        return cls(M=M, vectors=vectors, levels=np.zeros(cap, np.int32),
                   upper_start=np.zeros(cap, np.int64),
                   links_layer0=np.zeros((cap, 2 * M + 1), np.int32),
                   links_upper=np.zeros((max(1, upper_rows), M + 1), np.int32),
                   deleted=np.zeros(cap, np.bool_), rng=rng)

    @property
    def capacity(self) -> int:
        """Rows allocated per node array."""
        return int(self.vectors.shape[0])

    def grown(self, n_needed: int, rows_needed: int) -> "HNSWGraph":
        """A copy of this state with room for ``n_needed`` nodes and ``rows_needed`` upper rows.

        Arrays that already have room are shared with this state, not copied (the caller only
        writes their unused rows, or restores what it changed, see ``HNSW._add``); arrays that
        grow are new, by 1.5x, so repeated small adds stay amortised O(1) per vector.
        """
        g = dataclasses.replace(self)
        cap = self.capacity
        if n_needed > cap or not self.vectors.flags.writeable:
            new_cap = max(n_needed, int(cap * 1.5) + 16)
            for name in ("vectors", "levels", "upper_start", "links_layer0", "deleted"):
                setattr(g, name, _grown(getattr(self, name), self.n, new_cap))
            if self.finger is not None:
                g.finger = dataclasses.replace(self.finger, codes=_grown(self.finger.codes, self.n, new_cap))
            if self.sq8 is not None:
                g.sq8 = self.sq8.grown(self.n, new_cap)
        have = self.links_upper.shape[0]
        if rows_needed > have or not self.links_upper.flags.writeable:
            g.links_upper = _grown(self.links_upper, self.n_upper_rows,
                                   max(rows_needed, int(have * 1.5) + 16, 1))
        return g

    def refresh(self) -> None:
        """Recompute the derived lookups (inverse order, live mask) after a change."""
        n = self.n
        if self.node_positions is None:
            self.position_nodes = self.positions_padded = None
        else:
            perm = self.node_positions
            inv = np.empty_like(perm)
            inv[perm] = np.arange(perm.size, dtype=np.int64)
            self.position_nodes = inv
            # one trailing -1 so kernel results padded with -1 map to -1 in one take
            self.positions_padded = np.append(perm, np.int64(-1))
        if self.n_deleted:
            dead = self.deleted[:n]
            self.live_positions = ~(dead if self.position_nodes is None else dead[self.position_nodes])
        else:
            self.live_positions = None

    # ---------------------------------------------------------------- views
    def nodes_of(self, positions: np.ndarray) -> np.ndarray:
        """Node numbers of ``positions``."""
        return positions if self.position_nodes is None else self.position_nodes[positions]

    def kernel_graph(self, proxy: int) -> GraphArrays:
        """The graph as the kernels take it."""
        return GraphArrays(self.vectors, self.links_layer0, self.links_upper, self.upper_start,
                           self.levels, int(self.entry), int(self.max_level), int(proxy))

    def kernel_finger(self) -> FingerArrays:
        """FINGER's arrays as the kernels take them (empty, rank 0, without FINGER)."""
        if self.finger is not None:
            return self.finger.kernel_arrays()
        codes = np.zeros((0, payload_width(2 * self.M, 0)), np.uint64)
        return FingerArrays(np.zeros((0, self.vectors.shape[1]), np.float32), codes,
                            codes.view(np.float32), np.zeros(1, np.float32))

    # ---------------------------------------------------------------- checks
    def validate(self, dim: int, n_positions: int, max_abs: float | None = None) -> None:
        """Check every invariant the kernels rely on; refuse anything that would make a walk
        read out of bounds or return garbage.

        Cheap vectorised passes: dtypes and shapes; ``n`` equal to ``n_positions``; levels in
        range; upper-row offsets equal to the cumulative levels (in offset order) and inside
        ``links_upper``; neighbour counts within capacity and neighbour ids within ``[0, n)``
        (and, on upper layers, of nodes that reach that layer); entry point live and of the top
        level; tombstone count; node order a permutation; finite vectors (and at most
        ``max_abs`` in magnitude when given); the FINGER payload (:meth:`FingerPayload.validate`);
        the codes (:meth:`SQ8Codes.validate`).

        Raises
        ------
        IndexFormatError
            Names the field (as it is called in the index file).
        """
        M, n = self.M, self.n
        require(n == n_positions, "n", f"the graph has {n} nodes but the index {n_positions} positions")
        check_array(self.vectors, "vectors", np.float32, (None, dim))
        cap = self.capacity
        require(n <= cap, "vectors", f"expected at least {n} rows; got {cap}")
        for name, value, dtype, shape in (("levels", self.levels, np.int32, (cap,)),
                                          ("ustart", self.upper_start, np.int64, (cap,)),
                                          ("links0", self.links_layer0, np.int32, (cap, 2 * M + 1)),
                                          ("deleted", self.deleted, np.bool_, (cap,))):
            check_array(value, name, dtype, shape)
        check_array(self.links_upper, "upper", np.int32, (None, M + 1))
        vectors = self.vectors[:n]
        check_finite(vectors, "vectors")
        if max_abs is not None and n:
            biggest = max(float(vectors.max()), -float(vectors.min()))  # two passes, no copy
            require(biggest <= max_abs, "vectors", f"entries must be at most {max_abs:.3g} in magnitude")
        # node order
        if self.node_positions is not None:
            perm = self.node_positions
            check_array(perm, "node_positions", np.int64, (n,))
            check_range(perm, "node_positions", 0, max(n - 1, 0))
            seen = np.zeros(n, np.bool_)
            seen[perm] = True
            require(bool(seen.all()), "node_positions", "is not a permutation of the positions")
        # levels and upper-row offsets
        levels = self.levels[:n]
        check_range(levels, "levels", 0, _MAX_LEVEL)
        # Each node owns the rows [ustart, ustart + level): taken in offset order (level-0
        # nodes first among equal offsets) the offsets must be the running sum of the levels,
        # so the row ranges tile links_upper without overlap. Offsets follow insertion order,
        # which is position order except after a held-out self-tune (samples inserted last).
        ustart = self.upper_start[:n]
        by_offset = np.lexsort((levels, ustart))
        expected = np.zeros(n, np.int64)
        np.cumsum(levels[by_offset][:-1], out=expected[1:])
        require(np.array_equal(ustart[by_offset], expected), "ustart",
                "upper-layer row offsets do not match the cumulative levels")
        rows = int(levels.sum())
        require(self.n_upper_rows == rows, "rows", f"expected {rows} (the sum of levels); got {self.n_upper_rows}")
        require(self.links_upper.shape[0] >= max(1, rows), "upper",
                f"expected at least {max(1, rows)} rows; got {self.links_upper.shape[0]}")
        # neighbour lists
        _check_rows(self.links_layer0[:n], "links0", 2 * M, n, None, levels)
        if rows:
            row_level = (np.arange(rows, dtype=np.int64) - np.repeat(ustart[by_offset], levels[by_offset]) + 1).astype(np.int32)
            _check_rows(self.links_upper[:rows], "upper", M, n, row_level, levels)
        # tombstones and entry point
        dead = self.deleted[:n]
        check_range(dead.view(np.uint8), "deleted", 0, 1)
        n_dead = int(np.count_nonzero(dead))
        require(self.n_deleted == n_dead, "n_deleted", f"expected {n_dead} (the tombstones); got {self.n_deleted}")
        if n_dead < n:
            require(0 <= self.entry < n, "entry", f"must be a node in [0, {n - 1}]; got {self.entry}")
            require(not dead[self.entry], "entry", f"node {self.entry} is deleted")
            top = int(levels[~dead].max())
            require(self.max_level == int(levels[self.entry]) == top, "max_level",
                    f"expected {top} (the entry's level and the highest live level); got {self.max_level}")
        else:
            require(self.entry == -1, "entry", f"expected -1 (no live node); got {self.entry}")
            require(self.max_level == 0, "max_level", f"expected 0 (no live node); got {self.max_level}")
        if self.finger is not None:
            self.finger.validate(n, 2 * M, dim)
        if self.sq8 is not None:
            require(self.sq8.codes.shape[0] == cap, "sq8_codes", f"expected {cap} rows (as vectors); got {self.sq8.codes.shape[0]}")
            self.sq8.validate(n, dim)

    # ---------------------------------------------------------------- file
    def to_file(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(meta, arrays) for the index file; arrays are views of the used rows."""
        n = self.n
        meta = {"entry": int(self.entry), "max_level": int(self.max_level), "n": n,
                "rows": int(self.n_upper_rows), "n_deleted": int(self.n_deleted),
                "finger_dm": None, "level_rng_state": self.rng.bit_generator.state}
        arrays = {"vectors": self.vectors[:n], "levels": self.levels[:n], "ustart": self.upper_start[:n],
                  "links0": self.links_layer0[:n], "upper": self.links_upper[:max(1, self.n_upper_rows)],
                  "deleted": self.deleted[:n]}
        if self.finger is not None:
            f = self.finger
            meta["finger_dm"] = None if f.distribution is None else [float(v) for v in f.distribution]
            arrays.update({"finger_basis": f.basis, "finger_payload": f.codes[:n], "finger_table": f.table})
        if self.sq8 is not None:
            c = self.sq8
            arrays.update({"sq8_codes": c.codes[:n], "sq8_offset": c.offset, "sq8_step": c.step})
        if self.node_positions is not None:
            arrays["node_positions"] = self.node_positions  # rows of every array above are nodes
        return meta, arrays

    @classmethod
    def from_file(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], M: int, seed: int,
                  n_positions: int | None = None) -> "HNSWGraph":
        """Read a state written by :meth:`to_file` (types and lengths checked; call
        :meth:`validate` before use).

        Parameters
        ----------
        meta, arrays : the file's contents
        M : int
            The index's M (row widths).
        seed : int
            Seeds the level generator of files that predate its saved state.
        n_positions : int, optional
            The file's position count: the meta ``n`` must equal it.

        Raises
        ------
        IndexFormatError
            Missing or mistyped field, or arrays whose lengths disagree with ``n``.
        """
        n = take_meta(meta, "n")
        require(n >= 0, "n", f"must be >= 0; got {n}")
        if n_positions is not None:
            require(n == n_positions, "n", f"the graph has {n} nodes but the index {n_positions} positions")
        names = {"vectors": (np.float32, 2), "levels": (np.int32, 1), "ustart": (np.int64, 1),
                 "links0": (np.int32, 2), "upper": (np.int32, 2), "deleted": (np.bool_, 1)}
        got = {}
        for name, (dtype, ndim) in names.items():
            arr = take_array(arrays, name, dtype, ndim)
            if name != "upper":
                require(arr.shape[0] == n, name, f"expected {n} rows (meta n); got {arr.shape[0]}")
            got[name] = _own(arr)
        rows = take_meta(meta, "rows")
        require(got["upper"].shape[0] == max(1, rows), "upper",
                f"expected {max(1, rows)} rows (meta rows); got {got['upper'].shape[0]}")
        perm = arrays.get("node_positions")
        if perm is not None:
            perm = np.array(take_array(arrays, "node_positions", np.int64, 1))
        finger = None
        present = [k for k in ("finger_basis", "finger_payload", "finger_table") if k in arrays]
        if present:
            basis = _own(take_array(arrays, "finger_basis", np.float32, 2))
            codes = take_array(arrays, "finger_payload", np.uint64, 2)
            require(codes.shape[0] == n, "finger_payload", f"expected {n} rows (meta n); got {codes.shape[0]}")
            table = _own(take_array(arrays, "finger_table", np.float32, 1))
            dm = meta.get("finger_dm")
            if dm is not None:
                ok = isinstance(dm, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in dm)
                require(ok, "finger_dm", "expected null or a list of numbers")
                dm = tuple(float(v) for v in dm)
            finger = FingerPayload(basis=basis, codes=_own(codes), table=table, distribution=dm)
        sq8 = None
        if any(k.startswith("sq8_") for k in arrays):
            codes = take_array(arrays, "sq8_codes", np.uint8, 2)
            require(codes.shape[0] == n, "sq8_codes", f"expected {n} rows (meta n); got {codes.shape[0]}")
            sq8 = SQ8Codes(codes=_own(codes), offset=_own(take_array(arrays, "sq8_offset", np.float32, 1)),
                           step=_own(take_array(arrays, "sq8_step", np.float32, 1)))
        state = meta.get("level_rng_state")
        if state is None:
            rng = np.random.default_rng(seed)
        else:
            try:
                if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
                    raise ValueError("not a PCG64 state")
                bit_gen = np.random.PCG64()
                bit_gen.state = state
            except (TypeError, ValueError, KeyError, OverflowError) as exc:
                raise bad_field("level_rng_state", f"not a generator state ({exc})") from None
            rng = np.random.Generator(bit_gen)
        graph = cls(M=M, vectors=got["vectors"], levels=got["levels"], upper_start=got["ustart"],
                    links_layer0=got["links0"], links_upper=got["upper"], deleted=got["deleted"],
                    n=n, n_upper_rows=rows, n_deleted=take_meta(meta, "n_deleted"),
                    entry=take_meta(meta, "entry"), max_level=take_meta(meta, "max_level"),
                    node_positions=perm, finger=finger, sq8=sq8, rng=rng)
        return graph


def _own(a: np.ndarray) -> np.ndarray:
    """A loaded array the kernels can take as it is.

    A read-only memory map becomes a copy-on-write one (same pages; in-place repair writes stay
    private), so loaded and built indexes run one compiled kernel version; either way the
    result is a plain ndarray (numba types ndarray subclasses slowly, on every call).
    """
    if isinstance(a, np.memmap) and not a.flags.writeable:
        a = np.memmap(a.filename, dtype=a.dtype, mode="c", offset=a.offset, shape=a.shape)
    elif not a.flags.writeable:
        a = a.copy()
    return np.asarray(a)


def _grown(a: np.ndarray, used: int, rows: int) -> np.ndarray:
    """A new zeroed array of ``rows`` rows holding the first ``used`` rows of ``a``."""
    out = np.zeros((rows,) + a.shape[1:], dtype=a.dtype)
    out[:used] = a[:used]
    return out


def _check_rows(links: np.ndarray, field_name: str, width: int, n: int, row_level, levels) -> None:
    """Neighbour rows: counts in [0, width], used slots in [0, n), and (upper layers) every
    neighbour of a level-l row reaches level l (a walk reads that neighbour's row there).

    Runs over blocks of rows so the temporary masks stay small on large graphs.
    """
    counts = links[:, 0]
    check_range(counts, field_name, 0, width)
    slots = np.arange(1, links.shape[1], dtype=np.int32)[None, :]
    block = 1 << 16
    for lo in range(0, links.shape[0], block):
        sub = links[lo:lo + block]
        used = slots <= sub[:, :1]
        ids = sub[:, 1:][used]
        check_range(ids, field_name, 0, n - 1)
        if row_level is not None and ids.size:
            need = np.broadcast_to(row_level[lo:lo + block, None], used.shape)[used]
            low = levels[ids] < need
            if low.any():
                at = int(np.flatnonzero(low)[0])
                raise bad_field(field_name, f"neighbour {int(ids[at])} does not reach layer {int(need[at])}")


class _RowBackup:
    """Original contents of rows of an array shared with the published state, saved before an
    in-place write changes them, so a failed ``add`` can put them back."""

    def __init__(self, array: np.ndarray, limit: int):
        self.array = array
        self.limit = limit  # rows >= limit are not visible to the published state
        self.saved = np.zeros(limit, np.bool_)
        self.rows: list[np.ndarray] = []
        self.data: list[np.ndarray] = []

    def keep(self, rows: np.ndarray) -> None:
        rows = rows[rows < self.limit]
        rows = np.unique(rows[~self.saved[rows]])
        if rows.size:
            self.saved[rows] = True
            self.rows.append(rows)
            self.data.append(self.array[rows].copy())

    def restore(self) -> None:
        for rows, data in zip(self.rows, self.data):
            self.array[rows] = data


def _used_slots(links: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Every neighbour listed in ``links[rows]``."""
    sub = links[rows]
    used = np.arange(1, sub.shape[1])[None, :] <= sub[:, :1]
    return sub[:, 1:][used].astype(np.int64)


class _SearchView(NamedTuple):
    """What a search reads, prepared once per change of the index (plain tuples: fast dispatch)."""

    graph: tuple
    finger: tuple
    sq8: tuple | None  # the codes' arrays of a walk="sq8" index (SQ8Codes.kernel_arrays), else None
    sq8_arrays: Any  # the same as an SQ8Arrays (for the one-query table), or None
    deleted: np.ndarray  # node tombstones, or empty when nothing is deleted
    has_finger: bool
    projected_descent: bool  # FINGER searches descend on the basis projections (HNSW._descends_projected)
    # the one-query path (HNSW._search_one): the parts of the table it reads, live nodes, and
    # the pool of scratch arrays its searches take one at a time; every scratch ever made for
    # this view is also in `counted` (their counters feed search_stats)
    one_parts: tuple
    n_live: int
    n_nodes: int
    one_pool: list
    counted: list


# ====================================================================================== family
class HNSW(Index):
    """Hierarchical navigable small-world graph (like hnswlib), with optional FINGER.

    Parameters
    ----------
    metric : {"l2", "cosine", "ip"}, default "l2"
        Cosine data are normalised once and searched by inner product.
    M : int, default 32
        Out-degree on layers >= 1; layer 0 keeps up to ``2 * M``. Range 2..256. Higher M gives
        better recall per visited node on hard, high-intrinsic-dimension data (GloVe), a larger
        index and a slower build. 32 was fastest with FINGER at recall 0.95 on GloVe-200k,
        kdewall-SIFT-100k and MNIST; 16 was faster on WordNet-MiniLM and on small sets
        (docs/benchmarks-hnsw.md).
    ef_construction : int, default 200
        Beam width while inserting (at least ``M`` is used). Range 1..4096.
    finger : bool or "auto", default "auto"
        Build the FINGER payload (one global rank-``finger_rank`` basis of edge residuals, per
        edge a 64-bit sign code and two floats) so layer-0 searches skip exact distances whose
        estimate cannot enter the result set. Costs ``4 r + 16 * 2M`` bytes per vector.
        ``"auto"`` builds it when the data hold at least ``2**22`` numbers (``n * d``, 16 MB of
        float32) and ``d >= 2 * finger_rank``: on smaller sets (SIFT-10k, 5 MB) every FINGER
        setting measured was slower than the plain walk, and so it was on GloVe-200k (d=50,
        an estimate there costs nearly an exact distance: 0.77x); on MNIST-10k (d=784),
        kdewall-SIFT-100k (d=128) and WordNet-50k (d=384) FINGER was faster
        (docs/benchmarks-hnsw.md); with ``walk="auto"`` it builds FINGER only where the walk
        resolves to ``"float"``. ``index.params["finger"]`` keeps what was asked;
        ``index.finger_built`` says what was built.
    finger_rank : int, default 64
        Rank of the FINGER basis = bits per edge code; clipped to the dimension. Range 1..64.
    walk : {"auto", "float", "sq8"}, default "auto"
        What the search walk scores. ``"float"``: the float32 vectors. ``"sq8"``: one byte per
        dimension (per-dimension scalar quantization fitted to the build's range; ``d`` more
        bytes per vector); the walk keeps its beam by these approximate distances, then scores
        its best ``rescore * k`` candidates exactly and returns the ``k`` best of them with
        exact distances. A quarter of the memory traffic per evaluation: at recall 0.95, batch,
        on an idle machine 1.15-1.67x the best hnswlib on every shared set against the float
        walk's 0.94-1.30x; one query per call 0.97-1.52x (docs/benchmarks-hnsw.md, "Round 6,
        final"). The graph is built on the float32 vectors either way. An add whose vectors
        fall outside the codes' range fits the range again over every vector (O(n d)), with
        room on the sides it passed (:data:`REFIT_MARGIN`), so drifting adds re-fit rarely.
        Excludes ``finger=True`` (``"auto"`` builds no FINGER payload with ``"sq8"``). ``"auto"``: ``"sq8"``, unless ``finger=True``
        was asked or the codes' squared error exceeds 1 % of the data's robust spread (heavy
        tails, or a few extreme values stretching a dimension's range; at most 9e-5 on the
        shared sets, where the walk on codes beat the float walk, plain or FINGER, on every set
        in both modes); then ``"float"``. ``index.params["walk"]`` keeps what was asked; ``index.walk_built``
        says what was built.
    random_state : int, None or numpy Generator, default 0
        Seed of the level generator and of FINGER's sampling. Builds with the same seed give
        identical graphs for any number of threads (FINGER's basis and payload, products
        computed by BLAS, agree to its rounding). The generator's state is saved with the
        index, so adding to a loaded index gives the graph the same adds give without saving.
    default_recall : float in (0, 1] or None, default 0.92
        At the end of ``build`` the index tunes its own default search parameters for this
        recall@10 on 300 vectors held out of the build (added
        after tuning) (``annlib.tune``; see
        ``index.tuning``), so ``search(Q, k)`` without parameters is useful on any data: 0.92
        keeps recall >= 0.90 when queries come from a somewhat different source than the
        indexed vectors (docs/tuning.md). None keeps the fixed defaults below. Costs a few exact
        and sample searches (well under the build time).

    Search parameters
    -----------------
    ef : int, default 64
        Beam width on layer 0 (``max(ef, k)`` is used). Higher = better recall, slower.
    finger : bool, default True
        Use the FINGER filter when the index has it (False: plain exact walk on the same graph).
    rescore : float, default 2.0
        ``walk="sq8"`` only: the ``ceil(rescore * k)`` best candidates of the beam (at most ef)
        are scored exactly. Range 1..1000. On GloVe-200k (lossy codes) recall at
        ``rescore=1.5`` was within 0.001 of the float walk's at every ef measured (16-256);
        1.0 lost up to 0.02.

    Notes
    -----
    * Build inserts points in batches searched in parallel against the graph built so far, then
      adds reverse edges grouped by target node, so the graph does not depend on the thread
      count; a batch is at most 1/256 of the graph (1 point at a time for the first 256); recall at
      equal ef stays within 0.005 of one-at-a-time insertion (tested).
    * After a build, nodes are renumbered in breadth-first order of layer 0 so graph neighbours
      sit close in memory (faster walks on sets larger than the caches); positions and ids are
      unaffected (the permutation is kept and saved). Vectors added later are appended.
    * ``delete`` marks tombstones and immediately repairs the graph around them (each node that
      pointed to a deleted one re-selects among its live neighbours and theirs); deleted vectors
      stay in memory (positions are never reused). Rebuild to reclaim the space.
    * ``add`` inserts with the same algorithm; FINGER's basis and correction stay as fitted at
      build (new edges get codes on the old basis). Rebuild after large changes of distribution.
    * Concurrency: searches run together; ``add``, ``delete`` and ``build`` wait for the
      searches in flight and run alone (the index's reader-writer lock), so a search sees the
      graph wholly before or after a change. ``add`` grows the arrays in place; a call that
      raises (also from a ``progress`` callback) leaves the index as it was.
    * Scratch (visited sets) is pooled per index and reused by later searches: about 2 bytes per
      vector per concurrently searching thread.
    * :meth:`search_stats` reports exact distance evaluations and FINGER estimates per query
      (``walk="sq8"``: the re-scored candidates, and the evaluations on codes as estimates).

    Examples
    --------
    >>> import numpy as np, annlib
    >>> X = np.random.default_rng(0).normal(size=(2000, 32)).astype("float32")
    >>> index = annlib.HNSW(M=16).build(X)
    >>> ids, dist = index.search(X[:3], k=5, ef=64)
    >>> ids[:, 0].tolist()
    [0, 1, 2]
    """

    family = "hnsw"
    build_defaults = {"M": 32, "ef_construction": 200, "finger": "auto", "finger_rank": 64,
                      "walk": "auto", "random_state": 0, "default_recall": 0.92}
    # files of the releases before walk="sq8" walked on float32 vectors
    earlier_file_params = {"walk": "float"}
    # A graph links each vector to its near neighbours, so an indexed vector searched
    # leave-one-out starts next to its answer: self-tuning holds a sample out of the build.
    tuning_queries = "held_out"
    search_defaults = {"ef": 64, "finger": True, "rescore": 2.0}
    supports_add = True
    # the kernels every build runs: uncached means this build compiles (annlib.CompilationNotice)
    first_kernels = ("annlib.kernels.graph:insert_chunk",)
    supports_delete = True

    # A batch inserted in parallel is at most 1/_BATCH_DIV of the current graph, and at most
    # _MAX_BATCH points; 1 reproduces classic one-at-a-time insertion.
    _BATCH_DIV = 256
    _MAX_BATCH = 4096
    # Optimistic margin added to FINGER's estimated cosines: pruning only neighbours that stay
    # out even at a slightly smaller angle trades a few exact evaluations for recall.
    _FINGER_SLACK = 0.1
    # finger="auto" builds FINGER from this many numbers (n * d) on (see the class notes)
    _FINGER_MIN_NUMBERS = 1 << 22
    # ... and from a dimension of this many times finger_rank on (see _wants_finger)
    _FINGER_MIN_DIM_PER_RANK = 2
    # FINGER searches descend the upper layers on the basis projections (r floats per node)
    # instead of the vectors (d floats) when d >= this many times r: on MNIST (d=784, r=64)
    # 1.08-1.14x faster at ef 10-16 with equal recall; on kdewall-SIFT (d=128, r=64) 0.88-0.93x
    _PROJECTED_DESCENT_RATIO = 4
    _NO_MASK = np.zeros(0, np.bool_)
    _WALKS = ("auto", "float", "sq8")
    # walk="auto" walks on codes unless their squared error exceeds this fraction of the data's
    # robust spread (sq8_relative_noise): 0 (integer data: SIFT, MNIST) to 8.9e-5 (GloVe) on the
    # shared sets. bench/sq8_noise.py (20,000 x 64, M=16, ef 16-64, recall on codes against the
    # float walk's): Student-t 3 degrees of freedom 7.2e-3 (within 0.008), 2.5 dof 1.8e-2 (within
    # 0.013), lognormal sigma 1.5 0.096 (up to 0.027 lower), 2 dof 0.11 (0.07-0.09 lower), 1.5 dof
    # 96 (0.6 lower): the float walk from between the last two sets that lost about nothing
    _SQ8_MAX_RELATIVE_NOISE = 1e-2

    def __init__(self, metric: str = "l2", **params: Any):
        super().__init__(metric=metric, **params)
        self._graph: HNSWGraph | None = None
        self._view: _SearchView | None = None
        self._pool: dict[int, list] = {}
        self._stats_lock = threading.Lock()
        self._stats = [0, 0, 0]  # queries, exact evaluations, estimates
        self._one_plan: tuple = (None, None)  # (view, ids, table, words) of the one-query path
        self._raw_plan: tuple = (None,)  # (view, table, words) for the ordinary path's single queries

    # ------------------------------------------------------------------ parameters
    def _check_build_params(self, params):
        out = dict(params)
        out["M"] = V.check_int("M", params["M"], 2, 256)
        out["ef_construction"] = V.check_int("ef_construction", params["ef_construction"], 1, 4096)
        out["finger"] = V.check_bool_or_auto("finger", params["finger"])
        out["finger_rank"] = V.check_int("finger_rank", params["finger_rank"], 1, 64)
        out["walk"] = V.check_choice("walk", params["walk"], self._WALKS)
        if out["walk"] == "sq8" and out["finger"] is True:
            raise V.finger_with_sq8()
        return out

    def _check_search_params(self, params):
        return {"ef": V.check_int("ef", params["ef"], 1, 100_000),
                "finger": V.check_bool("finger", params["finger"]),
                "rescore": V.check_float("rescore", params["rescore"], 1.0, 1000.0)}

    @classmethod
    def _search_space(cls, n, dim):
        efs = [10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768]
        if n is not None and n < efs[-1]:
            efs = [e for e in efs if e < n] + [n]  # ef >= n already walks the whole graph
        return {"build": {"M": [16, 24, 32], "ef_construction": [200]},
                "search": {"ef": efs, "finger": [False, True]}}

    compiles_ahead = True

    @classmethod
    def _compile_ahead_index(cls, X, metric, params, shape, with_build_kernels=False):
        # layer 0 links every node to its nearest others (a k-NN graph by numpy): the walk's
        # kernels compile on it exactly as on a built graph, which only the insertion kernels
        # being compiled meanwhile could make
        index = cls(metric=metric, **{k: v for k, v in params.items() if k in cls.build_defaults})
        Xp = np.ascontiguousarray(index._metric.prepare(X), dtype=np.float32)
        m = Xp.shape[0]
        sq = np.einsum("ij,ij->i", Xp, Xp)
        D = sq[:, None] + sq[None, :] - 2 * (Xp @ Xp.T)
        np.fill_diagonal(D, np.inf)
        width = min(2 * index.params["M"], m - 1)
        graph = HNSWGraph.empty(index.params["M"], Xp, 0, np.random.default_rng(0))
        graph.links_layer0[:, 0] = width
        graph.links_layer0[:, 1:1 + width] = np.argsort(D, axis=1)[:, :width]
        graph.n, graph.entry, graph.max_level = m, 0, 0
        if with_build_kernels:  # the build's reverse-edge and renumbering kernels
            link_reverse(graph.kernel_graph(index._metric.proxy), np.arange(m, dtype=np.int64), 0,
                         2 * index.params["M"], np.zeros(m, np.bool_), np.zeros(m, np.int64))
            cls._reorder(graph)
        else:
            graph.node_positions = np.arange(m, dtype=np.int64)  # as the renumbering leaves it
        # walk="auto" is predicted without the data's noise check (codes win on most data)
        on_codes = index._prefers_codes()
        if index._wants_finger(*shape, on_codes):  # the build's FINGER kernels, and searches with FINGER
            index._fit_finger(graph, np.random.default_rng(0))
        if on_codes:
            graph.sq8 = SQ8Codes.fit(graph.vectors, m)
        index._commit(graph)
        index._reset_state(X.shape[1], m, None)
        return index

    # ------------------------------------------------------------------ publishing
    def _commit(self, graph: HNSWGraph) -> None:
        """Make ``graph`` the index's state (the last step of every successful change)."""
        graph.refresh()
        n = graph.n
        kgraph = graph.kernel_graph(self._metric.proxy)
        kfinger = graph.kernel_finger()
        deleted = graph.deleted[:n] if graph.n_deleted else self._NO_MASK
        positions = graph.positions_padded if graph.positions_padded is not None else _NO_POSITIONS
        self._fold_one_query_counts()
        self._view = _SearchView(
            graph=tuple(kgraph), finger=tuple(kfinger),
            sq8=None if graph.sq8 is None else graph.sq8.kernel_arrays(),
            sq8_arrays=None if graph.sq8 is None else SQ8Arrays(*graph.sq8.kernel_arrays()), deleted=deleted,
            has_finger=graph.finger is not None, projected_descent=self._descends_projected(graph),
            one_parts=(kgraph, kfinger, deleted, positions),
            n_live=n - graph.n_deleted, n_nodes=n, one_pool=[], counted=[])
        self._graph = graph
        self._pool = {}  # visited sets are sized by n

    def _fold_one_query_counts(self) -> None:
        # the one-query searches' counters of the view being replaced, into the totals (writers
        # only: no search is in flight)
        view = self._view
        if view is not None and view.counted:
            totals = np.sum([scratch_counts(s) for s in view.counted], axis=0)
            with self._stats_lock:
                for j in range(3):
                    self._stats[j] += int(totals[j])

    # ------------------------------------------------------------------ build / add
    def _build(self, X, progress):
        M = self.params["M"]
        rng = np.random.default_rng(self.params["random_state"])
        # X is the index's own copy (the base never hands over the caller's memory)
        levels = self._draw_levels(rng, X.shape[0])
        graph = HNSWGraph.empty(M, np.asarray(X), int(levels.sum()), rng)
        self._insert(graph, levels, progress, "HNSW build", None)
        self._reorder(graph)
        graph.sq8 = self._codes_for(graph)
        if self._wants_finger(X.shape[0], X.shape[1], graph.sq8 is not None):
            self._fit_finger(graph, rng)
        self._commit(graph)
        with self._stats_lock:
            self._stats = [0, 0, 0]  # the searches of the previous graph (folded by _commit) too

    def _add(self, X, progress):
        old = self._graph
        n0, m = old.n, X.shape[0]
        rng = copy.deepcopy(old.rng)  # advanced only if the add succeeds
        levels = self._draw_levels(rng, m)
        graph = old.grown(n0 + m, old.n_upper_rows + int(levels.sum()))
        # link_reverse rewrites rows of existing nodes in place; where those rows are shared
        # with the published state, their old contents are kept to be put back on failure.
        backup = (_RowBackup(graph.links_layer0, n0) if graph.links_layer0 is old.links_layer0 else None,
                  _RowBackup(graph.links_upper, old.n_upper_rows) if graph.links_upper is old.links_upper else None)
        try:
            graph.vectors[n0:n0 + m] = X
            if graph.sq8 is not None and graph.sq8.covers(X):  # rows past the published n: nothing reads them yet
                graph.sq8.encode(graph.vectors, n0, n0 + m)
            elif graph.sq8 is not None:
                # clipped codes of vectors outside the range would hide them from the walk: the
                # range is fitted again over every vector, in new arrays (the published codes
                # stay as they are until the commit); O(n d), on adds that leave the range only.
                # walk="auto" decides again, as a build would: a few extreme vectors can stretch
                # the range until the codes are too coarse, and the float walk is then built.
                graph.sq8 = self._codes_for(graph, n0 + m)
            touched = self._insert(graph, levels, progress, "HNSW add", backup)
            if graph.node_positions is not None:
                fresh = np.arange(n0, graph.n, dtype=np.int64)  # added nodes keep their positions
                graph.node_positions = np.concatenate([old.node_positions, fresh])
            if graph.finger is not None:
                self._refresh_finger(graph, n0, touched)
        except BaseException:
            for b in backup:
                if b is not None:
                    b.restore()
            raise
        graph.rng = rng
        self._commit(graph)

    def _relabel_positions(self, new_of_old):
        g = self._graph
        current = g.node_positions if g.node_positions is not None else np.arange(g.n, dtype=np.int64)
        g.node_positions = np.ascontiguousarray(new_of_old[current], dtype=np.int64)
        self._commit(g)

    def _draw_levels(self, rng, m):
        mult = 1.0 / math.log(self.params["M"])
        u = 1.0 - rng.random(m)  # (0, 1]
        return np.minimum(np.floor(-np.log(u) * mult), _MAX_LEVEL).astype(np.int32)

    def _insert(self, graph: HNSWGraph, levels, progress, desc, backup):
        """Insert the nodes ``graph.n .. graph.n + len(levels)`` (their vectors already stored);
        returns the nodes whose layer-0 rows gained edges. ``backup`` (layer 0, upper) or None."""
        M = graph.M
        n0, m = graph.n, levels.shape[0]
        n1 = n0 + m
        rows0 = graph.n_upper_rows
        graph.levels[n0:n1] = levels
        starts = rows0 + np.concatenate([[0], np.cumsum(levels[:-1], dtype=np.int64)])
        graph.upper_start[n0:n1] = starts
        rows1 = rows0 + int(levels.sum())
        if graph.capacity < n1 or graph.links_upper.shape[0] < rows1:
            raise RuntimeError("HNSW insert without room for the new nodes")  # a bug, not user input
        graph.links_upper[rows0:rows1] = 0
        graph.links_layer0[n0:n1] = 0
        graph.deleted[n0:n1] = False
        graph.n_upper_rows = rows1
        graph.n = n1
        touched = np.zeros(n1, np.bool_)
        group_of = np.zeros(n1, np.int64)  # link_reverse's workspace
        proxy = self._metric.proxy
        lv = graph.levels
        efc = max(self.params["ef_construction"], M)
        threads = max(1, numba.get_num_threads())
        visited = np.zeros((threads, n1), np.uint16)
        tags = np.zeros(threads, np.int64)
        pos = n0
        if graph.entry < 0:
            graph.entry, graph.max_level = n0, int(lv[n0])
            pos += 1
        with progress_reporter(progress, m, desc=desc, unit="vec") as report:
            while pos < n1:
                live = pos - graph.n_deleted
                b = max(1, min(self._MAX_BATCH, live // self._BATCH_DIV, n1 - pos))
                nodes = np.arange(pos, pos + b, dtype=np.int64)
                chunks = min(threads, b)
                view = graph.kernel_graph(proxy)
                insert_batch(view, nodes, M, efc, visited[:chunks], tags[:chunks])
                top = int(lv[pos:pos + b].max())
                for level in range(min(top, graph.max_level), -1, -1):
                    if backup is not None:
                        self._keep_rows(graph, backup, nodes, level)
                    link_reverse(view, nodes, level, 2 * M if level == 0 else M, touched, group_of)
                if top > graph.max_level:
                    first = pos + int(np.argmax(lv[pos:pos + b]))
                    graph.entry, graph.max_level = first, int(lv[first])
                pos += b
                report(pos - n0)
        return touched

    @staticmethod
    def _keep_rows(graph, backup, nodes, level):
        """Save the rows :func:`link_reverse` is about to rewrite at ``level`` (the targets of
        the batch's edges) into ``backup`` before it does."""
        layer0, upper = backup
        if level == 0:
            if layer0 is not None:
                layer0.keep(_used_slots(graph.links_layer0, nodes))
        elif upper is not None:
            src = nodes[graph.levels[nodes] >= level]
            targets = _used_slots(graph.links_upper, graph.upper_start[src] + level - 1)
            upper.keep(graph.upper_start[targets] + level - 1)

    # ------------------------------------------------------------------ node order
    @staticmethod
    def _reorder(graph: HNSWGraph) -> None:
        """Renumber the nodes of a fresh build in breadth-first order of layer 0.

        Neighbours then sit close together in memory, which cuts cache and TLB misses of the
        walk on sets larger than the caches. Positions (what the base class maps to ids) are
        unchanged: ``graph.node_positions`` translates node numbers back to them.
        """
        n = graph.n
        if n < 2:
            return
        order = bfs_order(graph.links_layer0, n, graph.entry)
        inv = np.empty_like(order)
        inv[order] = np.arange(n, dtype=np.int64)
        graph.node_positions = order
        graph.vectors = np.ascontiguousarray(graph.vectors[:n][order])
        graph.levels = np.ascontiguousarray(graph.levels[:n][order])
        graph.upper_start = np.ascontiguousarray(graph.upper_start[:n][order])
        graph.deleted = np.ascontiguousarray(graph.deleted[:n][order])
        links0 = np.ascontiguousarray(graph.links_layer0[:n][order])
        relabel_rows(links0, inv)
        graph.links_layer0 = links0
        relabel_rows(graph.links_upper[:graph.n_upper_rows], inv)
        graph.entry = int(inv[graph.entry])

    # ------------------------------------------------------------------ FINGER
    def _prefers_codes(self) -> bool:
        """Whether the build walks on codes before looking at the data: ``walk="sq8"``, or
        ``"auto"`` without ``finger=True``."""
        walk = self.params["walk"]
        return walk == "sq8" or (walk == "auto" and self.params["finger"] is not True)

    def _codes_for(self, graph: HNSWGraph, n: int | None = None) -> SQ8Codes | None:
        """The codes the first ``n`` vectors of ``graph`` (default ``graph.n``) are walked on, or
        None for the float walk (``walk`` param: ``"auto"`` keeps the codes only when their noise
        passes :data:`_SQ8_MAX_RELATIVE_NOISE`)."""
        n = graph.n if n is None else n
        if not self._prefers_codes():
            return None
        codes = SQ8Codes.fit(graph.vectors, n, graph.sq8)
        if self.params["walk"] == "sq8":
            return codes
        noise = sq8_relative_noise(graph.vectors[:n], codes.offset, codes.step)
        return codes if noise <= self._SQ8_MAX_RELATIVE_NOISE else None

    @property
    def walk_built(self) -> str | None:
        """What the built index's walk scores: ``"sq8"`` or ``"float"`` (``walk="auto"``
        resolved at build; see the class notes). None before a build."""
        g = self._graph
        return None if g is None else ("float" if g.sq8 is None else "sq8")

    def _wants_finger(self, n: int, d: int, on_codes: bool) -> bool:
        """Whether a build of ``n`` vectors of dimension ``d`` gets FINGER (``finger`` param);
        ``on_codes``: the build walks on 8-bit codes."""
        choice = self.params["finger"]
        if on_codes:
            return False  # the walk on codes has no FINGER variant (True with "sq8" is refused)
        if choice == "auto":
            # an estimate costs about a rank-r dot product: it only saves work when the exact
            # distance it replaces is several times dearer (GloVe, d=50 at rank 50: FINGER 0.77x
            # the plain walk on an idle machine; kdewall d=128: 1.05x; MNIST d=784: 1.40x)
            rank = self.params["finger_rank"]
            return n * d >= self._FINGER_MIN_NUMBERS and d >= self._FINGER_MIN_DIM_PER_RANK * rank
        return bool(choice)

    def _descends_projected(self, graph: HNSWGraph) -> bool:
        """Whether FINGER searches of ``graph`` descend on the basis projections: the rank is
        at most 1/_PROJECTED_DESCENT_RATIO of the dimension, and the metric is l2 (the only
        one measured)."""
        f = graph.finger
        return (f is not None and self._metric.proxy == L2SQ
                and graph.vectors.shape[1] >= self._PROJECTED_DESCENT_RATIO * f.rank)

    @property
    def finger_built(self) -> bool:
        """True when the built index carries FINGER's payload (``finger=True``, or ``"auto"``
        on data large enough; see the class notes). False before a build."""
        g = self._graph
        return g is not None and g.finger is not None

    def _fit_finger(self, graph: HNSWGraph, rng) -> None:
        """Fit the global basis and the distribution-matching table, then every edge payload."""
        n, d = graph.n, graph.vectors.shape[1]
        X, l0 = graph.vectors[:n], graph.links_layer0[:n]
        r = min(self.params["finger_rank"], d)
        deg = l0[:, 0].astype(np.int64)
        live = np.flatnonzero((deg >= 1) & ~graph.deleted[:n])
        if live.size == 0:
            return
        nodes = live if live.size <= _FINGER_SAMPLES else np.sort(rng.choice(live, _FINGER_SAMPLES, replace=False))
        slots = (rng.random(nodes.size) * deg[nodes]).astype(np.int64)
        S = sample_residuals(X, l0, nodes, slots).astype(np.float64)
        # top-r right singular vectors of S = top-r eigenvectors of S^T S (d x d, cheap)
        w, V_ = np.linalg.eigh(S.T @ S)
        B = np.ascontiguousarray(V_[:, ::-1][:, :r].T, dtype=np.float32)
        P = np.ascontiguousarray(X @ B.T, dtype=np.float32)
        codes = edge_payload(X, l0, P, np.arange(n, dtype=np.int64))
        dm = self._fit_dm(graph, codes, r, rng)
        graph.finger = FingerPayload(basis=B, codes=codes, table=cos_table(r, dm, self._FINGER_SLACK),
                                     distribution=dm)

    @staticmethod
    def _fit_dm(graph, codes, r, rng):
        """(mu, sigma, mu_hat, sigma_hat) of exact vs sign-estimated cosines of residual pairs
        at the same node (two distinct edges), as in the FINGER paper."""
        n = graph.n
        deg = graph.links_layer0[:n, 0].astype(np.int64)
        cand = np.flatnonzero((deg >= 2) & ~graph.deleted[:n])
        if cand.size == 0:
            return None
        nodes = cand if cand.size <= _FINGER_SAMPLES else np.sort(rng.choice(cand, _FINGER_SAMPLES, replace=False))
        a = (rng.random(nodes.size) * deg[nodes]).astype(np.int64)
        b = (rng.random(nodes.size) * (deg[nodes] - 1)).astype(np.int64)
        b = b + (b >= a)
        cos, ham = pair_statistics(graph.vectors, graph.links_layer0, codes, nodes, a, b)
        ok = np.isfinite(cos)
        if ok.sum() < 10:
            return None
        est = np.cos(np.pi * ham[ok] / r)
        return (float(cos[ok].mean()), float(cos[ok].std()), float(est.mean()), float(est.std()))

    @staticmethod
    def _refresh_finger(graph: HNSWGraph, first_new: int, touched) -> None:
        """Payload of the nodes from ``first_new`` on and of every node whose layer-0 row
        changed (basis kept). The rows are computed aside and stored in one last step."""
        n = graph.n
        f = graph.finger
        r = f.rank
        off = 4 * 2 * graph.M
        P = np.empty((n, r), np.float32)
        P[:first_new] = f.payload[:first_new, off:off + r]
        P[first_new:] = graph.vectors[first_new:n] @ f.basis.T
        rows = np.union1d(np.arange(first_new, n, dtype=np.int64), np.flatnonzero(touched[:n]))
        f.codes[rows] = edge_payload(graph.vectors, graph.links_layer0, P, rows.astype(np.int64))

    # ------------------------------------------------------------------ delete
    def _live_count(self):
        g = self._graph
        return g.n - g.n_deleted if g is not None else 0

    def _is_deleted(self, positions):
        g = self._graph
        return g.deleted[g.nodes_of(np.asarray(positions, np.int64))]

    def _delete(self, positions):
        old = self._graph
        nodes = old.nodes_of(np.asarray(positions, np.int64))  # live and distinct (the base checks)
        n, M = old.n, old.M
        graph = dataclasses.replace(old)
        # repair rewrites rows all over the graph: work on copies, published only at the end
        graph.deleted = old.deleted.copy()
        graph.links_layer0 = old.links_layer0.copy()
        graph.links_upper = old.links_upper.copy()
        deleted = graph.deleted
        deleted[nodes] = True
        touched = np.zeros(n, np.bool_)
        view = graph.kernel_graph(self._metric.proxy)
        for level in range(int(graph.levels[nodes].max()), -1, -1):
            repair_deleted(view, deleted[:n], level, 2 * M if level == 0 else M, touched)
        graph.links_layer0[nodes, 0] = 0
        lv = graph.levels[nodes]
        graph.links_upper[np.repeat(graph.upper_start[nodes], lv) + _ranks(lv), 0] = 0  # their rows
        graph.n_deleted = int(np.count_nonzero(deleted[:n]))
        if deleted[graph.entry]:
            live = np.flatnonzero(~deleted[:n])
            if live.size:
                best = live[np.argmax(graph.levels[live])]
                graph.entry, graph.max_level = int(best), int(graph.levels[best])
            else:
                graph.entry, graph.max_level = -1, 0
        if graph.finger is not None:
            # the one write into an array shared with the published state, and the last step
            self._refresh_finger(graph, n, touched)
        self._commit(graph)

    # ------------------------------------------------------------------ search policy hooks
    def _live_mask(self):
        return self._graph.live_positions

    def _scan_is_cheaper(self, n_allowed, k, params):
        # a walk needs ~ef*n/n_allowed visits to fill its beam; scan instead when cheaper
        ef = max(params["ef"], k)
        return n_allowed * n_allowed <= 3 * ef * self._graph.n

    def _vectors_at(self, positions):
        g = self._graph
        return g.vectors[g.nodes_of(np.asarray(positions, np.int64))]

    # ------------------------------------------------------------------ search
    def _take_scratch(self, chunks, n):
        # list.pop / list.append / dict.setdefault are atomic, so concurrent searches (which
        # share the read lock) each take a set of their own; a set too small for the current
        # graph is dropped.
        pool = self._pool.setdefault(chunks, [])
        try:
            visited, tags = pool.pop()
            if visited.shape[1] >= n:
                return pool, visited, tags
        except IndexError:
            pass
        return pool, np.zeros((chunks, n), np.uint16), np.zeros(chunks, np.int64)

    def _search(self, Q, k, mask, ef, finger, rescore):
        g = self._graph
        view = self._view
        nq = Q.shape[0]
        if g.entry < 0:
            return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
        if mask is None:
            mask = self._NO_MASK
        elif g.node_positions is not None:
            mask = mask[g.node_positions]  # positions -> node numbers
        if view.sq8 is not None:
            return self._search_sq8(Q, k, mask, max(ef, k), rescore)
        if nq == 1:  # the one-query kernel (see _search_one), on the prepared query
            plan = self._raw_plan
            if plan[0] is not view:
                table = one_query_table(*view.one_parts, _NO_IDS, RAW_TERMS, view.projected_descent)
                plan = self._raw_plan = (view, table, table.words)
            out_d = np.empty((1, k), _F32)
            out_i = np.empty((1, k), _I64)
            pool = view.one_pool
            scratch = self._one_scratch(view)
            try:
                search_one(Q[0], plan[2], k, ef, finger if view.has_finger else None, mask, scratch, out_d[0],
                           out_i[0])
            finally:
                pool.append(scratch)
            return out_d, out_i
        params = (max(ef, k), k, mask, view.deleted, bool(finger and view.has_finger), view.projected_descent)
        chunks = min(numba.get_num_threads(), nq)
        out_d = np.empty((nq, k), np.float32)
        out_i = np.empty((nq, k), np.int64)
        counts = np.empty((nq, 2), np.int64)
        pool, visited, tags = self._take_scratch(chunks, g.n)
        try:
            # without FINGER the kernels take None and are compiled without the FINGER walk
            search_queries(Q, view.graph, view.finger if view.has_finger else None, params, visited, tags,
                           (out_d, out_i, counts))
        finally:
            pool.append((visited, tags))
        self._count_batch(counts)
        if g.positions_padded is not None:
            out_i = g.positions_padded[out_i]
        return out_d, out_i

    def _count_batch(self, counts: np.ndarray) -> None:
        """Add a batch walk's per-query counters (int64 (nq, 2): exact evaluations, estimates)
        to :meth:`search_stats`'s totals."""
        tot = counts.sum(axis=0)
        with self._stats_lock:
            self._stats[0] += counts.shape[0]
            self._stats[1] += int(tot[0])
            self._stats[2] += int(tot[1])

    def _search_sq8(self, Q, k, mask, ef, rescore):
        """The walk on codes (``walk="sq8"``), every query on the batch kernel."""
        g = self._graph
        view = self._view
        nq = Q.shape[0]
        n_exact = min(ef, max(k, math.ceil(rescore * k)))
        params = (ef, k, n_exact, mask, view.deleted)
        chunks = min(numba.get_num_threads(), nq)
        out_d = np.empty((nq, k), np.float32)
        out_i = np.empty((nq, k), np.int64)
        counts = np.empty((nq, 2), np.int64)
        pool, visited, tags = self._take_scratch(chunks, g.n)
        try:
            sq8_search_queries(Q, view.graph, view.sq8, params, visited, tags, (out_d, out_i, counts))
        finally:
            pool.append((visited, tags))
        self._count_batch(counts)
        if g.positions_padded is not None:
            out_i = g.positions_padded[out_i]
        return out_d, out_i

    @staticmethod
    def _one_scratch(view: _SearchView) -> np.ndarray:
        # a scratch of the view's pool (put back by the caller), or a new one; list.pop and
        # list.append are atomic, so concurrent searches each take their own
        try:
            return view.one_pool.pop()
        except IndexError:
            scratch = new_one_query_scratch(view.n_nodes)
            view.counted.append(scratch)
            return scratch

    def _one_query_plan(self, view: _SearchView) -> tuple:
        """``(view, ids, table, words)`` of the one-query kernel of ``view``'s walk (float or
        codes), made again after every change."""
        kgraph, kfinger, deleted, positions = view.one_parts
        if view.sq8 is None:
            table = one_query_table(kgraph, kfinger, deleted, positions, self._ids_array(),
                                    self._one_query_terms(), view.projected_descent)
        else:
            table = sq8_one_query_table(kgraph, view.sq8_arrays, deleted, positions, self._ids_array(),
                                        self._one_query_terms())
        return view, self._ids, table, table.words

    def _search_one(self, q, k, params, threads):
        # one query per call: every line here is paid per call (ann-benchmarks' default mode)
        view = self._view
        plan = self._one_plan
        if plan[0] is not view or plan[1] is not self._ids:
            plan = self._one_plan = self._one_query_plan(view)
        if type(k) is not int or not 0 < k <= view.n_live:
            return None
        if view.n_live < view.n_nodes and self._scan_is_cheaper(view.n_live, k, params):
            return None  # many deletions: the ordinary path scans the live vectors
        pool = view.one_pool
        try:
            scratch = pool.pop()
        except IndexError:
            scratch = self._one_scratch(view)
        out_d = np.empty(k, _F32)
        out_i = np.empty(k, _I64)
        ef = params["ef"]
        try:
            if view.sq8 is None:
                status = search_one(q, plan[3], k, ef, params["finger"] if view.has_finger else None,
                                    self._NO_MASK, scratch, out_d, out_i)
            else:  # the walk on codes re-scores its best min(ef, ceil(rescore * k)) (at least k)
                n_exact = min(max(ef, k), max(k, math.ceil(params["rescore"] * k)))
                status = sq8_search_one(q, plan[3], k, ef, n_exact, self._NO_MASK, scratch, out_d, out_i)
        finally:
            pool.append(scratch)
        return None if status else (out_i, out_d)

    def memory_bytes(self) -> int:
        """Bytes held by the index's arrays (vectors, graph, FINGER payload or codes, ids); with
        ``walk="sq8"`` also the per-node norms derived from the codes (4 bytes per vector)."""
        total = super().memory_bytes()
        g = self._graph
        return total + (0 if g.sq8 is None else int(g.sq8.norms[:g.n].nbytes))

    def search_stats(self) -> dict[str, float]:
        """Distance work of the searches since build (or :meth:`reset_search_stats`).

        Returns
        -------
        dict
            ``queries``; ``exact_per_query``: exact distance evaluations per query (all layers);
            ``estimated_per_query``: FINGER estimates per query (0 without FINGER). With
            ``walk="sq8"`` the exact evaluations are the re-scored candidates and the
            evaluations on codes count as estimates. Searches answered by an exact scan (very
            selective filters) are not counted.
        """
        with self._rw.read(), self._stats_lock:
            q, ex, est = self._stats
            for scratch in list(self._view.counted) if self._view is not None else ():
                c = scratch_counts(scratch)
                q, ex, est = q + int(c[0]), ex + int(c[1]), est + int(c[2])
        return {"queries": q, "exact_per_query": ex / q if q else 0.0,
                "estimated_per_query": est / q if q else 0.0}

    def reset_search_stats(self) -> None:
        """Zero the counters of :meth:`search_stats` (after the searches in flight finish)."""
        with self._rw.write(), self._stats_lock:
            self._stats = [0, 0, 0]
            for scratch in self._view.counted if self._view is not None else ():
                scratch_counts(scratch)[:] = 0

    # ------------------------------------------------------------------ persistence
    def _state(self):
        return self._graph.to_file()

    def _restore(self, meta, arrays):
        graph = HNSWGraph.from_file(meta, arrays, self.params["M"], self.params["random_state"],
                                    self._n_positions)
        graph.validate(self._dim, self._n_positions, self._metric.max_abs(self._dim))
        self._check_walk_state(graph)
        if graph.sq8 is not None:
            graph.sq8.encode_norms(graph.n)
        self._commit(graph)


    def _check_walk_state(self, graph: HNSWGraph) -> None:
        """Refuse a loaded graph whose codes contradict its parameters: ``walk="sq8"`` needs
        them, ``"float"`` (or ``"auto"`` with ``finger=True``) has none, and no graph carries
        both codes and a FINGER payload. ``"auto"`` otherwise may resolve either way."""
        walk, has = self.params["walk"], graph.sq8 is not None
        if walk == "sq8":
            require(has, "sq8_codes", "missing (the index was built with walk='sq8')")
        elif not self._prefers_codes():
            require(not has, "sq8_codes", f"present although walk={walk!r} with finger={self.params['finger']!r} "
                                          "builds the float walk")
        require(not (has and graph.finger is not None), "sq8_codes",
                "present together with a FINGER payload (the walk on codes has no FINGER variant)")


_NO_POSITIONS = np.zeros(0, np.int64)
_NO_IDS = _NO_POSITIONS  # results by position


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each count c, concatenated (vectorised ``concatenate(arange(c) for c)``)."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - starts
