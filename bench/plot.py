"""ann-benchmarks-style plots: recall@k across, queries per second (log scale) up.

One line per index (method and build configuration) following its Pareto frontier; the
dominated points of its sweep are drawn faintly behind. Up and to the right is better. Figures
are drawn on a bare Agg canvas, so no display and no global matplotlib state is needed.
"""

from __future__ import annotations

from .pareto import group_runs, summarize

__all__ = ["plot_mode"]

_LINESTYLES = ("-", "--", ":", "-.")
_RECALL_TICKS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
# Recall axis stretched towards 1: x = -log10(1 - recall + c). On a linear axis everything
# above 0.9, where the indexes are compared, would share a sliver at the right edge; this
# gives 0.9 -> 0.99 -> 0.999 -> 1 equal-ish room, and the constant keeps recall 1 finite.
_STRETCH = 1e-3


def _stretch(r):
    import numpy as np

    return -np.log10(np.clip(1.0 + _STRETCH - np.asarray(r, dtype=float), _STRETCH / 100, None))


def _unstretch(x):
    import numpy as np

    return 1.0 + _STRETCH - 10.0 ** (-np.asarray(x, dtype=float))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _styles(labels_by_method: dict[str, list[str]]):
    """Colour per method, line style and marker per build configuration within it."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    styles = {}
    for i, (method, labels) in enumerate(labels_by_method.items()):
        for j, label in enumerate(labels):
            styles[label] = {"color": cmap(i % 10), "linestyle": _LINESTYLES[j % len(_LINESTYLES)],
                             "marker": _MARKERS[(i + j) % len(_MARKERS)]}
    return styles


def plot_mode(runs, path, *, mode: str = "batch", title: str = "", k: int = 10,
              footer: str = "") -> bool:
    """Write the recall/QPS plot of one mode to ``path`` (PNG).

    Parameters
    ----------
    runs : sequence of dict
        Run records (see :mod:`annlib.bench.runner`).
    path : str or path-like
    mode : {"batch", "single"}
    title : str
    k : int
        For the axis label.
    footer : str
        Small text under the plot, e.g. the command that produced it.

    Returns
    -------
    bool
        False (and nothing written) when no run measured this mode.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    rk, qk = ("recall", "qps_batch") if mode == "batch" else ("recall_single", "qps_single")
    runs = [r for r in runs if r.get(rk) is not None and r.get(qk) is not None]
    if not runs:
        return False
    tuned = [r for r in runs if r.get("tuned_for") is not None]
    runs = [r for r in runs if r.get("tuned_for") is None] or tuned
    by_label = group_runs(runs)
    methods: dict[str, list[str]] = {}
    for label, group in by_label.items():
        methods.setdefault(group[0]["method"], []).append(label)
    styles = _styles(methods)

    fig = Figure(figsize=(10, 6.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lowest = 1.0
    for label, group in by_label.items():
        style = styles[label]
        ax.scatter([r[rk] for r in group], [r[qk] for r in group], s=9, alpha=0.25,
                   color=style["color"], linewidths=0)
        front = summarize(group, mode)["frontier"]
        xs, ys = [p[0] for p in front], [p[1] for p in front]
        lowest = min(lowest, min(xs))
        ax.plot(xs, ys, label=label, markersize=4, linewidth=1.4, **style)
    for r in tuned:
        # The tuner's choice, drawn over the sweep it replaces (annotated with its target).
        style = styles.get(r["label"], {"color": "black"})
        ax.scatter([r[rk]], [r[qk]], s=140, marker="*", color=style["color"], edgecolors="black",
                   linewidths=0.6, zorder=5)
        ax.annotate(f"tuned {r['tuned_for']:g}", (r[rk], r[qk]), textcoords="offset points",
                    xytext=(4, 6), fontsize=7)
        lowest = min(lowest, r[rk])
    ax.set_yscale("log")
    ax.set_xscale("function", functions=(_stretch, _unstretch))
    left = max(0.0, min(lowest, 0.9) - 0.02)
    ax.set_xlim(left, 1.0 + _STRETCH / 2)  # a margin so points at recall 1 show whole
    ax.set_xticks([t for t in _RECALL_TICKS if t >= left])
    ax.set_xticklabels([f"{t:g}" for t in _RECALL_TICKS if t >= left])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(f"recall@{k} (axis stretched towards 1)")
    ax.set_ylabel(f"queries per second ({mode} mode, log scale)")
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.12)
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    if footer:
        # Keep a strip under the axes for the command line so it never overlaps the label.
        fig.get_layout_engine().set(rect=(0, 0.035, 1, 0.965))
        fig.text(0.005, 0.005, footer, fontsize=7, color="0.35", ha="left", va="bottom")
    fig.savefig(path, dpi=110)
    return True
