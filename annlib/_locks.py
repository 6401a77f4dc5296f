"""The reader-writer lock behind every index's concurrency contract.

Searches (readers) run together; ``build``/``add``/``delete`` and other writers run alone and wait
for the searches in flight to finish, and a waiting writer holds back new readers so a stream of
searches cannot starve it. A search therefore sees the index wholly before or wholly after a
write, never half of it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Iterator

__all__ = ["ReadWriteLock"]

# call_read's lock-free entry relies on the global interpreter lock (see there)
_GIL = getattr(sys, "_is_gil_enabled", lambda: True)()


class ReadWriteLock:
    """Writer-preferring reader-writer lock.

    ``read()`` and ``write()`` are context managers. The lock is re-entrant for writers (a writer
    may call code that takes ``write()`` or ``read()`` again in the same thread); a reader must not
    upgrade to a writer.
    """

    def __init__(self) -> None:
        # The condition's own lock guards every field; the per-call paths take it directly
        # (``with mutex`` is one C call; ``with cond`` goes through Python code).
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer: int | None = None  # thread id of the writer holding the lock
        self._writer_depth = 0
        self._writers_waiting = 0
        self._quick: list = []  # one entry per reader inside call_read (see there)

    def read(self) -> "_ReadHold":
        """Context manager holding the lock for reading (shared with other readers)."""
        return _ReadHold(self)

    def call_read(self, fn, *args):
        """``fn(*args)`` holding the lock for reading, if taking it needs no wait; else None
        (``fn`` not called).

        The one-query search path: no holder object and, under the global interpreter lock, no
        mutex either. The reader announces itself by appending to ``_quick`` (one atomic list
        operation), then looks for a writer; a writer announces itself (``_writers_waiting``,
        ``_writer``), then waits until ``_quick`` is empty. Each side acts first and looks
        second, and the interpreter lock orders every such step, so at least one of the two sees
        the other: either the reader backs off (None: the caller goes the ordinary way,
        :meth:`read`, which waits, so a stream of searches cannot starve a writer) or the writer
        waits for it. A reader leaving wakes a writer only when one waits.
        """
        if not _GIL:
            return self._call_read_locked(fn, args)
        quick = self._quick
        quick.append(None)
        if self._writer is not None or self._writers_waiting:
            quick.pop()
            self._wake_writer()
            return None
        try:
            return fn(*args)
        finally:
            quick.pop()
            if self._writers_waiting:
                self._wake_writer()

    def _wake_writer(self) -> None:
        with self._mutex:
            self._cond.notify_all()

    def _call_read_locked(self, fn, args):
        # call_read without the interpreter lock: the reader count under the mutex
        mutex = self._mutex
        with mutex:
            if self._writer is not None or self._writers_waiting:
                return None
            self._readers += 1
        try:
            return fn(*args)
        finally:
            with mutex:
                self._readers -= 1
                if self._readers == 0 and self._writers_waiting:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        cond = self._cond
        with cond:
            if self._writer == me:
                self._writer_depth += 1
            else:
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._readers or self._quick:
                        cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer = me
                self._writer_depth = 1
        try:
            yield
        finally:
            with cond:
                self._writer_depth -= 1
                if self._writer_depth == 0:
                    self._writer = None
                    cond.notify_all()


class _ReadHold:
    """One ``with lock.read():`` block. A plain object rather than a generator context manager:
    searches take it once per call, and one query per call is a common way to search."""

    __slots__ = ("_lock", "_nested")

    def __init__(self, lock: ReadWriteLock) -> None:
        self._lock = lock
        self._nested = False

    def __enter__(self) -> None:
        lock = self._lock
        me = threading.get_ident()
        with lock._mutex:
            if lock._writer == me:  # a writer reading its own index
                lock._writer_depth += 1
                self._nested = True
            else:
                while lock._writer is not None or lock._writers_waiting:
                    lock._cond.wait()
                lock._readers += 1

    def __exit__(self, *exc) -> None:
        lock = self._lock
        with lock._mutex:
            if self._nested:
                lock._writer_depth -= 1
            else:
                lock._readers -= 1
                # only a writer waits for the readers to leave: wake one only when one waits
                if lock._readers == 0 and lock._writers_waiting:
                    lock._cond.notify_all()

