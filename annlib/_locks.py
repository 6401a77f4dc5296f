"""The reader-writer lock behind every index's concurrency contract.

Searches (readers) run together; ``build``/``add``/``delete`` and other writers run alone and wait
for the searches in flight to finish, and a waiting writer holds back new readers so a stream of
searches cannot starve it. A search therefore sees the index wholly before or wholly after a
write, never half of it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["ReadWriteLock"]


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

    def read(self) -> "_ReadHold":
        """Context manager holding the lock for reading (shared with other readers)."""
        return _ReadHold(self)

    def try_read(self) -> bool:
        """Take the lock for reading if that needs no wait; False (nothing taken) otherwise.

        The one-query search path: no holder object, one lock round trip. When a writer holds
        the lock or waits for it, the caller goes the ordinary way (:meth:`read`), which waits;
        so a stream of searches still cannot starve a writer. A True must be paired with
        :meth:`release_read`.
        """
        with self._mutex:
            if self._writer is None and not self._writers_waiting:
                self._readers += 1
                return True
        return False

    def release_read(self) -> None:
        """Release a read taken by :meth:`try_read`."""
        with self._mutex:
            self._readers -= 1
            # only a writer waits for the readers to leave: wake one only when one waits
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
                    while self._writer is not None or self._readers:
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

