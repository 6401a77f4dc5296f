"""The one progress policy of annlib: ``progress=`` is False, True (a tqdm bar) or a callable.

Every long call (build, add, sketching, sweeps) reports through :func:`progress_reporter`, so the
three forms behave the same in every family and a bar is always closed, also when the call raises.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["progress_reporter"]


@contextlib.contextmanager
def progress_reporter(progress: Any, total: int, desc: str, unit: str = "it") -> Iterator[Callable[[int], None]]:
    """Yield ``report(done)``, which forwards the absolute count ``done`` (of ``total``).

    Parameters
    ----------
    progress : bool or callable
        False: nothing is shown. True: a tqdm bar titled ``desc``. A callable receives
        ``(done, total)`` on every report.
    total : int
        Units of work of the whole call.
    desc, unit : str
        Title and unit of the bar.
    """
    if callable(progress) and not isinstance(progress, (bool, np.bool_)):
        yield lambda done: progress(int(done), int(total))
        return
    if not progress:
        yield lambda done: None
        return
    from tqdm.auto import tqdm  # lazy: only when a bar is asked for

    bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
    shown = [0]

    def report(done: int) -> None:
        done = int(min(done, total))
        if done > shown[0]:
            bar.update(done - shown[0])
            shown[0] = done

    try:
        yield report
    finally:
        bar.close()
