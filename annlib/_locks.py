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
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None  # thread id of the writer holding the lock
        self._writer_depth = 0
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        cond = self._cond
        with cond:
            if self._writer == me:  # a writer reading its own index
                self._writer_depth += 1
                nested = True
            else:
                nested = False
                while self._writer is not None or self._writers_waiting:
                    cond.wait()
                self._readers += 1
        try:
            yield
        finally:
            with cond:
                if nested:
                    self._writer_depth -= 1
                else:
                    self._readers -= 1
                    if self._readers == 0:
                        cond.notify_all()

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
