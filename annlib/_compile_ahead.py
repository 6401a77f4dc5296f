"""Compile a family's search kernels in other processes while this one compiles its build.

The first build of a family on a machine compiles its numba kernels (seconds each; numba holds
one compiler lock per process, so one process compiles one kernel at a time). A build with the
self-tune runs two groups of kernels one after the other: the build's (insertion, clustering,
encoding) and then the search's (the tuner's searches, batch searches, the one-query kernel).
The second group does not depend on the first: a child process compiles it on another core, in
two stages (:data:`STAGE_MANY`: the tuner and batch searches; :data:`STAGE_ALL`: one and a few
queries), from the smallest valid index the family can make without a build
(``Index._compile_ahead_index``; the child first runs the build's kernels that need no trained
state, such as HNSW's reverse edges and renumbering), and writes numba's cache. This
process finds the kernels there when it reaches them (numba looks in its cache before compiling
a new signature, callees included) and, at the first call that needs a stage, waits until the
child reports it (:func:`wait`) instead of compiling the same kernels itself.

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
import select
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["start", "wait", "ready", "pending", "run_ahead_calls", "main", "WAIT_LIMIT_S", "STAGE_MANY", "STAGE_ALL"]

# Longest a search waits for the child; past it this process compiles what it needs itself.
WAIT_LIMIT_S = 120.0
_ENV_SWITCH = "ANNLIB_COMPILE_AHEAD"

# The two stages of compilation (see run_ahead_calls); a child reports "stage N" on its standard
# output when its kernels of stage N are compiled.
STAGE_MANY, STAGE_ALL = 1, 2
_children: list = []  # _Child objects of the children still followed
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
    """Start the child that compiles ``index``'s search kernels, if it can help.

    One child for both stages: a child per stage measured 1.5x the CPU time (each compiles the
    callees both stages share, and three processes then share two cores), and slower.

    Parameters
    ----------
    index : Index
        The index about to be built (its family, metric and build parameters are used).
    n, dim : int
        Size of the data being built (a family may compile different kernels by size).

    Returns
    -------
    bool
        Whether a child was started. Never raises: on any failure nothing is started.
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
            if any(child.family == family for child in _children):  # one per family at a time
                return False
            stages = (STAGE_MANY, STAGE_ALL)
            process = subprocess.Popen(
                [sys.executable, "-m", "annlib.warmup", "--spec", json.dumps({**spec, "stages": stages})],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            _children.append(_Child(family, stages, process))
            pending = True
    except Exception:
        return False
    return True


class _Child:
    """A child process, the stages it compiles, and the last one it reported done."""

    def __init__(self, family: str, stages: tuple[int, ...], process: subprocess.Popen):
        self.family, self.stages, self.process = family, stages, process
        self.reached = 0

    def follow(self, stage: int, deadline: float) -> None:
        """Read the child's "stage N" lines until it reports ``stage``, exits, or time is up."""
        while self.reached < stage:
            left = max(0.0, deadline - time.monotonic())  # 0: only what has arrived already
            if not select.select([self.process.stdout], [], [], left)[0]:
                return
            line = self.process.stdout.readline()
            if not line:  # exited (done or failed): nothing more will come
                self.reached = STAGE_ALL
                return
            if line.startswith(b"stage "):
                self.reached = max(self.reached, int(line.split()[1]))

    def reap(self, deadline: float) -> bool:
        """Collect the exited process (True), or False while it still runs."""
        if self.reached < max(self.stages) and self.process.poll() is None:
            return False
        try:
            self.process.stdout.close()
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:
            return False  # reported everything but has not exited yet: collected next time
        return True


def ready(family: str, stage: int) -> bool:
    """Whether ``family``'s kernels of stage ``stage`` are compiled (or no child compiles them):
    :func:`wait` without waiting. Never raises."""
    now = time.monotonic()
    with _lock:
        for child in _children:
            wanted = min(stage, max(child.stages))
            if child.family == family and min(child.stages) <= wanted:
                try:
                    child.follow(wanted, now)
                except Exception:
                    child.reached = STAGE_ALL
                if child.reached < wanted:
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
        for child in list(_children):
            if family is None or child.family == family:
                wanted = max(child.stages) if family is None else min(stage, max(child.stages))
                if min(child.stages) <= wanted:
                    try:
                        child.follow(wanted, deadline)
                    except Exception:
                        child.reached = STAGE_ALL  # cannot follow it: wait for it no longer
            if child.reap(deadline):
                _children.remove(child)
        pending = bool(_children)


def run_ahead_calls(index: Any, stages: tuple[int, ...] = (STAGE_MANY, STAGE_ALL), seed: int = 0,
                    report=lambda stage: None) -> None:
    """The calls whose kernels the children compile: what a build's self-tune and a user's first
    searches run on ``index``. Stage :data:`STAGE_MANY`: the tuner (its exact ground truth and
    searches of many queries) and a batch search; :data:`STAGE_ALL`: searches of a few queries
    and of one. ``report(stage)`` follows each stage. Each call's errors are ignored: only the
    compilation matters here."""
    import numpy as np

    from .tune.auto import _tune_defaults

    X = index._vectors_at(np.arange(min(len(index), 64), dtype=np.int64))
    Q = np.ascontiguousarray(X[:40] + np.float32(1e-3), dtype=np.float32)
    k = min(10, len(index))
    calls = {STAGE_MANY: (lambda: _tune_defaults(index, Q, None, 0.9, k, seed, held_out=True),
                          lambda: index.search(Q, k), lambda: index.exact_search(Q, k)),
             STAGE_ALL: (lambda: index.search(np.ascontiguousarray(Q[0]), k), lambda: index.search(Q[:2], k))}
    for stage in stages:
        for call in calls[stage]:
            try:
                call()
            except Exception:
                pass
        report(stage)


def _compile_from_spec(spec: dict[str, Any]) -> None:
    import numpy as np

    from .api import get_family

    cls = get_family(spec["family"])
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, max(2, min(int(spec["dim"]), 16)))).astype(np.float32)
    stages = tuple(int(s) for s in spec["stages"])
    # the build's own kernels the family can compile without a build go to the first stage's child
    index = cls._compile_ahead_index(X, spec["metric"], spec["params"], (int(spec["n"]), int(spec["dim"])),
                                     with_build_kernels=STAGE_MANY in stages)
    if index is not None:
        run_ahead_calls(index, stages, report=lambda stage: print(f"stage {stage}", flush=True))


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
