"""Top-k KV-cache attention against full attention: time per ``attend`` and quality, per selector.

For each cache length, head dimension, selector and budget (a fraction of the cache) it measures,
on one thread:

* time per :meth:`annlib.attention.KVCache.attend` call (selector structures built beforehand;
  their build time is reported apart), and the same for full attention in float32 numpy (BLAS
  scores, softmax, BLAS weighted sum: the fast reference) and in JAX (jitted), and the JAX top-k
  path (:func:`annlib.accel.attention.attend`);
* attention-mass recall, key recall against exact top-k at the same budget, output error against
  full attention and against exact top-k, and the mass exact top-k itself carries (per head too);
* bytes per cached token and head of each selector's structure against float keys.

Timing alternates the methods round by round and reports medians (this machine's timer jitters
between moments). Data: ``real`` keys, values and queries captured from a small causal language
model on real text (:mod:`annlib.bench.attention_data`), or ``synthetic`` keys that reproduce
their statistics (heavy-tailed norms, clusters, outlier channels).

Run::

    python -m annlib.bench.attention_bench --source real --n 8192,32768,131072 --out results/attention
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "run_cell", "numpy_full_attention"]

SELECTORS = ("exact", "approx_topk", "lut", "pages", "index")


def numpy_full_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """Full attention in float32 with BLAS: the fast reference the speed-ups are quoted against."""
    kvh = keys.shape[0]
    qh, m, d = q.shape
    g = qh // kvh
    out = np.empty((qh, m, values.shape[2]), np.float32)
    for h in range(kvh):
        Qg = q[h * g:(h + 1) * g].reshape(g * m, d)
        S = Qg @ keys[h].T
        S *= np.float32(scale)
        S -= S.max(axis=1, keepdims=True)
        np.exp(S, out=S)
        S /= S.sum(axis=1, keepdims=True)
        out[h * g:(h + 1) * g] = (S @ values[h]).reshape(g, m, -1)
    return out


def _load(source: str, n: int, d: int, kv_heads: int, query_heads: int, n_queries: int, layer: int, seed: int):
    from . import attention_data

    if source == "real":
        cap = attention_data.capture_kv(n, layer=layer, n_queries=n_queries, progress=True)
        return cap.keys, cap.values, cap.queries, f"{cap.model} layer {cap.layer}, {cap.text}"
    syn = attention_data.synthetic_kv(n, d, kv_heads=kv_heads, query_heads=query_heads, n_queries=n_queries,
                                      seed=seed)
    return syn.keys, syn.values, syn.queries, "synthetic"


def _median_times(fns: dict, rounds: int) -> dict:
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():  # alternate the methods within a round
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def run_cell(keys, values, q, *, selectors, budgets, rounds=5, window=256, sink=4, jax_too=True,
             selector_params=None):
    """Measure every selector x budget on one cache and one batch of queries.

    Returns a dict with the reference times, build times and one row per (selector, budget).
    """
    from annlib.attention import KVCache

    selector_params = selector_params or {}
    cache = KVCache(keys, values, sink=sink, window=window)
    scale = cache.scale
    builds = {}
    for s in selectors:
        t0 = time.perf_counter()
        cache.prepare(s, selector_params.get(s))
        builds[s] = time.perf_counter() - t0
    refs = {"numpy_full": lambda: numpy_full_attention(q, keys, values, scale)}
    if jax_too:
        import jax

        from annlib.accel import attention as jax_attention

        jq, jk, jv = (jax.device_put(a) for a in (q, keys, values))
        refs["jax_full"] = lambda: jax_attention.full_attention(jq, jk, jv).block_until_ready()
        for b in budgets:
            fn = (lambda b=b: jax_attention.attend(jq, jk, jv, budget=b, window=window, sink=sink)
                  .block_until_ready())
            fn()  # compile
            refs[f"jax_topk@{b}"] = fn
        refs["jax_full"]()
    rows = []
    for b in budgets:
        fns = dict(refs) if b == budgets[0] else {}
        for s in selectors:
            p = selector_params.get(s)
            cache.attend(q, budget=b, selector=s, selector_params=p)  # warm
            fns[s] = (lambda s=s, p=p: cache.attend(q, budget=b, selector=s, selector_params=p))
        times = _median_times(fns, rounds)
        if b == budgets[0]:
            ref_times = {k: v for k, v in times.items() if k in refs}
        for s in selectors:
            qual = cache.attend(q, budget=b, selector=s, selector_params=selector_params.get(s), quality=True)
            summ = qual.quality.summary()
            sparse = qual.quality.topk_mass >= 0.95  # where exact top-k at this budget holds 95 %
            rows.append({
                "selector": s, "budget": b, "keys_attended": int(qual.counts.max()),
                "ms": times[s] * 1e3,
                "speedup_vs_numpy_full": ref_times["numpy_full"] / times[s],
                "speedup_vs_jax_full": (ref_times["jax_full"] / times[s]) if jax_too else None,
                "bytes_per_token": cache.bytes_per_token(s, selector_params.get(s)),
                "build_s": builds[s],
                **summ,
                "sparse_share": float(sparse.mean()),
                "sparse_error_mean": float(qual.quality.error[sparse].mean()) if sparse.any() else None,
                "sparse_error_max": float(qual.quality.error[sparse].max()) if sparse.any() else None,
                "topk_mass_per_head": [float(x) for x in qual.quality.topk_mass.mean(axis=1)],
                "topk_error_per_head": [float(x) for x in qual.quality.topk_error.mean(axis=1)],
            })
    out = {"reference_ms": {k: v * 1e3 for k, v in ref_times.items()}, "rows": rows,
           "float_bytes_per_token": 4 * keys.shape[2]}
    return out


def _adaptive(keys, values, q, masses, window, sink, selector):
    from annlib.attention import KVCache

    cache = KVCache(keys, values, sink=sink, window=window)
    cache.prepare(selector)
    rows = []
    for mass in masses:
        cache.attend(q, mass=mass, selector=selector)
        t0 = time.perf_counter()
        res = cache.attend(q, mass=mass, selector=selector, details=True)
        ms = (time.perf_counter() - t0) * 1e3
        qual = cache.attend(q, mass=mass, selector=selector, quality=True).quality
        rows.append({"mass": mass, "selector": selector, "ms": ms,
                     "mean_keys": float(res.counts.mean()), "max_keys": int(res.counts.max()),
                     "estimated_mass": float(res.estimated_mass.mean()),
                     "mass_recall": float(qual.mass_recall.mean()), "error": float(qual.error.mean()),
                     "error_p90": float(np.quantile(qual.error, 0.9))})
    return rows


def _table(cell: dict) -> str:
    lines = ["| selector | budget | keys | ms / attend | × numpy full | × JAX full | mass recall | key recall "
             "| error vs full | error vs exact top-k | exact top-k error | sparse queries: share, max error "
             "| bytes/token |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in cell["rows"]:
        jx = "–" if r["speedup_vs_jax_full"] is None else f"{r['speedup_vs_jax_full']:.1f}"
        lines.append(
            f"| {r['selector']} | {r['budget']:.0%} | {r['keys_attended']} | {r['ms']:.2f} | "
            f"{r['speedup_vs_numpy_full']:.1f} | {jx} | {r['mass_recall']:.3f} | {r['key_recall']:.3f} | "
            f"{r['error']:.3f} | {r['error_vs_topk']:.3f} | {r['topk_error']:.3f} | "
            f"{r['sparse_share']:.2f}, {'–' if r['sparse_error_max'] is None else format(r['sparse_error_max'], '.3f')} | "
            f"{r['bytes_per_token']:.1f} |")
    refs = ", ".join(f"{k} {v:.2f} ms" for k, v in cell["reference_ms"].items())
    return "\n".join(lines) + f"\n\nReferences: {refs}; float keys {cell['float_bytes_per_token']} bytes/token.\n"


def per_head_table(report: dict) -> str:
    """Markdown: the softmax mass exact top-k carries per query head, per cache length and budget."""
    lines = []
    for cell in report["cells"]:
        rows = [r for r in cell["rows"] if r["selector"] == cell["rows"][0]["selector"]]
        heads = len(rows[0]["topk_mass_per_head"])
        lines.append(f"n = {cell['n']:,}, d = {cell['d']} ({cell['data']}): mass of the exact top keys per query head")
        lines.append("")
        lines.append("| budget | " + " | ".join(f"h{h}" for h in range(heads)) + " |")
        lines.append("|---|" + "---|" * heads)
        for r in rows:
            lines.append(f"| {r['budget']:.0%} | " + " | ".join(f"{m:.2f}" for m in r["topk_mass_per_head"]) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m annlib.bench.attention_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--source", choices=("real", "synthetic"), default="synthetic")
    ap.add_argument("--n", default="8192,32768,131072", help="cache lengths, comma separated")
    ap.add_argument("--dim", default="64", help="head dimensions (synthetic only; real keys have the model's)")
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--query-heads", type=int, default=9)
    ap.add_argument("--queries", type=int, default=1, help="decoding queries per head (m)")
    ap.add_argument("--layer", type=int, default=15, help="captured layer (real)")
    ap.add_argument("--budgets", default="0.01,0.02,0.05")
    ap.add_argument("--selectors", default=",".join(SELECTORS))
    ap.add_argument("--masses", default="0.9,0.95", help="adaptive-budget targets ('' to skip)")
    ap.add_argument("--window", type=int, default=0,
                    help="recent tokens always kept (0: the budget is all retrieved but the sink)")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/attention")
    ap.add_argument("--summarize", metavar="JSON", help="print the per-head mass tables of a finished run and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        print(per_head_table(json.loads(Path(args.summarize).read_text())))
        return 0

    import annlib

    annlib.set_num_threads(1)
    budgets = [float(b) for b in args.budgets.split(",")]
    selectors = [s for s in args.selectors.split(",") if s]
    masses = [float(m) for m in args.masses.split(",") if m]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import sys

    given = sys.argv[1:] if argv is None else list(argv)
    report = {"command": "python -m annlib.bench.attention_bench " + " ".join(given),
              "load_before": os.getloadavg(), "cells": []}
    md = []
    for d in [int(x) for x in args.dim.split(",")]:
        for n in [int(x) for x in args.n.split(",")]:
            # 16 decoding queries are captured (one cache file per length); the first m are used:
            # the first is the token right after the cache
            keys, values, q_all, what = _load(args.source, n, d, args.kv_heads, args.query_heads,
                                              max(args.queries, 16), args.layer, args.seed)
            q = np.ascontiguousarray(q_all[:, :args.queries])
            t0 = time.perf_counter()
            cell = run_cell(keys, values, q, selectors=selectors, budgets=budgets, rounds=args.rounds,
                            window=args.window, sink=args.sink, jax_too=not args.no_jax)
            cell.update({"n": n, "d": keys.shape[2], "kv_heads": keys.shape[0], "query_heads": q.shape[0],
                         "queries_per_head": q.shape[1], "data": what, "seconds": time.perf_counter() - t0})
            if masses:
                cell["adaptive"] = _adaptive(keys, values, q, masses, args.window, args.sink, "lut")
            report["cells"].append(cell)
            head = (f"### n = {n:,}, d = {keys.shape[2]}, {keys.shape[0]} KV heads, {q.shape[0]} query heads × "
                    f"{q.shape[1]} queries ({what})")
            md.append(head + "\n\n" + _table(cell))
            if masses:
                md.append("Adaptive budget (selector lut): " + "; ".join(
                    f"mass={a['mass']}: {a['mean_keys']:.0f} keys on average (max {a['max_keys']}), "
                    f"estimated {a['estimated_mass']:.3f} / measured {a['mass_recall']:.3f} mass, "
                    f"error {a['error']:.3f} (p90 {a['error_p90']:.3f}), {a['ms']:.2f} ms"
                    for a in cell["adaptive"]) + "\n")
            print(md[-2] if masses else md[-1], flush=True)
            if masses:
                print(md[-1], flush=True)
            (out_dir / f"attention-{args.source}.json").write_text(json.dumps(report, indent=1))
    report["load_after"] = os.getloadavg()
    (out_dir / f"attention-{args.source}.json").write_text(json.dumps(report, indent=1))
    (out_dir / f"attention-{args.source}.md").write_text("\n".join(md))
    print(f"load average before {report['load_before']}, after {report['load_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
