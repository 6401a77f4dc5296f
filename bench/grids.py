"""Parameter grids: cartesian expansion and the per-method grid files given with ``--config``.

A grid file is YAML or JSON mapping a method name to its build and search grids, in the spirit
of ann-benchmarks' ``arg_groups`` (built once each) and ``query_args`` (swept per built index)::

    hnswlib:
      build: {M: [16, 32], ef_construction: [200]}
      search: {ef: [10, 20, 40, 80, 160, 320]}
    faiss-ivf:
      build: {nlist: [400]}
      search: {nprobe: [1, 4, 16, 64]}

``build`` may also be a list of such mappings (groups expanded one after the other). A single
value stands for a one-element list. A method missing from the file, or missing one of the two
keys, keeps its own default for what is missing. Files shipped with the package
(``configs/<name>.yml``) can be named without path or suffix, e.g. ``--config quick``.
"""

from __future__ import annotations

import itertools
import json
import os
from importlib import resources
from typing import Any, Mapping

__all__ = ["expand", "normalise_grid", "load_grids", "packaged_configs"]


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def expand(grid: Mapping[str, Any] | list | None) -> list[dict]:
    """All combinations of a grid, in order, the last parameter varying fastest.

    Parameters
    ----------
    grid : mapping of name to list of values, list of such mappings, or None
        Lists are ordered cheap to expensive by convention, so the expansion keeps that order
        for the first parameter.

    Returns
    -------
    list of dict
        ``[{}]`` for an empty or missing grid: one run with no parameters.
    """
    if grid is None:
        return [{}]
    if isinstance(grid, list):
        return [combo for group in grid for combo in expand(group)]
    if not isinstance(grid, Mapping):
        raise ValueError(f"a grid must be a mapping of parameter to values; got {grid!r}")
    names = list(grid)
    values = [_as_list(grid[name]) for name in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def normalise_grid(method: str, entry: Any) -> dict:
    """Check one method's entry of a grid file and return ``{"build": ..., "search": ...}``."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"config for {method!r} must map 'build'/'search' to grids; got {entry!r}")
    unknown = set(entry) - {"build", "search"}
    if unknown:
        raise ValueError(
            f"config for {method!r} has unknown key(s) {sorted(unknown)}; accepted: build, search"
        )
    out = {}
    for key in ("build", "search"):
        if key in entry:
            expand(entry[key])  # fail early on a malformed grid
            out[key] = entry[key]
    return out


def packaged_configs() -> list[str]:
    """Names of the grid files shipped in ``annlib.bench/configs``."""
    folder = resources.files("annlib.bench") / "configs"
    if not folder.is_dir():
        return []
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".yml"))


def _read_text(source: str) -> tuple[str, str]:
    """Text of a grid file given as a path or as the name of a packaged file."""
    if os.path.exists(source):
        with open(source, encoding="utf-8") as fh:
            return fh.read(), source
    name = source[:-4] if source.endswith(".yml") else source
    packaged = resources.files("annlib.bench") / "configs" / f"{name}.yml"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8"), f"annlib.bench/configs/{name}.yml"
    raise ValueError(
        f"config {source!r} is neither a file nor a packaged config "
        f"(packaged: {', '.join(packaged_configs()) or 'none'})"
    )


def load_grids(source: str) -> tuple[dict[str, dict], str]:
    """Read a grid file (YAML or JSON, by content).

    Parameters
    ----------
    source : str
        A path, or the name of a packaged config.

    Returns
    -------
    grids : dict
        ``{method: {"build": grid, "search": grid}}`` (either key may be absent).
    origin : str
        Where the file came from, for the record.
    """
    text, origin = _read_text(source)
    if origin.endswith(".json"):
        data = json.loads(text)
    else:
        import yaml  # YAML is a superset of JSON, so this also reads JSON files

        data = yaml.safe_load(text)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{origin}: expected a mapping of method name to grids")
    return {str(m): normalise_grid(str(m), e) for m, e in data.items()}, origin
