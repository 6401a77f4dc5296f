"""Where data sets are looked for and cached."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import List

__all__ = ["cache_dir", "shared_data_dirs", "project_root"]


def cache_dir() -> Path:
    """Folder that holds downloaded and generated data sets (not created here).

    Returns
    -------
    pathlib.Path
        ``$ANNLIB_DATA`` when set and non-empty, else ``$XDG_CACHE_HOME/annlib``, else
        ``~/.cache/annlib``.
    """
    env = os.environ.get("ANNLIB_DATA")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "annlib"


def project_root() -> Path:
    """Parent of the folder holding the installed ``annlib`` package.

    For an editable install this is the source checkout, whose sibling ``shared/data`` holds
    the team's data sets.
    """
    spec = importlib.util.find_spec("annlib")
    origin = spec.origin if spec is not None else None
    if origin:
        return Path(origin).resolve().parent.parent
    # Namespace-style install without __init__: fall back to this package's own location.
    return Path(__file__).resolve().parent.parent


def shared_data_dirs() -> List[Path]:
    """Candidate ``shared/data`` folders, existing or not, in search order, without duplicates.

    Returns
    -------
    list of pathlib.Path
        ``../shared/data`` relative to the current directory, then relative to
        :func:`project_root`.
    """
    out: List[Path] = []
    for base in (Path.cwd(), project_root()):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate not in out:
            out.append(candidate)
    return out
