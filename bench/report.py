"""Results file and printed tables of a benchmark run.

The tables are Markdown, shaped like those of docs/benchmarks-hnsw.md, and start with the exact
command that produced them, so a figure quoted in the docs can always be reproduced.
"""

from __future__ import annotations

import json
import math
import os

from .pareto import RECALL_LEVELS, group_runs, ratio, summarize

__all__ = ["summaries", "choose_reference", "format_tables", "write_json", "grid_runs", "tuned_table",
           "baseline_table"]


def grid_runs(runs) -> list[dict]:
    """The sweep's records without the tuned points (``--tune``), which are judged against it."""
    return [r for r in runs if r.get("tuned_for") is None]


def choose_reference(runs, requested: str | None = None) -> tuple[str, str] | None:
    """What ratios are taken against: ``("label", name)``, ``("method", name)`` or None.

    By default the first hnswlib index (M=16 in the default grid) when
    hnswlib ran. A requested name may be an index label or a method (its best frontier over
    all builds).

    Raises
    ------
    ValueError
        When the requested name matches no run.
    """
    labels = list(group_runs(runs))
    methods = list(group_runs(runs, "method"))
    if requested is None:
        hnsw = [r["label"] for r in runs if r["method"] == "hnswlib"]
        return ("label", hnsw[0]) if hnsw else None
    if requested in labels:
        return ("label", requested)
    if requested in methods:
        return ("method", requested)
    raise ValueError(f"reference {requested!r} matches no run; indexes: {', '.join(labels)}")


def _best_of(entries: list[dict], pooled: dict) -> dict:
    """A method's figures: at each level the best of its indexes (a summary row of the benchmark pages).

    Taking the best per level rather than reading one frontier pooled over all builds keeps
    the method's figure at least as high as each of its indexes: an interpolated value is not
    a measured point, and pooling can put a point of another build between two that bracket
    the level. The pooled frontier is kept for reference.
    """
    levels = entries[0]["qps_at"]
    best = {lv: max((e["qps_at"][lv] for e in entries if e["qps_at"][lv] is not None),
                    default=None) for lv in levels}
    recalls = [e["max_recall"] for e in entries if e["max_recall"] is not None]
    return {"frontier": pooled["frontier"], "max_recall": max(recalls, default=None),
            "qps_at": best}


def summaries(runs, reference=None, modes=("batch", "single")) -> dict:
    """Per mode: frontier figures per index (label) and per method (best of its indexes).

    Each entry has ``frontier``, ``max_recall``, ``qps_at`` and, when a reference is given,
    ``ratio_at`` ({level: QPS / reference QPS at that level}).
    """
    out = {}
    runs = grid_runs(runs)
    by_label, by_method = group_runs(runs), group_runs(runs, "method")
    for mode in modes:
        labels = {label: summarize(group, mode) for label, group in by_label.items()}
        table = {
            "by_label": labels,
            "by_method": {m: _best_of([labels[l] for l in group_runs(group)],
                                      summarize(group, mode))
                          for m, group in by_method.items()},
        }
        if reference is not None:
            kind, name = reference
            ref = table["by_label" if kind == "label" else "by_method"][name]["qps_at"]
            for section in table.values():
                for entry in section.values():
                    entry["ratio_at"] = {lv: ratio(q, ref[lv]) for lv, q in entry["qps_at"].items()}
        for label, entry in table["by_label"].items():
            first = by_label[label][0]
            entry.update(method=first["method"], build_s=first["build_s"],
                         bytes_per_vector=first["bytes_per_vector"])
        out[mode] = table
    return out


def _num(value, digits=0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def _rows(table: dict, level_key: str) -> list[str]:
    rows = []
    pooled_methods = {}
    for label, e in table["by_label"].items():
        pooled_methods.setdefault(e["method"], []).append(label)
        rows.append(_row(label, e, e["build_s"], e["bytes_per_vector"], level_key))
    for method, labels in pooled_methods.items():
        if len(labels) > 1:
            e = table["by_method"][method]
            rows.append(_row(f"{method} (best of {len(labels)} builds)", e, None, None, level_key))
    return rows


def _row(name, e, build_s, bpv, level_key) -> str:
    cells = [name, _num(build_s, 2), _num(bpv, 1), _num(e["max_recall"], 4)]
    cells += [_num(q) for q in e["qps_at"].values()]
    if "ratio_at" in e:
        cells.append(_num(e["ratio_at"].get(level_key), 2))
    return "| " + " | ".join(cells) + " |"


def _blas_line(blas) -> str:
    libs = [b for b in blas if b.get("user_api") == "blas"]
    return "; ".join(f"{b.get('internal_api')} {b.get('version')} {b.get('architecture', '?')} "
                     f"({b.get('file')}, {b.get('num_threads')} threads)" for b in libs) or "none loaded"


def format_tables(doc: dict) -> str:
    """The printed report: header with the command, per-mode tables, exact-search throughput."""
    ds, k = doc["dataset"], doc["k"]
    ref = doc.get("reference")
    ref_name = ref[1] if ref else None
    level_key = f"{RECALL_LEVELS[1]:.2f}"
    lines = [
        f"## {ds['name']}  (n={ds['n']:,}, d={ds['d']}, q={ds['q']:,}, {ds['distance']}), "
        f"k={k}, threads={doc['threads']}",
        "",
        f"command: `{doc['command']}`",
        "",
        f"run {doc['started']} → {doc['finished']}, load avg start "
        f"{_load(doc['loadavg_start'])}, end {_load(doc['loadavg_end'])}; "
        f"BLAS: {_blas_line(doc['environment']['blas'])}",
    ]
    head = ["index", "build s", "B/vector", "max recall"] + [f"QPS@{lv:.2f}" for lv in RECALL_LEVELS]
    if ref_name:
        head.append(f"x-ref@{level_key}")
    for mode, table in doc["summary"].items():
        lines += ["", f"**{mode} queries** (recall@{k}; QPS interpolated on each index's Pareto "
                  "frontier, — = level never reached"
                  + (f"; x-ref = ratio to {ref_name} at the same recall" if ref_name else "") + ")",
                  "", "| " + " | ".join(head) + " |",
                  "|---|" + "---:|" * (len(head) - 1)]
        lines += _rows(table, level_key)
    for mode in doc["summary"]:
        versus = baseline_table(doc, mode)
        if versus:
            lines += ["", f"**annlib against the best baseline, {mode} queries** (QPS ÷ the fastest "
                      "baseline at the same recall, which one in brackets)", ""] + versus
    tuned = tuned_table(doc)
    if tuned:
        lines += ["", f"**tuned points** (`--tune`: tuned on queries made from the training vectors, "
                  "measured on the test queries; grid QPS = the index's own sweep frontier at the "
                  "tuned point's measured recall)", ""] + tuned
    if doc.get("flops"):
        lines += ["", "**exact search throughput** (GFLOP/s = 2·q·n·d / best batch time; matmul = "
                  "numpy float32 Q @ X.T of the same shape, same threads, same run)", "",
                  "| index | batch s | GFLOP/s | matmul GFLOP/s | fraction of matmul |",
                  "|---|---:|---:|---:|---:|"]
        for label, f in doc["flops"].items():
            lines.append(f"| {label} | {f['batch_seconds']:.4f} | {f['gflops']:.1f} | "
                         f"{f['matmul_gflops']:.1f} | {f['fraction']:.2f} |")
    if doc.get("skipped"):
        lines += [""] + [f"skipped {m}: {why}" for m, why in doc["skipped"].items()]
    if doc.get("failures"):
        lines += ["", f"{len(doc['failures'])} configuration(s) failed; see 'failures' in the JSON"]
    return "\n".join(lines)


def baseline_table(doc: dict, mode: str = "batch") -> list[str]:
    """Markdown rows: each annlib method's QPS ÷ the best baseline's at every recall level."""
    from . import adapters

    table = doc["summary"].get(mode, {}).get("by_method", {})
    baselines = {m: e for m, e in table.items() if m in adapters.BASELINES}
    ours = {m: e for m, e in table.items() if m not in adapters.BASELINES and m not in ("bruteforce",)}
    if not baselines or not ours:
        return []
    levels = list(next(iter(table.values()))["qps_at"])
    lines = ["| annlib | " + " | ".join(f"÷ best @{lv}" for lv in levels) + " |",
             "|---|" + "---:|" * len(levels)]
    for method, e in ours.items():
        cells = []
        for lv in levels:
            rivals = {b: be["qps_at"][lv] for b, be in baselines.items() if be["qps_at"][lv] is not None}
            if e["qps_at"][lv] is None or not rivals:
                cells.append("—")
                continue
            best = max(rivals, key=rivals.get)
            cells.append(f"{e['qps_at'][lv] / rivals[best]:.2f} ({best})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def tuned_table(doc: dict) -> list[str]:
    """Markdown rows of the tuned points against their index's grid frontier, or []."""
    from .pareto import frontier, qps_at_recall

    tuned = [r for r in doc["runs"] if r.get("tuned_for") is not None]
    if not tuned:
        return []
    by_label = group_runs(grid_runs(doc["runs"]))
    lines = ["| index | target | params | predicted recall | test recall | QPS batch | grid QPS | "
             "ratio | QPS single | tuning s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in tuned:
        grid = by_label.get(r["label"], [])
        front = frontier((g["recall"], g["qps_batch"]) for g in grid if g.get("qps_batch"))
        best = qps_at_recall(front, min(r["recall"], r["tuned_for"])) if front else None
        params = ", ".join(f"{k}={v}" for k, v in r["search_params"].items())
        lines.append("| " + " | ".join([
            r["label"], f"{r['tuned_for']:.2f}", params, _num(r.get("predicted_recall"), 4),
            _num(r["recall"], 4), _num(r["qps_batch"]), _num(best),
            _num(ratio(r["qps_batch"], best), 2), _num(r.get("qps_single")),
            _num(r.get("tune_s"), 1)]) + " |")
    return lines


def _load(value) -> str:
    return "—" if not value else f"{value[0]:.2f}"


def _jsonable(obj):
    """Fallback for numpy scalars and arrays in the results document."""
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")


def write_json(doc: dict, path: str) -> None:
    """Write the results document atomically (a crash never leaves half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, default=_jsonable, allow_nan=True)
        fh.write("\n")
    os.replace(tmp, path)
