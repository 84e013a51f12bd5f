"""PNG plots with matplotlib's object API (Agg canvas; no pyplot, no global backend state)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .prompts import OVERALL

METHOD_COLOURS = cast(ListedColormap, matplotlib.colormaps["tab20"])  # the registry is typed as plain Colormap


def _save(fig: Figure, path: Path) -> str:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def plot_speedup(model_summary: dict[str, Any], model: str, path: Path) -> str:
    """Grouped bars: x = categories (+ overall), one bar per method, height = speedup over ar."""
    cats = model_summary["categories"] + [OVERALL]
    methods = [m for m in model_summary["methods"] if m != "ar"]
    width = 0.9 * len(cats) + 0.18 * len(cats) * len(methods)
    fig = Figure(figsize=(min(14.0, max(6.0, width)), 4.2))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(methods))
    # 20 distinct colours: one per method, none repeated (a tuple of RGB tuples; the stubs say ArrayLike)
    colours = cast("Sequence[Any]", METHOD_COLOURS.colors)
    for i, m in enumerate(methods):
        ys = [model_summary["table"][m][c]["speedup"] or 0.0 for c in cats]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(cats))]
        ax.bar(xs, ys, width=width, label=m, color=colours[i % len(colours)])
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cats)), cats, rotation=20)
    ax.set_ylabel("speedup over ar (Spec-Bench convention)")
    ax.set_title(f"{model}: speedup per category")
    if methods:
        ax.legend(fontsize=8, ncols=min(4, len(methods)))
    return _save(fig, path)


def plot_accept_hist(records: list[dict[str, Any]], model: str, path: Path) -> str:
    """One panel per method that reports acceptance: how many verify steps committed k tokens."""
    counts: dict[str, Counter] = {}
    for r in records:
        if r["model"] == model and not r.get("error") and r.get("accept_lengths"):
            counts.setdefault(r["method"], Counter()).update(r["accept_lengths"])
    methods = list(counts) or ["(none)"]
    cols = min(3, len(methods))
    rows = (len(methods) + cols - 1) // cols
    kmax = max((max(c) for c in counts.values()), default=1)
    ks = range(1, kmax + 1)  # one x range for all panels, so they compare at a glance
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    for i, m in enumerate(methods):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_xlim(0.4, kmax + 0.6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        c = counts.get(m, Counter())
        if c:
            total = sum(c.values())
            ax.bar(list(ks), [c[k] / total for k in ks])
            mean = sum(k * v for k, v in c.items()) / total
            ax.set_title(f"{m}  (mean {mean:.2f}, {total} steps)", fontsize=9)
        else:
            ax.set_title(f"{m}: no acceptance data", fontsize=9)
        ax.set_xlabel("tokens committed per target forward")
        ax.set_ylabel("fraction of steps")
    fig.suptitle(f"{model}: accepted length histogram (bonus included)")
    return _save(fig, path)
