"""Partitioned quantization index: k-means leaves, SOAR spilling, anisotropic 4-bit PQ, re-ranking.

The ScaNN recipe (docs/partitioned.md): a query scores the leaf centres, probes the best
``leaves`` of them, scores every member of those leaves from 4-bit product-quantization codes of
its residual (``x - centre``) with 8-bit lookup tables, keeps the best ``reorder`` distinct
candidates, and re-scores them exactly with the stored float32 vectors.

All metrics are scored as inner products: ``-<q, x> = -<q, c> - <q, r>`` with the centre term
computed once per probed leaf; squared L2 adds the per-entry term ``||c + r~||^2 / 2`` of the
vector as its codes reconstruct it, so the score is ``(||q - x~||^2 - ||q||^2) / 2``: it ranks like
the distance to the reconstruction, with an error that grows with ``||q - x||`` rather than with
``||x||`` (the exact ``||x||^2`` would not, for data far from the origin). Points are assigned to
leaves by squared L2, queries rank leaves by the search metric (ScaNN's asymmetry).

Everything the index holds lives in one :class:`PartitionedState`, which checks its own
invariants (:meth:`PartitionedState.validate`) when a file is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .. import _validation as V
from .._progress import progress_reporter
from .._state import (
    bad_field, check_array, check_finite, check_nondecreasing, check_range, require, take_array, take_meta,
)
from ..api import Index, _ClassOrInstanceMethod
from ..config import get_num_threads
from ..kernels import fastscan, rerank_int8
from ..kernels.avq import avq_refit
from ..kernels.cluster import assign_nearest, kmeans
from ..kernels.distances import sqnorms
from ..kernels.query import RAW_TERMS
from ..kernels.quantization import (
    CODEWORDS, build_luts, encode_anisotropic, encode_nearest, int8_encode, int8_fit, pack_codes,
    pad_columns, pad_dim, parallel_cost_multiplier, train_codebooks, unpack_codes, unpack_decode,
)
from ..kernels.soar import soar_assign
from ..kernels.threads import run_split
from ..kernels.topk import merge_topk
from ..metrics import PROXY_L2SQ

__all__ = ["Partitioned", "PartitionedState"]

_F32 = np.dtype(np.float32)  # dtype objects: np.empty takes them without a lookup
_I64 = np.dtype(np.int64)

SPILL_MODES = ("soar", "nearest", "none")
QUANTIZERS = ("pq4", "int8")
RERANK_MODES = ("float32", "int8")
ENCODE_CHUNK = 65536  # entries encoded per step (bounds the residual buffer)
ENCODE_MIN_SPLIT = 4096  # fewest entries a worker thread of the encoding gets
PQ_SAMPLE = 65536  # residuals used to train the PQ codebooks
PQ_ITERS = 12
ANISO_ROUNDS = 10
EXACT_FILTER_FACTOR = 4  # filters allowing <= factor * reorder points are searched exactly
QUERY_CHUNK = 4096  # queries per pass (bounds the query x centre score matrix)
FEW_QUERIES = 4  # up to this many queries run the fused one-call kernel (no BLAS, no numpy steps)
SPLIT_QUERIES = 32  # fewest queries a worker thread of a batch search gets
# A point whose quantization error exceeds OUTLIER_FACTOR times the OUTLIER_QUANTILE of the build's
# errors is one the codes cannot represent (typically a point added far outside the build's
# distribution): its approximate score would be meaningless, so it gets a leaf of its own.
OUTLIER_FACTOR = 4.0
OUTLIER_QUANTILE = 0.99
MAX_POSITIONS = np.iinfo(np.int32).max  # entries address vectors with int32 positions
_POINT_TERM_MAX = float(np.finfo(np.float32).max) / 8
_NO_MASK = np.zeros(0, dtype=np.bool_)
_NO_IDS = np.zeros(0, dtype=np.int64)  # the one-query kernel's results by position
_EMPTY_F32 = np.zeros(0, dtype=np.float32)


# ===================================================================================== state
@dataclass
class PartitionedState:
    """The whole state of a built :class:`Partitioned` index.

    Every vector is stored once at full precision (``vectors``) and as one or more *entries*: a
    primary copy in the leaf of its nearest centre and, with spilling, copies in other leaves.
    Entries are grouped by leaf in blocks of 32 (the scan's unit), each leaf padded to whole blocks
    with entries of position -1. A vector whose residual the codes cannot represent has no entry
    and is listed in ``exact_positions`` instead (compared exactly with every query).

    Attributes
    ----------
    centres : float32 (L, d)
        Leaf centres.
    leaf_block_offsets : int64 (L + 1,)
        First block of each leaf; starts at 0, never decreases, ends at the number of blocks.
    entry_positions : int32 (blocks * 32,)
        Vector position of each entry, -1 for padding.
    codes : uint8 (blocks, M/2, 32) or int8 (blocks * 32, d)
        Packed 4-bit PQ codes of each entry's residual (quantizer "pq4"), or int8 codes.
    vectors : float32 (n, d)
        Re-ranking vectors (metric-prepared), one row per position.
    exact_positions : int32 (n_exact,)
        Positions without entries, strictly increasing.
    point_terms : float32 (blocks * 32,) or (0,)
        For squared L2, ``||c + r~||^2 / 2`` of each entry: the squared norm of the vector as
        its codes reconstruct it (0 for padding); empty for the inner-product metrics. With it
        an approximate score is ``(||q - x~||^2 - ||q||^2) / 2``, whose error grows with the
        distance from ``q`` to ``x``, not with ``||x||`` (the exact ``||x||^2`` would add
        ``<x~, x - x~>``, large for vectors far from the origin).
    codebooks : float32 (M, 16, w) or None
        PQ codewords per sub-space ("pq4"); ``M * w == padded_dim``.
    int8_multipliers : float32 (d,) or None
        Per-dimension int8 scales ("int8").
    rerank_int8_codes : int8 (n, d) or None
        With ``rerank="int8"``: the re-ranking vectors as int8, ``x ~= scale * codes``
        (:func:`annlib.kernels.rerank_int8.int8_rows`); None with float32 re-ranking.
    rerank_int8_scales : float32 (n,) or None
        Per-row scale of ``rerank_int8_codes`` (positive, finite).
    rerank_int8_half_sqnorms : float32 (n,) or (0,) or None
        For squared L2, ``||scale * codes||^2 / 2`` of each row; empty for the inner products.
    padded_dim : int
        Dimension after zero-padding to whole pairs of sub-spaces.
    anisotropic_scale_threshold : float or None
        Absolute anisotropic threshold used to encode (None: plain PQ).
    outlier_error_limit : float
        Quantization error above which an added vector gets a leaf of its own.

    The remaining attributes are derived by :meth:`derive` (never saved): ``centre_sqnorms``
    (squared L2 only), ``negated_centres`` (``-centres``, for the batch search's leaf scores)
    and the kernels' views ``packed``
    (:class:`~annlib.kernels.fastscan.PackedLeaves`), ``pq_arrays`` and ``rerank_rows``
    (:class:`~annlib.kernels.rerank_int8.Int8Rows` of the three ``rerank_int8_*`` fields, or None).
    """

    centres: np.ndarray
    leaf_block_offsets: np.ndarray
    entry_positions: np.ndarray
    codes: np.ndarray
    vectors: np.ndarray
    exact_positions: np.ndarray
    point_terms: np.ndarray
    codebooks: np.ndarray | None
    int8_multipliers: np.ndarray | None
    padded_dim: int
    anisotropic_scale_threshold: float | None
    outlier_error_limit: float
    rerank_int8_codes: np.ndarray | None = None
    rerank_int8_scales: np.ndarray | None = None
    rerank_int8_half_sqnorms: np.ndarray | None = None
    centre_sqnorms: np.ndarray | None = field(default=None, repr=False, compare=False)
    negated_centres: np.ndarray | None = field(default=None, repr=False, compare=False)
    packed: Any = field(default=None, repr=False, compare=False)
    pq_arrays: Any = field(default=None, repr=False, compare=False)
    rerank_rows: Any = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ shape
    @property
    def quantizer(self) -> str:
        """"pq4" or "int8"."""
        return "pq4" if self.codebooks is not None else "int8"

    @property
    def num_leaves(self) -> int:
        return int(self.centres.shape[0])

    @property
    def num_blocks(self) -> int:
        return int(self.leaf_block_offsets[-1])

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    # ------------------------------------------------------------------ derived arrays
    def derive(self, l2: bool) -> "PartitionedState":
        """Compute the derived arrays and kernel views (after :meth:`validate` for loaded files)."""
        if l2:
            self.centre_sqnorms = np.ascontiguousarray(np.einsum("ij,ij->i", self.centres, self.centres),
                                                       dtype=np.float32)
        else:
            self.centre_sqnorms = _EMPTY_F32
        self.negated_centres = np.ascontiguousarray(-self.centres, dtype=np.float32)
        self.packed = fastscan.PackedLeaves(self.leaf_block_offsets, self.codes, self.entry_positions,
                                            self.point_terms,
                                            fastscan.block_min(self.point_terms, self.entry_positions))
        self.pq_arrays = None
        if self.codebooks is not None:
            self.pq_arrays = fastscan.PQIndexArrays.of(self.centres, self.centre_sqnorms, self.codebooks,
                                                       self.packed, self.vectors)
        self.rerank_rows = None
        if self.rerank_int8_codes is not None:
            self.rerank_rows = rerank_int8.Int8Rows(self.rerank_int8_codes, self.rerank_int8_scales,
                                                    self.rerank_int8_half_sqnorms)
        return self

    def nbytes(self) -> int:
        """Bytes of every array held, derived ones included."""
        arrays = [self.centres, self.leaf_block_offsets, self.entry_positions, self.codes, self.vectors,
                  self.exact_positions, self.point_terms]
        arrays += [a for a in (self.codebooks, self.int8_multipliers, self.centre_sqnorms, self.negated_centres,
                               self.rerank_int8_codes,
                               self.rerank_int8_scales, self.rerank_int8_half_sqnorms) if a is not None]
        if self.packed is not None:
            arrays.append(self.packed.point_term_block_min)
        return int(sum(a.nbytes for a in arrays))

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The stored entries without padding.

        Returns
        -------
        (leaf int64 (E,), position int64 (E,), codes uint8 (E, M) or int8 (E, d), point terms
        float32 (E,) or (0,))
        """
        B = fastscan.POINT_BLOCK
        blocks = np.diff(self.leaf_block_offsets)
        leaf = np.repeat(np.arange(len(blocks), dtype=np.int64), blocks * B)
        pos = np.asarray(self.entry_positions)
        ok = pos >= 0
        codes = unpack_codes(np.asarray(self.codes)) if self.codebooks is not None else np.asarray(self.codes)
        terms = np.asarray(self.point_terms)[ok] if self.point_terms.shape[0] else _EMPTY_F32
        return leaf[ok], pos[ok].astype(np.int64), codes[ok], terms

    # ------------------------------------------------------------------ files
    def to_file(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, arrays) for the index file; derived arrays are not stored."""
        meta = {
            "num_leaves": self.num_leaves, "num_blocks": self.num_blocks,
            "num_exact": int(self.exact_positions.shape[0]), "padded_dim": int(self.padded_dim),
            "anisotropic_scale_threshold": self.anisotropic_scale_threshold,
            "outlier_error_limit": float(self.outlier_error_limit),
        }
        arrays = {
            "centres": self.centres, "leaf_block_offsets": self.leaf_block_offsets,
            "entry_positions": self.entry_positions, "codes": self.codes, "vectors": self.vectors,
            "exact_positions": self.exact_positions, "point_terms": self.point_terms,
        }
        if self.codebooks is not None:
            arrays["codebooks"] = self.codebooks
        else:
            arrays["int8_multipliers"] = self.int8_multipliers
        if self.rerank_int8_codes is not None:
            # only an index built with rerank="int8" writes them: a float32 index's file is
            # unchanged, and files written before the option load as float32 indexes
            arrays["rerank_int8_codes"] = self.rerank_int8_codes
            arrays["rerank_int8_scales"] = self.rerank_int8_scales
            arrays["rerank_int8_half_sqnorms"] = self.rerank_int8_half_sqnorms
        return meta, arrays

    @classmethod
    def from_file(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], quantizer: str,
                  rerank: str = "float32") -> "PartitionedState":
        """Read the fields back (types and the counts in ``meta`` checked; call :meth:`validate`).

        ``quantizer`` and ``rerank`` are the index's build parameters: they say which fields
        the file must hold (the ``rerank_int8_*`` arrays only for ``rerank="int8"``).

        Raises
        ------
        IndexFormatError
            A missing field, a wrong dtype or number of dimensions, or a count in the metadata
            that differs from its array's length.
        """
        centres = take_array(arrays, "centres", np.float32, 2)
        offsets = take_array(arrays, "leaf_block_offsets", np.int64, 1)
        positions = take_array(arrays, "entry_positions", np.int32, 1)
        vectors = take_array(arrays, "vectors", np.float32, 2)
        exact = take_array(arrays, "exact_positions", np.int32, 1)
        terms = take_array(arrays, "point_terms", np.float32, 1)
        if quantizer == "pq4":
            codes = take_array(arrays, "codes", np.uint8, 3)
            codebooks, mults = take_array(arrays, "codebooks", np.float32, 3), None
        else:
            codes = take_array(arrays, "codes", np.int8, 2)
            codebooks, mults = None, take_array(arrays, "int8_multipliers", np.float32, 1)
        codes8 = scales8 = half8 = None
        if rerank == "int8":
            codes8 = take_array(arrays, "rerank_int8_codes", np.int8, 2)
            scales8 = take_array(arrays, "rerank_int8_scales", np.float32, 1)
            half8 = take_array(arrays, "rerank_int8_half_sqnorms", np.float32, 1)
        # Each count is stated by the metadata and implied by several arrays; the one that
        # disagrees with the others is the field named.
        require(offsets.shape[0] >= 1, "leaf_block_offsets", "is empty")
        B = fastscan.POINT_BLOCK
        _check_counts("leaves", {"num_leaves": take_meta(meta, "num_leaves"), "centres": centres.shape[0],
                                 "leaf_block_offsets": offsets.shape[0] - 1})
        _check_counts("blocks of 32 entries", {
            "num_blocks": take_meta(meta, "num_blocks"), "leaf_block_offsets": int(offsets[-1]),
            "codes": codes.shape[0] if quantizer == "pq4" else codes.shape[0] / B,
            "entry_positions": positions.shape[0] / B})
        num_exact = take_meta(meta, "num_exact")
        require(num_exact == exact.shape[0], "num_exact",
                f"is {num_exact} but 'exact_positions' has {exact.shape[0]} entries")
        threshold = take_meta(meta, "anisotropic_scale_threshold", float, optional=True)
        return cls(
            centres=centres, leaf_block_offsets=offsets, entry_positions=positions, codes=codes,
            vectors=vectors, exact_positions=exact, point_terms=terms, codebooks=codebooks,
            int8_multipliers=mults,
            padded_dim=take_meta(meta, "padded_dim"), anisotropic_scale_threshold=threshold,
            outlier_error_limit=take_meta(meta, "outlier_error_limit", float),
            rerank_int8_codes=codes8, rerank_int8_scales=scales8, rerank_int8_half_sqnorms=half8,
        )

    def validate(self, dim: int, n_positions: int, *, l2: bool, max_abs: float = math.inf,
                 dims_per_block: int | None = None) -> None:
        """Check every invariant the kernels rely on; a file that passes cannot make them read out
        of bounds or return garbage.

        Parameters
        ----------
        dim : int
            The index's dimension.
        n_positions : int
            The index's number of positions (rows of ``vectors``).
        l2 : bool
            Whether the metric is squared L2 (which needs ``point_terms``).
        max_abs : float, default inf
            Largest entry magnitude of vectors and centres for the metric (float32-safe scores).
        dims_per_block : int, optional
            The build parameter the codebooks must match.

        Raises
        ------
        IndexFormatError
            Naming the first field that breaks an invariant.
        """
        B = fastscan.POINT_BLOCK
        L = self.num_leaves
        require(L >= 1, "centres", "an index has at least one leaf")
        check_array(self.centres, "centres", np.float32, (L, dim))
        check_finite(self.centres, "centres")
        check_range(self.centres, "centres", -max_abs, max_abs)
        check_array(self.leaf_block_offsets, "leaf_block_offsets", np.int64, (L + 1,))
        require(int(self.leaf_block_offsets[0]) == 0, "leaf_block_offsets", "must start at 0")
        check_nondecreasing(self.leaf_block_offsets, "leaf_block_offsets")
        nb = int(self.leaf_block_offsets[-1])
        require(n_positions >= 1, "vectors", "a built index holds at least one vector")
        check_array(self.vectors, "vectors", np.float32, (n_positions, dim))
        check_finite(self.vectors, "vectors")
        check_range(self.vectors, "vectors", -max_abs, max_abs)
        if self.codebooks is not None:
            cb = self.codebooks
            M, _, w = cb.shape
            check_array(cb, "codebooks", np.float32, (None, CODEWORDS, None))
            require(M >= 2 and M % 2 == 0 and w >= 1, "codebooks",
                    f"expected an even number of sub-spaces of width >= 1; got shape {cb.shape}")
            require(dims_per_block is None or w == dims_per_block, "codebooks",
                    f"sub-spaces of width {w} but dims_per_block is {dims_per_block}")
            require(self.padded_dim == M * w == pad_dim(dim, w), "padded_dim",
                    f"is {self.padded_dim}; codebooks of shape {cb.shape} for dimension {dim} need {pad_dim(dim, w)}")
            check_finite(cb, "codebooks")
            check_array(self.codes, "codes", np.uint8, (nb, M // 2, B))
        else:
            check_array(self.int8_multipliers, "int8_multipliers", np.float32, (dim,))
            check_finite(self.int8_multipliers, "int8_multipliers")
            require(bool((self.int8_multipliers > 0).all()), "int8_multipliers", "must be positive")
            require(self.padded_dim == dim, "padded_dim", f"is {self.padded_dim}; int8 codes need {dim}")
            check_array(self.codes, "codes", np.int8, (nb * B, dim))
        check_array(self.entry_positions, "entry_positions", np.int32, (nb * B,))
        check_range(self.entry_positions, "entry_positions", -1, n_positions - 1)
        check_array(self.point_terms, "point_terms", np.float32, (nb * B if l2 else 0,))
        check_finite(self.point_terms, "point_terms")
        check_range(self.exact_positions, "exact_positions", 0, n_positions - 1)
        require(bool((np.diff(self.exact_positions) > 0).all()), "exact_positions", "must be strictly increasing")
        held = np.bincount(np.asarray(self.entry_positions)[self.entry_positions >= 0], minlength=n_positions)
        held[self.exact_positions] += 1
        if not held.all():
            missing = int(np.flatnonzero(held == 0)[0])
            raise bad_field("entry_positions", f"vector {missing} is in no leaf and not in 'exact_positions'")
        if self.exact_positions.size:
            both = np.asarray(self.entry_positions)[self.entry_positions >= 0]
            if np.isin(self.exact_positions, both).any():
                raise bad_field("exact_positions", "lists a vector that also has leaf entries")
        t = self.anisotropic_scale_threshold
        require(t is None or (math.isfinite(t) and t >= 0), "anisotropic_scale_threshold",
                f"must be None or a finite number >= 0; got {t}")
        e = self.outlier_error_limit
        require(math.isfinite(e) and e >= 0, "outlier_error_limit", f"must be a finite number >= 0; got {e}")
        if self.rerank_int8_codes is not None:
            check_array(self.rerank_int8_codes, "rerank_int8_codes", np.int8, (n_positions, dim))
            check_array(self.rerank_int8_scales, "rerank_int8_scales", np.float32, (n_positions,))
            check_finite(self.rerank_int8_scales, "rerank_int8_scales")
            require(bool((self.rerank_int8_scales > 0).all()), "rerank_int8_scales", "must be positive")
            check_range(self.rerank_int8_scales, "rerank_int8_scales", 0, max_abs)
            check_array(self.rerank_int8_half_sqnorms, "rerank_int8_half_sqnorms", np.float32,
                        (n_positions if l2 else 0,))
            check_finite(self.rerank_int8_half_sqnorms, "rerank_int8_half_sqnorms")
            check_range(self.rerank_int8_half_sqnorms, "rerank_int8_half_sqnorms", 0, math.inf)


# ===================================================================================== encoding
class _Placed(NamedTuple):
    """Entries made for a batch of vectors (before the leaf-by-leaf layout)."""

    centres: np.ndarray  # all centres, grown by the leaves made for outliers
    leaf: np.ndarray  # int64 (E,)
    position: np.ndarray  # int64 (E,)
    codes: np.ndarray  # uint8 (E, M) or int8 (E, d)
    half_sqnorms: np.ndarray  # float32 (E,): ||c + r~||^2 / 2
    exact_positions: np.ndarray  # int64: vectors without entries
    limit: float  # the outlier error limit


@dataclass(frozen=True)
class _Coder:
    """How residuals become codes: the trained quantizer of one index."""

    codebooks: np.ndarray | None
    int8_multipliers: np.ndarray | None
    padded_dim: int
    anisotropic_scale_threshold: float | None

    @classmethod
    def of(cls, st: PartitionedState) -> "_Coder":
        return cls(st.codebooks, st.int8_multipliers, st.padded_dim, st.anisotropic_scale_threshold)

    @property
    def code_width(self) -> int:
        return self.codebooks.shape[0] if self.codebooks is not None else self.padded_dim

    def encode(self, X, C, leaf, rows, report=None, threads=1):
        """Codes of the entries ``(leaf, rows)`` (rows index ``X``, leaves index ``C``).

        ``threads`` worker threads each code a contiguous range of the entries with the serial
        kernels (the codes do not depend on it; ``report`` is then called once, at the end).

        Returns
        -------
        (codes uint8 (E, M) or int8 (E, d), errors float32 (E,), half_sqnorms float32 (E,))
            The codes, each entry's quantization error ``||r - r~||`` and ``||c + r~||^2 / 2``
            (the point term of squared L2 for the reconstructed vector).
        """
        E = leaf.shape[0]
        dtype = np.uint8 if self.codebooks is not None else np.int8
        codes = np.empty((E, self.code_width), dtype=dtype)
        errors = np.empty(E, dtype=np.float32)
        half = np.empty(E, dtype=np.float32)
        parts = run_split(lambda lo, hi: self._encode_range(X, C, leaf, rows, codes, errors, half, lo, hi,
                                                            report if hi - lo == E else None),
                          E, threads, ENCODE_MIN_SPLIT)
        if len(parts) > 1 and report is not None:
            report(E, E)
        return codes, errors, half

    def _encode_range(self, X, C, leaf, rows, codes, errors, half, lo, hi, report):
        d = X.shape[1]
        for s in range(lo, hi, ENCODE_CHUNK):
            e = min(hi, s + ENCODE_CHUNK)
            lf, rw = leaf[s:e], rows[s:e]
            Cs = C[lf]
            R = X[rw] - Cs
            part = slice(s, e)
            if self.codebooks is None:
                codes[part] = int8_encode(R, self.int8_multipliers)
                decoded = codes[part].astype(np.float32) / self.int8_multipliers[None, :]
            else:
                R = pad_columns(R, self.padded_dim)
                if self.anisotropic_scale_threshold is None:
                    codes[part] = encode_nearest(R, self.codebooks)
                else:
                    Xo = X[rw]
                    nrm = np.einsum("ij,ij->i", Xo, Xo, dtype=np.float64)
                    eta = parallel_cost_multiplier(self.anisotropic_scale_threshold, nrm, d)
                    U = pad_columns((Xo / np.maximum(np.sqrt(nrm), 1e-30)[:, None]).astype(np.float32),
                                    self.padded_dim)
                    codes[part] = encode_anisotropic(R, U, self.codebooks, eta, ANISO_ROUNDS)
                decoded = unpack_decode(codes[part], self.codebooks)
            err = R - decoded
            errors[part] = np.sqrt(np.einsum("ij,ij->i", err, err, dtype=np.float64))
            recon = Cs.astype(np.float64) + decoded[:, :d]
            # bounded so a score never overflows (reconstructions stay near the vectors, whose
            # entries are within the float32-safe range)
            half[part] = np.minimum(0.5 * np.einsum("ij,ij->i", recon, recon), _POINT_TERM_MAX)
            if report is not None:
                report(e, hi)


# ===================================================================================== the index
class Partitioned(Index):
    """Partitioned quantization index (k-means leaves + SOAR + anisotropic 4-bit PQ + re-ranking).

    Parameters
    ----------
    metric : {"l2", "cosine", "ip"}, default "l2"
    num_leaves : int or None, default None
        k-means leaves; None means ``round(2 sqrt(n))`` (ScaNN's choice: on glove-50-angular-200k
        it reads 25 % fewer points than ``sqrt(n)`` leaves at the same recall). More leaves:
        smaller leaves, cheaper probes, more centre scoring per query and a longer build. Must be
        ``<= n``. The built index may hold a few more (see Notes).
    spill : {"soar", "nearest", "none"}, default "soar"
        Extra leaf assignments per point: SOAR's orthogonality-amplified choice, the plain
        next-nearest centres, or none. Spilling grows the codes (not the float vectors) and lets
        a query reach the same recall with fewer leaves.
    soar_lambda : float, default 1.0
        SOAR's lambda >= 0 (weight of the residual-parallel term). With the default
        ``soar_exclude_primary=False``, 0 spills nothing.
    spills : int, default 1
        Spilled copies per point at most (1-4).
    soar_exclude_primary : bool, default False
        True: the primary leaf never competes, so every point gets ``spills`` copies (with
        ``soar_lambda=0`` exactly the next-nearest centres). False: ScaNN's rule, a point spills
        only to leaves whose loss beats its primary's.
    quantizer : {"pq4", "int8"}, default "pq4"
        How residuals are scored before re-ranking: 4-bit product quantization with 8-bit
        lookup tables (``dims_per_block`` dimensions per 4-bit code, i.e. ``d / (2 w)`` bytes per
        point), or symmetric int8 per dimension (``d`` bytes per point, more accurate, slower).
    dims_per_block : int, default 2
        Dimensions per PQ sub-space (1-8). 2 is ScaNN's choice; 4 halves codes and scan time at
        some loss of accuracy (more re-ranking needed).
    rerank : {"float32", "int8"}, default "float32"
        How the ``reorder`` candidates are re-scored. "float32": exactly, from the float32
        vectors. "int8": first from an int8 copy of the vectors (one scale per row, ``d + 4``
        more bytes per vector, ``+ 4`` for "l2"), then the best ``k + 8`` exactly from the
        float32 vectors, so returned distances are still exact and ordered by exact distance
        (docs/benchmarks-partitioned.md, round 4, for where it is faster).
    anisotropic_threshold : float, "auto" or None, default "auto"
        Score-aware (anisotropic) PQ encoding threshold T, relative to the median vector norm
        (so it is absolute for cosine). "auto" means 0.2 for "cosine"/"ip" and plain PQ for "l2";
        None means plain PQ. Ignored by the int8 quantizer.
    avq : float or None, default None
        Anisotropic re-fit of the leaf centres (ScaNN's tree AVQ): after k-means, each centre is
        re-fitted to minimise the score-aware loss ``eta ||e_par||^2 + ||e_perp||^2`` of its
        primary members (weighted by ``||x||^(eta - 1)``), then all centres are scaled by one
        least-squares factor; spilling and the codes use the re-fitted centres. A finite
        ``eta > 0`` (1 gives the member means; ScaNN's released configs use 1.6-2.5); None is
        off. Only for "cosine" and "ip": the loss is defined for inner-product scores, and
        squared L2 has no preferred direction (ValueError for "l2").
    spherical : bool or None, default None
        Unit-norm centres (spherical k-means); None means True for "cosine".
    training_sample : int, default 100000
        Points used to train the k-means centres (at least ``num_leaves``).
    kmeans_iters : int, default 10
        Lloyd rounds.
    random_state : int, Generator or None, default 0
        Seed of every random choice; one seed gives identical centres and codes at any thread
        count (a Generator or None is turned into one int seed, kept with the index).
    default_recall : float in (0, 1] or None, default 0.92
        At the end of ``build`` the index tunes its own default search parameters for this
        recall@10 on 300 indexed vectors searched leave-one-out (``annlib.tune``; see
        ``index.tuning``), so ``search(Q, k)`` without parameters is useful on any data: 0.92
        keeps recall >= 0.90 when queries come from a somewhat different source than the
        indexed vectors (docs/tuning.md). None keeps the fixed defaults below. Costs a few exact
        and sample searches (well under the build time).

    Search parameters
    -----------------
    leaves : int or None, default None
        Leaves probed per query (values above the leaf count probe every leaf); None means
        ``ceil(L / 20)`` of the ``L`` leaves. The main recall/speed knob. It is a minimum: when
        the probed leaves hold fewer than ``k`` vectors allowed by the filter, more leaves are
        probed (doubling) until the row is full, so a row is padded with -1 only when fewer than
        ``k`` vectors are allowed at all.
    reorder : int, default 100
        Distinct candidates re-scored exactly; a value below ``k`` is raised to ``k`` (the
        answer is the best ``k`` of the re-scored candidates). More: higher recall, slower.
        With every leaf probed and ``reorder >= len(index)`` the search is exact.

    Notes
    -----
    Supports ``add`` (new points are assigned and spilled with the existing centres and
    codebooks; the packed layout is rebuilt, O(n)), ``filter=`` (a filter allowing at most
    ``4 * reorder`` points is answered by an exact scan), ids, save/load with mmap; not
    ``delete``. Memory per point: ``d / (2 w)`` code bytes per stored copy (plus 4 bytes for its
    position and, for "l2", 4 for its norm term), and ``4 d`` bytes for the re-ranking vectors
    (plus ``d + 4``, ``+ 4`` for "l2", for their int8 copy with ``rerank="int8"``).

    Points the trained codes cannot represent (quantization error above 4 times the 99th
    percentile of the build's, e.g. points added far outside the build's distribution) are not
    scored with meaningless codes: they are clustered into leaves of their own (so the built
    index may hold more leaves than ``num_leaves``), and the few whose error stays too large are
    compared exactly with every query. ``stats()`` reports both counts; when they grow large,
    rebuilding retrains the quantizer on the new distribution.

    Concurrency: searches run in parallel with each other; ``add`` waits for the searches in
    flight and builds its new state aside, so a search sees the index before or after an add,
    and a build or add that raises leaves the index as it was. The index keeps its own copy of
    the vectors (never the caller's array).

    Examples
    --------
    >>> import numpy as np, annlib
    >>> X = np.random.default_rng(0).normal(size=(5000, 32)).astype("float32")
    >>> index = annlib.Partitioned(metric="l2", num_leaves=50).build(X)
    >>> ids, dist = index.search(X[:2], k=5, leaves=10, reorder=100)
    >>> ids[:, 0].tolist()
    [0, 1]
    """

    family = "partitioned"
    supports_add = True
    # the kernels every build runs: uncached means this build compiles (annlib.CompilationNotice)
    first_kernels = ("annlib.kernels.cluster:_argmin_block",)
    build_defaults = {
        "num_leaves": None, "spill": "soar", "soar_lambda": 1.0, "spills": 1,
        "soar_exclude_primary": False, "quantizer": "pq4", "dims_per_block": 2, "rerank": "float32",
        "anisotropic_threshold": "auto", "spherical": None, "training_sample": 100_000,
        "kmeans_iters": 10, "random_state": 0, "default_recall": 0.92, "avq": None,
    }
    search_defaults = {"leaves": None, "reorder": 100}

    def __init__(self, metric: str = "l2", **params: Any):
        super().__init__(metric=metric, **params)
        self._st: PartitionedState | None = None
        self._one_plan: tuple = (None, None)  # what the one-query kernel reads of the current state
        self._raw_plan: tuple = (None,)  # the same for the ordinary path's single queries

    # ----------------------------------------------------------------- parameters
    def _check_build_params(self, p):
        p = dict(p)
        if p["num_leaves"] is not None:
            p["num_leaves"] = V.check_int("num_leaves", p["num_leaves"], 1)
        V.check_choice("spill", p["spill"], SPILL_MODES)
        p["soar_lambda"] = V.check_float("soar_lambda", p["soar_lambda"], 0.0)
        p["spills"] = V.check_int("spills", p["spills"], 1, 4)
        p["soar_exclude_primary"] = V.check_bool("soar_exclude_primary", p["soar_exclude_primary"])
        V.check_choice("quantizer", p["quantizer"], QUANTIZERS)
        p["dims_per_block"] = V.check_int("dims_per_block", p["dims_per_block"], 1, 8)
        V.check_choice("rerank", p["rerank"], RERANK_MODES)
        t = p["anisotropic_threshold"]
        if t is not None and t != "auto":
            p["anisotropic_threshold"] = V.check_float("anisotropic_threshold", t, 0.0, 1.0, high_open=True)
        if p["spherical"] is not None:
            p["spherical"] = V.check_bool("spherical", p["spherical"])
        p["training_sample"] = V.check_int("training_sample", p["training_sample"], 1)
        p["kmeans_iters"] = V.check_int("kmeans_iters", p["kmeans_iters"], 1, 1000)
        if p["avq"] is not None:
            p["avq"] = V.check_float("avq", p["avq"], 0.0, low_open=True)
            if self._metric.proxy == PROXY_L2SQ:
                raise V.avq_needs_inner_product(self.metric)
        return p

    def _check_build_data(self, n):
        if self.params["num_leaves"] is not None:
            V.check_not_above_count("num_leaves", self.params["num_leaves"], n)
        V.check_capacity(type(self).__name__, n, MAX_POSITIONS)

    def _check_search_params(self, p):
        p = dict(p)
        if p["leaves"] is not None:
            p["leaves"] = V.check_int("leaves", p["leaves"], 1)
        p["reorder"] = V.check_int("reorder", p["reorder"], 1)
        return p

    def _threshold(self) -> float | None:
        t = self.params["anisotropic_threshold"]
        if t == "auto":
            return None if self._metric.proxy == PROXY_L2SQ else 0.2
        return t

    def _spherical(self) -> bool:
        s = self.params["spherical"]
        return s if s is not None else self.metric == "cosine"

    # ----------------------------------------------------------------- build
    compiles_ahead = True

    @classmethod
    def _compile_ahead_index(cls, X, metric, params, shape, with_build_kernels=False):
        # two leaves, every point a primary copy of its nearest centre, all-zero codes (and
        # codebooks, or unit int8 scales): the search kernels compile on it exactly as on a trained
        # index, which only the training kernels being compiled meanwhile could make
        index = cls(metric=metric, **{k: v for k, v in params.items() if k in cls.build_defaults})
        p = index.params
        Xp = np.ascontiguousarray(index._metric.prepare(X), dtype=np.float32)
        m, d = Xp.shape
        C = np.ascontiguousarray(Xp[:2])
        leaf = np.argmin(np.einsum("ijk,ijk->ij", Xp[:, None] - C[None], Xp[:, None] - C[None]), axis=1)
        if p["quantizer"] == "int8":
            coder = _Coder(None, np.ones(d, np.float32), d, None)
            codes = np.zeros((m, d), np.int8)
        else:
            w = p["dims_per_block"]
            d_pad = pad_dim(d, w)
            coder = _Coder(np.zeros((d_pad // w, CODEWORDS, w), np.float32), None, d_pad, None)
            codes = np.zeros((m, d_pad // w), np.uint8)
        placed = _Placed(C, leaf.astype(np.int64), np.arange(m, dtype=np.int64), codes, np.zeros(m, np.float32),
                         np.zeros(0, np.int64), float(np.finfo(np.float32).max))
        index._st = index._assemble(placed, coder, Xp)
        index._reset_state(d, m, None)
        return index

    def _build(self, X, progress):
        # Everything is built in locals and assigned at the end: a build that raises (or is
        # interrupted) leaves the previous index in place.
        p = self.params
        rng = np.random.default_rng(p["random_state"])
        n, d = X.shape
        L = p["num_leaves"] or _default_leaves(n)
        with progress_reporter(progress, 100, desc="Partitioned build", unit="%") as report:
            m = min(n, max(p["training_sample"], L))
            sample = X if m == n else X[np.sort(rng.choice(n, m, replace=False))]
            C = kmeans(np.ascontiguousarray(sample), L, iters=p["kmeans_iters"], rng=rng,
                       spherical=self._spherical(), progress=lambda done, total: report(50 * done // total),
                       threads=get_num_threads())
            primary = None
            if p["avq"] is not None:
                # ScaNN's order: primaries by the k-means centres, the re-fit over those members,
                # then spilling and codes against the re-fitted centres; the primaries are kept
                # (the re-fit is optimal for exactly these members)
                primary, _ = assign_nearest(X, C, threads=get_num_threads())
                refit = avq_refit(X, C, primary, p["avq"], threads=get_num_threads())
                # a re-fitted centre may lie farther out than its members (small eta, data near
                # the float32-safe limit); such a leaf keeps its k-means centre, so scores cannot
                # overflow and the saved centres pass validate()
                far = (np.abs(refit) > self._metric.max_abs(d)).any(axis=1)
                refit[far] = C[far]
                C = refit
            coder = self._train_coder(X, C, rng, primary)
            report(55)
            placed = self._place(X, 0, C, coder, None, n / L, rng,
                                 lambda done, total: report(55 + 44 * done // max(total, 1)), primary)
            state = self._assemble(placed, coder, X)
            report(100)
        self._st = state

    def _train_coder(self, X, C, rng, primary=None) -> _Coder:
        """Train the residual quantizer (PQ codebooks or int8 scales) on a sample of residuals
        (against each point's leaf in ``primary``, or its nearest centre when None)."""
        p = self.params
        n, d = X.shape
        rows = np.arange(n) if n <= PQ_SAMPLE else np.sort(rng.choice(n, PQ_SAMPLE, replace=False))
        threads = get_num_threads()
        if primary is None:
            prim, _ = assign_nearest(np.ascontiguousarray(X[rows]), C, threads=threads)
        else:
            prim = primary[rows]
        R = X[rows] - C[prim]
        # a few extreme residuals (outliers of the build data) would stretch the codewords or
        # the int8 range for everyone; they are left out, and placed as outliers later
        norms = np.sqrt(np.einsum("ij,ij->i", R, R, dtype=np.float64))
        typical = norms <= OUTLIER_FACTOR * np.quantile(norms, OUTLIER_QUANTILE)
        if typical.sum() >= CODEWORDS:
            R = R[typical]
        if p["quantizer"] == "int8":
            return _Coder(None, int8_fit(R), d, None)
        w = p["dims_per_block"]
        d_pad = pad_dim(d, w)
        codebooks = train_codebooks(pad_columns(R, d_pad), w, iters=PQ_ITERS, rng=rng, threads=threads)
        t = self._threshold()
        scale_t = None if t is None else float(t * np.median(np.sqrt(sqnorms(X[rows]).astype(np.float64))))
        return _Coder(codebooks, None, d_pad, scale_t)

    def _spread(self, X, C, primary):
        """(leaf, row) of every entry of ``X``: primaries first, then spilled copies."""
        p = self.params
        rows = np.arange(X.shape[0], dtype=np.int64)
        leaf, who = [primary.astype(np.int64)], [rows]
        if p["spill"] != "none" and C.shape[0] > 1:
            soar = p["spill"] == "soar"
            sec = soar_assign(X, C, primary, p["soar_lambda"] if soar else 0.0, spills=p["spills"],
                              exclude_primary=p["soar_exclude_primary"] if soar else True,
                              threads=get_num_threads())
            for s in range(sec.shape[1]):
                ok = sec[:, s] >= 0
                leaf.append(sec[ok, s].astype(np.int64))
                who.append(rows[ok])
        return np.concatenate(leaf), np.concatenate(who)

    def _place(self, X, first, C, coder: _Coder, limit, typical_leaf, rng, report, primary=None) -> "_Placed":
        """Entries of the vectors ``X`` (positions ``first, first + 1, ...``).

        The centres come back grown by the leaves made for outliers; ``limit`` None (at build)
        sets the outlier error limit from these entries' errors. ``primary`` gives each vector's
        leaf (None: its nearest centre).
        """
        m = X.shape[0]
        threads = get_num_threads()
        if primary is None:
            primary, _ = assign_nearest(X, C, threads=threads)
        leaf, rows = self._spread(X, C, primary)
        codes, err, half = coder.encode(X, C, leaf, rows, report, threads)
        if limit is None:
            limit = OUTLIER_FACTOR * float(np.quantile(err[:m], OUTLIER_QUANTILE))
        outlier = np.zeros(m, dtype=bool)
        outlier[rows[:m][err[:m] > limit]] = True
        # a spilled copy the codes cannot represent is dropped (spilling is optional); an outlier
        # keeps no copy in the ordinary leaves at all
        keep = (err <= limit) & ~outlier[rows]
        leaf, rows, codes, half = leaf[keep], rows[keep], codes[keep], half[keep]
        exact_rows = np.zeros(0, dtype=np.int64)
        out_rows = np.flatnonzero(outlier)
        if out_rows.size:
            # outliers are clustered into leaves of their own, about as full as the others; those
            # still too far from every new centre are compared exactly instead
            Xo = np.ascontiguousarray(X[out_rows])
            k_o = min(out_rows.size, max(1, int(math.ceil(out_rows.size / max(typical_leaf, 1.0)))))
            if k_o < out_rows.size:
                Co = kmeans(Xo, k_o, iters=self.params["kmeans_iters"], rng=rng, spherical=self._spherical(),
                            threads=threads)
            else:
                Co = Xo.copy()  # one leaf per outlier: its centre is the point, its residual zero
            lo, _ = assign_nearest(Xo, Co, threads=threads)
            lo = lo.astype(np.int64)
            codes_o, err_o, half_o = coder.encode(Xo, Co, lo, np.arange(out_rows.size, dtype=np.int64),
                                                  threads=threads)
            ok = err_o <= limit
            used, remap = np.unique(lo[ok], return_inverse=True)
            L = C.shape[0]
            C = np.concatenate([C, Co[used]]).astype(np.float32)
            leaf = np.concatenate([leaf, L + remap.astype(np.int64)])
            rows = np.concatenate([rows, out_rows[ok]])
            codes = np.concatenate([codes, codes_o[ok]])
            half = np.concatenate([half, half_o[ok]])
            exact_rows = out_rows[~ok]
        return _Placed(C, leaf, rows + first, codes, half, exact_rows + first, limit)

    def _assemble(self, placed: "_Placed", coder: _Coder, vectors, exact_before=None,
                  int8_before=None) -> PartitionedState:
        """Lay the entries out leaf by leaf in padded blocks and make the state.

        With ``rerank="int8"`` the int8 rows of ``vectors`` are made too; ``int8_before`` (an
        add) holds those of its first rows, which are kept as they are (each row is coded on its
        own).
        """
        exact = placed.exact_positions
        if exact_before is not None:
            exact = np.concatenate([exact_before.astype(np.int64), exact])
        L = placed.centres.shape[0]
        B = fastscan.POINT_BLOCK
        l2 = self._metric.proxy == PROXY_L2SQ
        # Squared L2 adds a per-entry term ||x||^2 / 2 that the scan bounds per block by the
        # block's smallest: entries sorted by it within each leaf make that bound tight (kdewall
        # at 24 leaves: 2,152 -> 757 sums under the bar per query for 529 under the threshold,
        # the scan 1.24x faster, the same candidates). Other metrics keep the placement order.
        if l2:
            order = np.lexsort((placed.half_sqnorms, placed.leaf))
        else:
            order = np.argsort(placed.leaf, kind="stable")
        leaf, pos, codes = placed.leaf[order], placed.position[order], placed.codes[order]
        counts = np.bincount(leaf, minlength=L)
        blocks = (counts + B - 1) // B
        offsets = np.zeros(L + 1, dtype=np.int64)
        np.cumsum(blocks, out=offsets[1:])
        slot = offsets[leaf] * B + (np.arange(len(leaf)) - np.repeat(np.cumsum(counts) - counts, counts))
        E_pad = int(offsets[-1]) * B
        entry_positions = np.full(E_pad, -1, dtype=np.int32)
        entry_positions[slot] = pos
        full = np.zeros((E_pad, codes.shape[1]), dtype=codes.dtype)
        full[slot] = codes
        # Padding entries repeat their leaf's last real entry: the scan rejects them by position
        # only after their sum passed the bar, and all-zero codes passed it together whenever
        # code 0 scored well for a query (glove at 64 leaves: 375 of 583 sums under the final
        # bar per query were padding); a copy passes only when that entry does.
        pad = np.flatnonzero(entry_positions < 0)
        if pad.size:
            pad_leaf = np.searchsorted(offsets, pad // B, side="right") - 1
            full[pad] = full[offsets[pad_leaf] * B + counts[pad_leaf] - 1]
        terms = _EMPTY_F32
        if l2:
            terms = np.zeros(E_pad, dtype=np.float32)
            terms[slot] = placed.half_sqnorms[order]
        state = PartitionedState(
            centres=np.ascontiguousarray(placed.centres, dtype=np.float32), leaf_block_offsets=offsets,
            entry_positions=entry_positions,
            codes=pack_codes(full) if coder.codebooks is not None else full,
            vectors=vectors, exact_positions=np.sort(exact).astype(np.int32), point_terms=terms,
            codebooks=coder.codebooks, int8_multipliers=coder.int8_multipliers,
            padded_dim=coder.padded_dim, anisotropic_scale_threshold=coder.anisotropic_scale_threshold,
            outlier_error_limit=float(placed.limit),
        )
        if self.params["rerank"] == "int8":
            n0 = 0 if int8_before is None else int8_before.codes.shape[0]
            rows = rerank_int8.int8_rows(vectors[n0:], l2)
            if int8_before is not None:
                rows = rerank_int8.Int8Rows(*(np.concatenate([a, b]) for a, b in zip(int8_before, rows)))
            state.rerank_int8_codes, state.rerank_int8_scales, state.rerank_int8_half_sqnorms = rows
        return state.derive(l2)

    # ----------------------------------------------------------------- add
    def _add(self, X, progress):
        # The new state is built aside and swapped in at the end (see _build).
        st = self._st
        n0 = st.num_vectors
        V.check_capacity(type(self).__name__, n0 + X.shape[0], MAX_POSITIONS)
        # Seeded by the seed and the first new position only: load-then-add equals add.
        rng = np.random.default_rng([self.params["random_state"], n0])
        coder = _Coder.of(st)
        with progress_reporter(progress, X.shape[0], desc="Partitioned add", unit="vec") as report:
            new = self._place(X, n0, st.centres, coder, st.outlier_error_limit, n0 / st.num_leaves, rng,
                              lambda done, total: report(X.shape[0] * done // max(total, 1)))
            leaf_old, pos_old, codes_old, half_old = st.entries()
            if not half_old.shape[0]:
                half_old = np.zeros(leaf_old.shape[0], dtype=np.float32)
            placed = _Placed(new.centres, np.concatenate([leaf_old, new.leaf]),
                             np.concatenate([pos_old, new.position]), np.concatenate([codes_old, new.codes]),
                             np.concatenate([half_old, new.half_sqnorms]), new.exact_positions, new.limit)
            state = self._assemble(placed, coder, np.concatenate([st.vectors, X]), st.exact_positions,
                                   st.rerank_rows)
        self._st = state

    # ----------------------------------------------------------------- search
    def _scan_is_cheaper(self, n_allowed, k, params):
        # probing leaves to find k of few allowed points reads far more entries than exist
        return n_allowed <= EXACT_FILTER_FACTOR * max(params["reorder"], k)

    def _vectors_at(self, positions):
        return self._st.vectors[positions]

    def _search_one(self, q, k, params, threads):
        plan = self._one_plan
        st = self._st
        if plan[0] is not st or plan[1] is not self._ids:  # made again after every change
            if st.pq_arrays is None:
                return None  # int8 codes: the ordinary path
            table, kernel = _one_query_kernel(st, self._ids_array(), self._metric.proxy, self._one_query_terms())
            L = st.num_leaves
            plan = self._one_plan = (st, self._ids, table, table.words, st.num_vectors, L, _default_probes(L),
                                     kernel)
        n = plan[4]
        if type(k) is not int or not 0 < k <= n:
            return None
        leaves = params["leaves"]
        t = plan[6] if leaves is None else min(plan[5], leaves)
        n_cand = min(max(params["reorder"], k), n)
        if n_cand >= fastscan.ONE_QUERY_MAX_CANDIDATES:
            return None
        out_d = np.empty(k, _F32)
        out_i = np.empty(k, _I64)
        if plan[7](q, plan[3], t, n_cand, k, _NO_MASK, out_d, out_i):
            return None
        return out_i, out_d

    def _search(self, Q, k, mask, leaves=None, reorder=100):
        st = self._st
        L = st.num_leaves
        t = min(L, leaves if leaves is not None else _default_probes(L))
        # more candidates than vectors cannot exist (and would only size the buffers)
        n_cand = min(max(reorder, k), st.num_vectors)
        mask_arr = _NO_MASK if mask is None else mask
        if Q.shape[0] == 1 and st.pq_arrays is not None and n_cand < fastscan.ONE_QUERY_MAX_CANDIDATES:
            # the one-query kernel (see _search_one), on the prepared query
            plan = self._raw_plan
            if plan[0] is not st:
                table, kernel = _one_query_kernel(st, _NO_IDS, self._metric.proxy, RAW_TERMS)
                plan = self._raw_plan = (st, table, table.words, kernel)
            out_d = np.empty((1, k), _F32)
            out_i = np.empty((1, k), _I64)
            plan[3](Q[0], plan[2], t, n_cand, k, mask_arr, out_d[0], out_i[0])
            return out_d, out_i
        d, i = self._search_probed(Q, k, mask_arr, t, n_cand, st)
        # A row is short only when its probed leaves hold fewer than k allowed vectors: probe
        # twice as many leaves for those rows until they are full or every leaf is probed.
        while t < L and (i[0, k - 1] < 0 if i.shape[0] == 1 else (i[:, k - 1] < 0).any()):
            short = np.flatnonzero(i[:, k - 1] < 0)
            t = min(L, 2 * t)
            d[short], i[short] = self._search_probed(Q[short], k, mask_arr, t, n_cand, st)
        if st.exact_positions.shape[0]:
            d, i = self._merge_exact(Q, k, mask, d, i, st)
        return d, i

    def _search_probed(self, Q, k, mask, t, n_cand, st: PartitionedState):
        if st.pq_arrays is not None and Q.shape[0] <= FEW_QUERIES:
            if st.rerank_rows is not None:
                return rerank_int8.search_pq_few_int8(Q, st.pq_arrays, st.rerank_rows, t, mask, n_cand, k,
                                                      self._metric.proxy)
            return fastscan.search_pq_few(Q, st.pq_arrays, t, mask, n_cand, k, self._metric.proxy)
        # Many queries: one contiguous range of them per worker thread, each running the whole
        # serial pipeline below (single-threaded GEMM, leaf selection, tables, scan, re-ranking)
        # on chunks of its range; no step waits on another thread.
        parts = run_split(lambda lo, hi: self._search_range(Q, k, mask, t, n_cand, st, lo, hi), Q.shape[0],
                          get_num_threads(), SPLIT_QUERIES)
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _search_range(self, Q, k, mask, t, n_cand, st, lo, hi):
        if hi - lo <= QUERY_CHUNK:
            return self._search_batch(Q[lo:hi], k, mask, t, n_cand, st)
        parts = [self._search_batch(Q[s:min(hi, s + QUERY_CHUNK)], k, mask, t, n_cand, st)
                 for s in range(lo, hi, QUERY_CHUNK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _search_batch(self, Q, k, mask, t, n_cand, st: PartitionedState):
        # the serial kernels: threads split the queries (see _search_probed)
        # N = -<q, c> exactly (a product with the negated centres: negation is exact and the
        # same GEMM rounds symmetrically), so inner-product scores need no pass of their own
        N = Q @ st.negated_centres.T
        D = st.centre_sqnorms[None, :] + 2.0 * N if st.centre_sqnorms.shape[0] else N
        _, leaf_ids = fastscan.select_leaves(D, t)
        probes = fastscan.Probes(leaf_ids, np.ascontiguousarray(np.take_along_axis(N, leaf_ids, axis=1),
                                                                dtype=np.float32))
        if st.codebooks is not None:
            tables = build_luts(pad_columns(Q, st.padded_dim), st.codebooks)
            _, cand = fastscan.scan_pq(tables, probes, st.packed, mask, n_cand, st.num_vectors)
        else:
            Qs = np.ascontiguousarray(Q / st.int8_multipliers[None, :], dtype=np.float32)
            _, cand = fastscan.scan_int8(Qs, probes, st.packed, mask, n_cand, st.num_vectors)
        if st.rerank_rows is not None:
            return rerank_int8.rerank_int8(Q, st.rerank_rows, st.vectors, cand, k, self._metric.proxy)
        return fastscan.rerank(Q, st.vectors, cand, k, self._metric.proxy)

    def stage_ranks(self, queries, true_ids, leaves, max_reorder: int):
        """The tuner's instrumented pass: ranks of true neighbours after each search stage.

        For every probed-leaf count in ``leaves`` it runs the scan stage alone (no re-ranking)
        and reports where each true neighbour ranks among the distinct candidates by approximate
        score, and how many code entries each query read. ``annlib.tune`` turns this into an
        exact recall model for every ``(leaves, reorder)``.

        Parameters
        ----------
        queries : array-like (q, d)
        true_ids : int array (q, k)
            External ids of the exact k nearest neighbours of each query.
        leaves : sequence of int
            Increasing probed-leaf counts, each in [1, num_leaves].
        max_reorder : int
            The largest ``reorder`` of interest (candidates kept by the scan).

        Returns
        -------
        annlib.indexes.partitioned_tuning.StageRanks

        Raises
        ------
        TypeError, ValueError
            Bad queries, ids not in the index, or leaf counts out of range.
        """
        from .partitioned_tuning import stage_ranks

        self._require_built()
        Q32, _ = V.as_vectors(queries, "queries", limit=self._metric.max_abs)
        V.check_dim(Q32.shape[1], self._dim, "queries")
        truth = np.asarray(true_ids)
        V.check_truth_ids(truth, Q32.shape[0], 1, "true_ids")
        max_reorder = V.check_int("max_reorder", max_reorder, 1)
        with self._rw.read():
            st = self._st
            grid = np.asarray([V.check_int("leaves", t, 1, st.num_leaves) for t in leaves], dtype=np.int64)
            V.check_increasing("leaves", grid)
            pos = self._positions_of(truth.reshape(-1).astype(np.int64)).reshape(truth.shape)
            V.check_known_positions(truth.reshape(-1), pos.reshape(-1))
            return stage_ranks(st, self._metric.prepare(Q32), pos, grid, max_reorder,
                               self._metric.proxy == PROXY_L2SQ)

    def _merge_exact(self, Q, k, mask, d, i, st: PartitionedState):
        """Add the vectors without entries (compared exactly) to the results."""
        rows = st.exact_positions.astype(np.int64)
        if mask is not None:
            rows = rows[mask[rows]]
        if rows.size == 0:
            return d, i
        d2, i2 = self._exact_over(Q, k, rows)
        return merge_topk(d, i, d2, i2, k)

    # ----------------------------------------------------------------- persistence and sizes
    def _state(self):
        return self._st.to_file()

    def _restore(self, meta, arrays):
        l2 = self._metric.proxy == PROXY_L2SQ
        state = PartitionedState.from_file(meta, arrays, self.params["quantizer"], self.params["rerank"])
        state.validate(self._dim, self._n_positions, l2=l2, max_abs=self._metric.max_abs(self._dim),
                       dims_per_block=self.params["dims_per_block"])
        self._st = state.derive(l2)

    def memory_bytes(self) -> int:
        """Bytes held by the index's arrays (vectors, codes, leaf tables, derived terms, ids)."""
        self._require_built()
        with self._rw.read():
            return self._st.nbytes() + (0 if self._ids is None else int(self._ids.nbytes))

    def stats(self) -> dict[str, float]:
        """Sizes of the built index: leaves, stored copies, spill fraction, bytes per vector.

        Returns
        -------
        dict
            ``num_leaves`` (leaves of the built index), ``copies`` (stored code entries),
            ``spill_fraction`` (spilled copies per vector), ``exact_points`` (vectors the codes
            cannot represent, compared exactly), ``bytes_per_vector`` (everything) and
            ``bytes_per_vector_without_reorder`` (without the re-ranking vectors: the float32
            ones and, with ``rerank="int8"``, their int8 copy).
        """
        self._require_built()
        total = self.memory_bytes()
        with self._rw.read():
            st = self._st
            n = st.num_vectors
            copies = int((np.asarray(st.entry_positions) >= 0).sum())
            n_exact = int(st.exact_positions.shape[0])
            return {"num_leaves": st.num_leaves, "copies": copies,
                    "spill_fraction": copies / max(n - n_exact, 1) - 1.0, "exact_points": n_exact,
                    "bytes_per_vector": total / n,
                    "bytes_per_vector_without_reorder": (total - st.vectors.nbytes - _int8_rows_bytes(st)) / n}

    @classmethod
    def _search_space(cls, n, dim):
        return _space(n, None)

    def _instance_search_space(self):
        """Parameter ranges for the tuner and the benchmark sweep, for this built index.

        Returns
        -------
        dict
            ``{"build": {"num_leaves": [L]}, "search": {"leaves": [...], "reorder": [...]}}`` with
            ``L`` the built index's own leaf count (``leaves`` goes up to it); an unbuilt index
            answers as the class does for unknown ``n``.
        """
        if self._dim is None:
            return _space(None, None)
        with self._rw.read():
            return _space(len(self), self._st.num_leaves)

    search_space = _ClassOrInstanceMethod(Index.__dict__["_space_on_class"], _instance_search_space)


def _space(n: int | None, num_leaves: int | None) -> dict[str, dict[str, list]]:
    """Search space for ``n`` vectors; ``num_leaves`` is a built index's actual leaf count."""
    L = num_leaves or (_default_leaves(n) if n else 1000)
    leaves = [v for v in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256) if v < L]
    if L <= 256:
        leaves.append(L)  # every leaf: the exhaustive end of the range
    build = {"num_leaves": [L]} if (n or num_leaves) else {}
    return {"build": build, "search": {"leaves": leaves, "reorder": [20, 40, 70, 100, 160, 250]}}


def _check_counts(what: str, counts: dict[str, Any]) -> None:
    """All ``counts`` (field -> the count it states or implies) must agree; name the odd one out."""
    values = list(counts.values())
    if all(v == values[0] for v in values):
        return
    for name, value in counts.items():
        others = [v for k, v in counts.items() if k != name]
        if all(v == others[0] for v in others):
            break
    else:
        name, value = next(iter(counts.items()))
    stated = ", ".join(f"{k}: {v:g}" for k, v in counts.items())
    raise bad_field(name, f"disagrees on the number of {what} ({stated})")


def _int8_rows_bytes(st: PartitionedState) -> int:
    """Bytes of the int8 re-ranking rows (0 with float32 re-ranking)."""
    return 0 if st.rerank_rows is None else int(sum(a.nbytes for a in st.rerank_rows))


def _one_query_kernel(st: PartitionedState, ids: np.ndarray, proxy: int, terms: tuple):
    """(table, kernel) of the one-query path for the state's re-ranking: the float32 kernel
    (:func:`~annlib.kernels.fastscan.search_pq_one`) or the int8 one, which only an index built
    with ``rerank="int8"`` compiles."""
    if st.rerank_rows is None:
        return fastscan.pq_one_query_table(st.pq_arrays, st.exact_positions, ids, proxy, terms), fastscan.search_pq_one
    table = rerank_int8.pq_int8_one_query_table(st.pq_arrays, st.rerank_rows, st.exact_positions, ids, proxy, terms)
    return table, rerank_int8.search_pq_one_int8


def _default_leaves(n: int) -> int:
    """Default leaf count, ``round(2 sqrt(n))`` clipped to ``[1, n]``."""
    return max(1, min(n, int(round(2.0 * math.sqrt(n)))))


def _default_probes(num_leaves: int) -> int:
    """Default ``leaves`` of a search: ``ceil(L / 20)``."""
    return max(1, math.ceil(num_leaves / 20))
