"""When the walk on 8-bit codes loses recall: ``sq8_relative_noise`` against recall on synthetic sets.

Calibrates HNSW's ``walk="auto"`` threshold (``HNSW._SQ8_MAX_RELATIVE_NOISE``). For each
distribution, 20,000 x 64 vectors (seed 1) and 200 queries near indexed vectors (an indexed
vector plus N(0, 0.1) noise, then removed from the index) are searched on two graphs built alike
(M=16, ``default_recall=None``), one walking the float32 vectors and one the codes; the table
gives the codes' relative noise and recall@10 against exact ground truth at ef 16 / 32 / 64.

    python -m bench.sq8_noise [--n 20000] [--d 64]
"""

from __future__ import annotations

import argparse

import numpy as np

__all__ = ["main"]

K = 10
EFS = (16, 32, 64)


def _sets(n: int, d: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"Gaussian": rng.standard_normal((n, d)),
            "Student-t, 5 dof": rng.standard_t(5, (n, d)),
            "Student-t, 3 dof": rng.standard_t(3, (n, d)),
            "Student-t, 2.5 dof": rng.standard_t(2.5, (n, d)),
            "lognormal, sigma 1.5": rng.lognormal(0, 1.5, (n, d)),
            "Student-t, 2 dof": rng.standard_t(2, (n, d)),
            "Student-t, 1.5 dof": rng.standard_t(1.5, (n, d))}


def _recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(ids, truth)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--d", type=int, default=64)
    args = p.parse_args(argv)

    import annlib
    from annlib.kernels.graph_sq8 import sq8_fit, sq8_relative_noise

    print("| data | relative noise | float walk, ef " + " / ".join(map(str, EFS)) + " | walk on codes |")
    print("|---|---:|---|---|")
    for name, raw in _sets(args.n, args.d).items():
        raw = raw.astype(np.float32)
        rng = np.random.default_rng(2)
        Q = raw[:200] + rng.normal(0, 0.1, (200, args.d)).astype(np.float32)
        X = np.ascontiguousarray(raw[200:])
        truth = annlib.BruteForce().build(X).search(Q, K).ids
        noise = sq8_relative_noise(X, *sq8_fit(X))
        cells = []
        for walk in ("float", "sq8"):
            index = annlib.HNSW(M=16, walk=walk, finger=False, default_recall=None).build(X, progress=False)
            cells.append(" / ".join(f"{_recall(index.search(Q, K, ef=ef).ids, truth):.3f}" for ef in EFS))
        print(f"| {name} | {noise:.2g} | {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
