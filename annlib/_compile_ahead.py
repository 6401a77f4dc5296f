"""Compile a family's search kernels in other processes while this one compiles its build.

The first build of a family on a machine compiles its numba kernels (seconds each; numba holds
one compiler lock per process, so one process compiles one kernel at a time). A build with the
self-tune runs two groups of kernels one after the other: the build's (insertion, clustering,
encoding) and then the search's (the tuner's searches, batch searches, the one-query kernel).
The second group does not depend on the first: two child processes compile it on the other
cores, one per stage (:data:`STAGE_MANY`: the tuner and batch searches; :data:`STAGE_ALL`: one
and a few queries), from the smallest valid index the family can make without a build
(``Index._compile_ahead_index``; the first child also runs the build's kernels that need no
trained state, such as HNSW's reverse edges and renumbering), and write numba's cache. This
process finds the kernels there when it reaches them (numba looks in its cache before compiling
a new signature, callees included) and, at the first call that needs a stage, waits for that
stage's child (:func:`wait`) instead of compiling the same kernels itself.

It runs only when it can help: the build's kernels are not cached yet (the notice of
:mod:`annlib._compile_notice` is issued), the process may use two or more CPUs, numba's JIT is
enabled, and ``ANNLIB_COMPILE_AHEAD`` is not ``0``. A child that fails or is slow changes nothing
but time: this process then compiles what it still needs itself. The children write nothing but
numba's cache and exit; one still running when this process ends finishes on its own.

The children run ``python -m annlib.warmup --spec ...``; run by hand, ``python -m annlib.warmup
[family ...]`` compiles whole families for later processes (:func:`main`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["start", "wait", "pending", "run_ahead_calls", "main", "WAIT_LIMIT_S", "STAGE_MANY", "STAGE_ALL"]

# Longest a search waits for the child; past it this process compiles what it needs itself.
WAIT_LIMIT_S = 120.0
_ENV_SWITCH = "ANNLIB_COMPILE_AHEAD"

# The two stages, each compiled by a child of its own (see run_ahead_calls).
STAGE_MANY, STAGE_ALL = 1, 2
_children: dict[tuple[str, int], subprocess.Popen] = {}  # (family, stage) -> its child
_lock = threading.Lock()
# Read by the search paths on every call: a plain module attribute, true while a child runs.
pending = False


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _enabled() -> bool:
    if os.environ.get(_ENV_SWITCH, "1").strip() == "0":
        return False
    if "python" not in os.path.basename(sys.executable or "").lower():
        return False  # an embedding program, not an interpreter that can run `-m annlib.warmup`
    if _usable_cpus() < 2:
        return False  # one core: the child would only take turns with this process
    try:
        from numba.core import config as numba_config
    except ImportError:  # pragma: no cover - numba is a core dependency
        return False
    return not numba_config.DISABLE_JIT


def _json_params(params: dict[str, Any]) -> dict[str, Any]:
    """The build parameters the child can receive (seeds and objects are left out: the
    kernels' argument types do not depend on them)."""
    out = {}
    for key, value in params.items():
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value
    return out


def start(index: Any, n: int, dim: int) -> bool:
    """Start the children that compile ``index``'s search kernels, if they can help.

    Two children, one per stage (see :func:`run_ahead_calls`), so that the build, the tuner's
    kernels and the one-query kernels compile side by side.

    Parameters
    ----------
    index : Index
        The index about to be built (its family, metric and build parameters are used).
    n, dim : int
        Size of the data being built (a family may compile different kernels by size).

    Returns
    -------
    bool
        Whether children were started. Never raises: on any failure nothing is started.
    """
    global pending
    family = getattr(index, "family", None)
    if not family or not getattr(index, "compiles_ahead", False) or not _enabled():
        return False
    try:
        spec = {"family": family, "metric": index.metric, "params": _json_params(index.params),
                "n": int(n), "dim": int(dim)}
        env = {**os.environ, _ENV_SWITCH: "0"}
        # the children import this very copy of annlib, wherever it was imported from
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        with _lock:
            if any(name == family for name, _ in _children):
                return False
            for stage in (STAGE_MANY, STAGE_ALL):
                _children[(family, stage)] = subprocess.Popen(
                    [sys.executable, "-m", "annlib.warmup", "--spec", json.dumps({**spec, "stage": stage})],
                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            pending = True
    except Exception:
        return False
    return True


def wait(family: str | None = None, stage: int = 2, limit_s: float = WAIT_LIMIT_S) -> None:
    """Wait (at most ``limit_s`` seconds) until ``family``'s kernels of stage ``stage`` are
    compiled: :data:`STAGE_MANY`, those of searches of many queries and of the tuner;
    :data:`STAGE_ALL`, also those of one and of a few queries.

    ``None`` waits for every child. Finished children are reaped on the way; one still running
    at the limit is left running (this process then compiles what it still needs). Never raises.
    """
    global pending
    deadline = time.monotonic() + limit_s
    with _lock:
        for key, child in list(_children.items()):
            if family is None or (key[0] == family and key[1] <= stage):
                try:
                    child.wait(timeout=max(0.0, deadline - time.monotonic()))
                except Exception:
                    continue  # too slow: keep it, wait for it no longer in this call
            if child.poll() is not None:
                del _children[key]
        pending = bool(_children)


def run_ahead_calls(index: Any, stage: int | None = None, seed: int = 0) -> None:
    """The calls whose kernels the children compile: what a build's self-tune and a user's first
    searches run on ``index``. Stage :data:`STAGE_MANY`: the tuner (its exact ground truth and
    searches of many queries) and a batch search; :data:`STAGE_ALL`: searches of a few queries
    and of one; None: both. Each call's errors are ignored: only the compilation matters here."""
    import numpy as np

    from .tune.auto import _tune_defaults

    X = index._vectors_at(np.arange(min(len(index), 64), dtype=np.int64))
    Q = np.ascontiguousarray(X[:40] + np.float32(1e-3), dtype=np.float32)
    k = min(10, len(index))
    calls = {STAGE_MANY: (lambda: _tune_defaults(index, Q, None, 0.9, k, seed, held_out=True),
                          lambda: index.search(Q, k), lambda: index.exact_search(Q, k)),
             STAGE_ALL: (lambda: index.search(np.ascontiguousarray(Q[0]), k), lambda: index.search(Q[:2], k))}
    for s in (STAGE_MANY, STAGE_ALL) if stage is None else (stage,):
        for call in calls[s]:
            try:
                call()
            except Exception:
                pass


def _compile_from_spec(spec: dict[str, Any]) -> None:
    import numpy as np

    from .api import get_family

    cls = get_family(spec["family"])
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, max(2, min(int(spec["dim"]), 16)))).astype(np.float32)
    stage = int(spec["stage"])
    # the build's own kernels the family can compile without a build go to the first child
    index = cls._compile_ahead_index(X, spec["metric"], spec["params"], (int(spec["n"]), int(spec["dim"])),
                                     with_build_kernels=stage == STAGE_MANY)
    if index is not None:
        run_ahead_calls(index, stage)


def main(argv: list[str] | None = None) -> int:
    """``python -m annlib.warmup [family ...]``: compile and cache families' kernels (all by
    default); ``--spec JSON`` is a child's stage (:func:`start`). Returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--spec"]:
        _compile_from_spec(json.loads(argv[1]))
        return 0
    import warnings

    import numpy as np

    import annlib

    names = argv or annlib.families()
    X = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    failed = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", annlib.CompilationNotice)  # compiling is the point here
                index = annlib.Index.build(X, method=name)
                index.search(X[:8], 10)
                index.search(X[:2], 10)
                index.search(X[0], 10)
        except Exception as exc:  # a family that needs more than vectors, or an unknown name
            print(f"{name}: not compiled ({type(exc).__name__}: {exc})", flush=True)
            failed += 1
            continue
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if failed == len(names) else 0
