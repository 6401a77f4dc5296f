"""One progress reporter for every long call: a tqdm bar, a ``(done, total)`` callable, or nothing."""

from __future__ import annotations

from typing import Callable, Optional, Union

Progress = Union[bool, None, Callable[[int, Optional[int]], object]]


class _Reporter:
    def __init__(self, progress: Progress, total: Optional[int], desc: str, unit: str):
        self._bar = None
        self._callback = None
        self._done = 0
        self._total = total
        if callable(progress):
            self._callback = progress
        elif progress:
            from tqdm.auto import tqdm

            byte_units = unit == "B"
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                unit_scale=byte_units,
                unit_divisor=1024 if byte_units else 1000,
                leave=False,
            )

    def update(self, n: int) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._callback is not None:
            self._callback(self._done, self._total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "_Reporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reporter(progress: Progress, total: Optional[int], desc: str = "", unit: str = "it") -> _Reporter:
    """Return a context manager with ``update(n)`` that reports to whatever ``progress`` asks for."""
    return _Reporter(progress, total, desc, unit)
