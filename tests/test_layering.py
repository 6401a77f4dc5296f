"""The layering rules, read from each module's imports: kernels import only kernels, a family never
another family's internals, bench and tune no family internals, datasets nothing else of annlib;
only kernels use numba's jit; ``import annlib`` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"annlib": ROOT / "annlib", "annlib.accel": ROOT / "accel",
                "annlib.datasets": ROOT / "datasets", "annlib.bench": ROOT / "bench"}


def modules():
    for pkg, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([pkg, *parts]), path, path.name == "__init__.py"


def imported(name, path, is_pkg):
    """Absolute names of every module imported by a file (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


ALL = list(modules())


def in_pkg(mod, pkg):
    return mod == pkg or mod.startswith(pkg + ".")


@pytest.mark.parametrize("name, path, is_pkg", ALL, ids=[m[0] for m in ALL])
def test_layering(name, path, is_pkg):
    deps = {d for d in imported(name, path, is_pkg) if in_pkg(d, "annlib")}
    if in_pkg(name, "annlib.kernels"):
        assert all(in_pkg(d, "annlib.kernels") for d in deps), f"kernels import outside kernels: {deps}"
    if in_pkg(name, "annlib.indexes") and not is_pkg:
        # A family may split itself into modules sharing its name as prefix (hnsw, hnsw_finger).
        def family_of(mod):
            parts = mod.split(".")
            return parts[2].split("_")[0] if len(parts) > 2 else None

        own = family_of(name)
        others = {d for d in deps if in_pkg(d, "annlib.indexes") and family_of(d) not in (None, own)}
        assert not others, f"{name} imports another family's internals: {others}"
    if any(in_pkg(name, p) for p in ("annlib.bench", "annlib.tune", "annlib.attention", "annlib.distributed")):
        # input checks and messages come from _validation (one policy); family internals never
        bad = {d for d in deps if in_pkg(d, "annlib.indexes")}
        assert not bad, f"{name} reaches into family internals: {bad}"
    if in_pkg(name, "annlib.datasets"):
        assert all(in_pkg(d, "annlib.datasets") for d in deps), f"datasets must stand alone: {deps}"


def test_only_kernels_use_numba_jit():
    for name, path, _ in ALL:
        if not in_pkg(name, "annlib.kernels") and not in_pkg(name, "annlib.accel"):
            assert "numba.njit" not in path.read_text() and "@njit" not in path.read_text(), name


def test_plain_import_stays_light():
    code = ("import sys, annlib; heavy = [m for m in ('jax', 'h5py', 'sklearn', 'ray', 'faiss', 'hnswlib', "
            "'annlib.accel', 'annlib.datasets', 'annlib.bench') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import annlib pulled in: {out.stdout.strip()}"
