"""Array tables: a family's whole state handed to a one-query kernel as one int64 array.

numba unboxes every array argument of a call from Python separately (a reference-counted
wrapper per array, ~0.08 us each), and types a named tuple or a struct through Python on every
call (~1 us). A one-query search that passes a dozen state arrays pays more for that than for
the search itself on a small index. An :class:`ArrayTable` instead lists each array's address
and shape in one int64 array, made once per state of the index; the kernel rebuilds the arrays
from it as views (:func:`f32_1d`, :func:`i32_2d`, ...), at no cost.

The views carry no reference to their memory, so the rule that makes this safe is ownership: an
``ArrayTable`` keeps a reference to every array it lists (``arrays``), a family keeps the table
on the state object whose arrays it lists and makes a new one whenever that state is replaced
(always under the index's write lock), and a search reads the state and its table together under
the read lock. A table never outlives, nor sees a reallocation of, an array it lists.

Layout: an array takes four words (address, then its first three dimensions), a scalar one word
(:func:`f64_at` reads a float stored by bit pattern). Every array listed is C-contiguous (a
non-contiguous one is copied when the table is made, and the copy is what the table keeps).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba.core import cgutils, types
from numba.extending import intrinsic

__all__ = ["ArrayTable", "make_table", "f32_1d", "f32_2d", "f32_3d", "f64_1d", "f64_2d", "i32_1d",
           "i32_2d", "i64_1d", "i8_2d", "u8_3d", "u64_2d", "bool_1d", "int_at", "f64_at", "f32_view", "i64_view",
           "u16_view_2d", "bool_view", "unowned"]

ARRAY_WORDS = 4


class ArrayTable(NamedTuple):
    """One kernel argument describing many arrays (module docstring).

    Attributes
    ----------
    words : int64 (w,)
        What the kernel reads.
    arrays : tuple of ndarray
        Every array ``words`` points into, kept alive with the table.
    """

    words: np.ndarray
    arrays: tuple


def make_table(*items) -> ArrayTable:
    """Pack arrays (at most 3-D) and scalars (int, bool, float) into an :class:`ArrayTable`.

    Slots are consecutive in argument order: an array takes :data:`ARRAY_WORDS` words, a scalar
    one; the kernel that reads the table names the same offsets.
    """
    words: list[int] = []
    kept = []
    for item in items:
        if isinstance(item, np.ndarray):  # at most 3-D (the accessors below)
            arr = item if item.flags.c_contiguous else np.ascontiguousarray(item)
            kept.append(arr)
            shape = list(arr.shape) + [0] * (3 - arr.ndim)
            words += [arr.ctypes.data, *shape[:3]]
        elif isinstance(item, (float, np.floating)):
            words.append(int(np.array(float(item), dtype=np.float64).view(np.int64)))
        else:  # int, bool
            words.append(int(item))
    return ArrayTable(np.array(words, dtype=np.int64), tuple(kept))


@intrinsic
def _address(typingctx, word):
    """The int64 ``word`` as a raw pointer (for :func:`numba.carray`)."""
    if not isinstance(word, types.Integer):
        return None
    sig = types.voidptr(word)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


@intrinsic
def _as_float64(typingctx, word):
    """The int64 ``word`` reinterpreted as a float64 (bit pattern)."""
    if not isinstance(word, types.Integer):
        return None
    sig = types.float64(word)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return sig, codegen


@numba.njit(inline="always", cache=True, nogil=True)
def int_at(tab, s):
    """The scalar at word ``s``."""
    return tab[s]


@numba.njit(inline="always", cache=True, nogil=True)
def f64_at(tab, s):
    """The float stored at word ``s``."""
    return _as_float64(tab[s])


@numba.njit(inline="always", cache=True, nogil=True)
def f32_1d(tab, s):
    return numba.carray(_address(tab[s]), (tab[s + 1],), np.float32)


@numba.njit(inline="always", cache=True, nogil=True)
def f32_2d(tab, s):
    return numba.carray(_address(tab[s]), (tab[s + 1], tab[s + 2]), np.float32)


@numba.njit(inline="always", cache=True, nogil=True)
def f32_3d(tab, s):
    return numba.carray(_address(tab[s]), (tab[s + 1], tab[s + 2], tab[s + 3]), np.float32)


@numba.njit(inline="always", cache=True, nogil=True)
def f64_1d(tab, s):
    return numba.carray(_address(tab[s]), (tab[s + 1],), np.float64)


@numba.njit(inline="always", cache=True, nogil=True)
def f64_2d(tab, s):
    return numba.carray(_address(tab[s]), (tab[s + 1], tab[s + 2]), np.float64)


@numba.njit(inline="always", cache=True, nogil=True)
def i32_1d(tab, s):
    return numba.carray(_address(tab[s]), (tab[s + 1],), np.int32)


@numba.njit(inline="always", cache=True, nogil=True)
def i32_2d(tab, s):
    return numba.carray(_address(tab[s]), (tab[s + 1], tab[s + 2]), np.int32)


@numba.njit(inline="always", cache=True, nogil=True)
def i64_1d(tab, s):
    return numba.carray(_address(tab[s]), (tab[s + 1],), np.int64)


@numba.njit(inline="always", cache=True, nogil=True)
def i8_2d(tab, s):
    return numba.carray(_address(tab[s]), (tab[s + 1], tab[s + 2]), np.int8)


@numba.njit(inline="always", cache=True, nogil=True)
def u8_3d(tab, s):
    return numba.carray(_address(tab[s]), (tab[s + 1], tab[s + 2], tab[s + 3]), np.uint8)


@numba.njit(inline="always", cache=True, nogil=True)
def u64_2d(tab, s):
    return numba.carray(_address(tab[s]), (tab[s + 1], tab[s + 2]), np.uint64)


@numba.njit(inline="always", cache=True, nogil=True)
def bool_1d(tab, s):
    return numba.carray(_address(tab[s]), (tab[s + 1],), np.bool_)


# Views of memory the caller keeps alive, by address (no reference count; see the module notes).
@numba.njit(inline="always", cache=True, nogil=True)
def f32_view(address, n):
    return numba.carray(_address(address), (n,), np.float32)


@numba.njit(inline="always", cache=True, nogil=True)
def i64_view(address, n):
    return numba.carray(_address(address), (n,), np.int64)


@numba.njit(inline="always", cache=True, nogil=True)
def u16_view_2d(address, rows, cols):
    return numba.carray(_address(address), (rows, cols), np.uint16)


@numba.njit(inline="always", cache=True, nogil=True)
def bool_view(address, n):
    return numba.carray(_address(address), (n,), np.bool_)


@intrinsic
def unowned(typingctx, arr):
    """``arr`` itself (same data, shape and strides) without a reference to its memory.

    Views taken from it (``X[e]``, ``row[a:b]``) and hand-overs of it to other functions then
    cost no atomic reference-count update. Only for arrays the caller keeps alive for as long
    as the result and its views are used (the module notes).
    """
    if not isinstance(arr, types.Array):
        return None
    sig = arr(arr)

    def codegen(context, builder, signature, args):
        out = context.make_array(signature.args[0])(context, builder, args[0])
        out.meminfo = cgutils.get_null_value(out.meminfo.type)
        out.parent = cgutils.get_null_value(out.parent.type)
        return out._getvalue()

    return sig, codegen
