"""Compile annlib's kernels now, so that later processes load them from numba's cache.

For a container image or a deployment step, where the first user should not pay the
compilation (tens of seconds per family on one core)::

    python -m annlib.warmup                  # every family
    python -m annlib.warmup hnsw partitioned  # the named families

It builds each family on a small random set and searches it (a batch, a few queries, one query),
which compiles what a build with the defaults and its searches run. A family needing parameters
the defaults do not give is reported and skipped. Exit status 1 when no family could be compiled.
"""

from __future__ import annotations

from ._compile_ahead import main

if __name__ == "__main__":
    raise SystemExit(main())
