"""TPU-KNN throughput: GFLOP/s against a plain JAX matmul, and how QPS grows with size and batch.

Two measurements the recall/QPS harness (``annlib-bench``) does not make::

    python -m annlib.bench.tpuknn_flops flops --dataset glove-50-angular-200k
    python -m annlib.bench.tpuknn_flops scaling --sizes 10000,100000,1000000 --batches 1,64,1000

``flops`` times one whole batch search (scoring + selection + re-scoring, queries as the user
passes them) and, in the same run and interleaved with it, three references of the same shape
``q x n x d``: a plain JAX float32 matmul ``Q @ X.T`` (in query blocks of at most 64 MiB of
output, as one would compute a score matrix), the same product in numpy (BLAS), and the matmul
alone inside the search's own blocking (query chunks x database blocks, each block's product
consumed by one elementwise maximum so the compiler cannot drop it). GFLOP/s counts the
``2*q*n*d`` operations of the score matrix for every method.

``scaling`` searches generated Gaussian vectors: QPS of TPUKNN, annlib BruteForce and faiss
IndexFlat as the database grows (fixed batch), and of TPUKNN as the batch grows (fixed database),
with TPUKNN's recall@k against BruteForce.

Timings are the best of several interleaved rounds after a warm-up (compilation excluded). JAX
uses all cores of its CPU backend; numpy, numba and faiss get the same count (``--threads``,
default all).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np

__all__ = ["main", "flops_rows", "scaling_rows"]


def _interleaved_best(fns: dict, rounds: int) -> dict:
    """Best wall time of each callable, calling them in turn ``rounds`` times (after a warm-up)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _normalise(x):
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30), np.float32)


def _jax_references(X: np.ndarray, Q: np.ndarray):
    """(plain matmul, matmul in the search's blocking) as callables on prepared data."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from annlib.accel.buckets import MAX_QUERY_BUCKET, block_rows

    n, d = X.shape
    xj = jax.device_put(X)
    plain = jax.jit(lambda a, b: a @ b.T)
    rows = max(1, min(len(Q), (64 << 20) // (4 * n)))
    q_blocks = [jax.device_put(Q[lo:lo + rows]) for lo in range(0, len(Q), rows)]

    def run_plain():
        jax.block_until_ready([plain(qb, xj) for qb in q_blocks])

    block = block_rows(n, d)
    nb = n // block  # whole blocks only; the FLOP count below uses nb * block rows
    xb = jax.device_put(X[: nb * block].reshape(nb, block, d))

    @jax.jit
    def blocked(qc, xb):
        def body(j, acc):
            return jnp.maximum(acc, qc @ xb[j].T)
        return lax.fori_loop(0, xb.shape[0], body, jnp.full((qc.shape[0], block), -jnp.inf, jnp.float32))

    chunks = [jax.device_put(Q[lo:lo + MAX_QUERY_BUCKET]) for lo in range(0, len(Q), MAX_QUERY_BUCKET)]

    def run_blocked():
        jax.block_until_ready([blocked(c, xb) for c in chunks])

    return run_plain, run_blocked, nb * block / n


def flops_rows(dataset: str, recall_targets, k: int, rounds: int, queries: int | None) -> list[dict]:
    """Measure one data set: a row per recall target."""
    import annlib
    from annlib.datasets import load

    from .measures import canonical_metric, recall_at_k, true_kth_distances

    ds = load(dataset)
    metric = canonical_metric(ds.metric)
    train = np.ascontiguousarray(ds.train, np.float32)
    test = np.ascontiguousarray(ds.test if queries is None else ds.test[:queries], np.float32)
    kth = true_kth_distances(k, distances=ds.distances[: len(test)])
    X, Q = (train, test) if metric == "l2" else (_normalise(train), _normalise(test))
    n, d = X.shape
    q = len(Q)
    flop = 2.0 * q * n * d
    run_plain, run_blocked, blocked_share = _jax_references(X, Q)
    index = annlib.TPUKNN.build(train, metric=metric)
    out = []
    for r in recall_targets:
        ids = index.search(test, k, recall_target=r).ids
        recall = recall_at_k(ids, train, test, kth, metric, k)
        t = _interleaved_best({
            "search": lambda: index.search(test, k, recall_target=r),
            "plain": run_plain,
            "numpy": lambda: [Q[lo:lo + 256] @ X.T for lo in range(0, q, 256)],
            "blocked": run_blocked,
        }, rounds)
        g = {name: flop / sec / 1e9 for name, sec in t.items()}
        g["blocked"] *= blocked_share
        out.append({"dataset": ds.name, "n": n, "d": d, "q": q, "recall_target": r, "recall": recall,
                    "seconds": t["search"], "qps": q / t["search"], "gflops": g["search"],
                    "plain": g["plain"], "numpy": g["numpy"], "blocked": g["blocked"]})
    return out


def scaling_rows(sizes, batches, dim: int, k: int, recall_target: float, rounds: int,
                 batch_n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """QPS vs database size (batch of ``max(batches)`` queries) and vs batch size (``batch_n``)."""
    import annlib

    try:
        import faiss
    except ImportError:  # pragma: no cover - optional baseline
        faiss = None
    g = np.random.default_rng(seed)
    q_max = max(batches)
    Q = g.standard_normal((max(q_max, 1000), dim), dtype=np.float32)
    by_size, by_batch = [], []
    for n in sorted(set(sizes) | {batch_n}):
        X = g.standard_normal((n, dim), dtype=np.float32)
        index = annlib.TPUKNN.build(X, recall_target=recall_target)
        exact = annlib.BruteForce.build(X)
        Qs = Q[:1000]
        truth = exact.search(Qs, k).ids
        found = index.search(Qs, k).ids
        recall = np.mean([len(set(a) & set(b)) for a, b in zip(found, truth)]) / k
        if n in sizes:
            fns = {"tpuknn": lambda: index.search(Qs, k), "bruteforce": lambda: exact.search(Qs, k)}
            if faiss is not None:
                flat = faiss.IndexFlatL2(dim)
                flat.add(X)
                fns["faiss-flat"] = lambda: flat.search(Qs, k)
            t = _interleaved_best(fns, rounds)
            by_size.append({"n": n, "q": len(Qs), "recall": recall,
                            **{name: len(Qs) / sec for name, sec in t.items()}})
        if n == batch_n:
            for b in batches:
                Qb = Q[:b]
                t = _interleaved_best({"tpuknn": lambda: index.search(Qb, k),
                                       "bruteforce": lambda: exact.search(Qb, k)}, rounds)
                by_batch.append({"n": n, "batch": b, **{name: b / sec for name, sec in t.items()}})
        del index, exact
    return by_size, by_batch


def _header(command: str) -> str:
    import jax

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return (f"command: `{command}`\n\n"
            f"jax {jax.__version__} on {len(jax.devices())} {jax.devices()[0].platform} device(s); "
            f"{os.cpu_count()} cores; load average at the end {load}\n")


def _flops_table(rows) -> str:
    lines = ["| data set | n | d | q | recall_target | recall@10 | QPS | search GFLOP/s | "
             "plain JAX matmul GFLOP/s | fraction | numpy matmul GFLOP/s | blocked JAX matmul "
             "GFLOP/s | fraction of blocked |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['n']:,} | {r['d']} | {r['q']:,} | {r['recall_target']} | "
            f"{r['recall']:.4f} | {r['qps']:,.0f} | {r['gflops']:.1f} | {r['plain']:.1f} | "
            f"{r['gflops'] / r['plain']:.2f} | {r['numpy']:.1f} | {r['blocked']:.1f} | "
            f"{r['gflops'] / r['blocked']:.2f} |")
    return "\n".join(lines)


def _scaling_tables(by_size, by_batch) -> str:
    names = [c for c in ("tpuknn", "bruteforce", "faiss-flat") if by_size and c in by_size[0]]
    out = ["QPS vs database size (batch of %d queries)\n" % (by_size[0]["q"] if by_size else 0),
           "| n | TPUKNN recall@10 | " + " | ".join(f"{c} QPS" for c in names) + " | TPUKNN / best other |",
           "|---:|---:|" + "---:|" * len(names) + "---:|"]
    for r in by_size:
        other = max(r[c] for c in names if c != "tpuknn")
        out.append(f"| {r['n']:,} | {r['recall']:.4f} | " + " | ".join(f"{r[c]:,.0f}" for c in names)
                   + f" | {r['tpuknn'] / other:.2f} |")
    if by_batch:
        out += ["", f"QPS vs batch size (n = {by_batch[0]['n']:,})\n",
                "| batch | TPUKNN QPS | BruteForce QPS | ratio |", "|---:|---:|---:|---:|"]
        for r in by_batch:
            out.append(f"| {r['batch']:,} | {r['tpuknn']:,.0f} | {r['bruteforce']:,.0f} | "
                       f"{r['tpuknn'] / r['bruteforce']:.2f} |")
    return "\n".join(out)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m annlib.bench.tpuknn_flops", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("flops", help="GFLOP/s of a whole batch search vs a plain matmul")
    f.add_argument("--dataset", default="glove-50-angular-200k")
    f.add_argument("--recall-targets", default="0.95", help="comma-separated (default: 0.95)")
    f.add_argument("--queries", type=int, default=None, help="first N test queries (default: all)")
    s = sub.add_parser("scaling", help="QPS vs database size and vs batch size, generated data")
    s.add_argument("--sizes", default="10000,30000,100000,300000,1000000")
    s.add_argument("--batches", default="1,8,64,512,1000,4096")
    s.add_argument("--batch-n", type=int, default=100_000, help="database size of the batch sweep")
    s.add_argument("--dim", type=int, default=128)
    s.add_argument("--recall-target", type=float, default=0.95)
    for q in (f, s):
        q.add_argument("--k", type=int, default=10)
        q.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: 5)")
        q.add_argument("--threads", type=int, default=None,
                       help="threads for numpy/numba/faiss (default: all; JAX always uses all)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "annlib.bench.tpuknn_flops", *argv])
    from .environment import limit_threads

    threads = args.threads or os.cpu_count() or 1
    with limit_threads(threads):
        if args.what == "flops":
            rows = flops_rows(args.dataset, [float(v) for v in args.recall_targets.split(",")],
                              args.k, args.rounds, args.queries)
            print(_header(command))
            print(_flops_table(rows))
        else:
            by_size, by_batch = scaling_rows(_ints(args.sizes), _ints(args.batches), args.dim, args.k,
                                             args.recall_target, args.rounds, args.batch_n)
            print(_header(command))
            print(_scaling_tables(by_size, by_batch))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
