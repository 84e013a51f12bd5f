"""Forward cost per execution plan: total, the matmul (weight-traffic) part and the rest, vs query tokens.

A draft level is only worth its cost relative to the target: c = t(plan) / t(full) at the same number
of query tokens. This sweeps n_query at a fixed context for every plan the engine exposes
(`engine.plan_names`, `engine.profile_forward`) and splits each forward into the time spent in the
linears ("matmul") and everything else ("rest": attention, RoPE, norms, Python and dispatch).
"""
from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from casspec.errors import InvalidRequestError
from casspec.runtime.machine import cpu_summary

PARTS = ("total", "matmul", "rest")


def query_sizes(max_query: int) -> list[int]:
    """1, 2, 4, 8, ... up to max_query (max_query itself included)."""
    out, q = [], 1
    while q < max_query:
        out.append(q)
        q *= 2
    return out + [max_query]


def run_profile(engine: Any, *, ctx_len: int = 512, max_query: int = 32, repeats: int = 5,
                plans: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """{"n_query": [...], "plans": {plan: {"total"|"matmul"|"rest": [median s per n_query]}}, "c": ...}."""
    from tqdm.auto import tqdm

    if not hasattr(engine, "profile_forward") or not hasattr(engine, "plan_names"):
        raise InvalidRequestError("this engine does not expose profile_forward()/plan_names")
    names = list(plans) if plans else list(engine.plan_names)
    unknown = [p for p in names if p not in engine.plan_names]
    if unknown:
        raise InvalidRequestError(f"unknown plan(s) {unknown}; engine has: {', '.join(engine.plan_names)}")
    ctx_len = min(ctx_len, int(engine.context_length) - max_query)
    queries = query_sizes(max_query)
    curves: dict[str, dict[str, list[float]]] = {plan: {part: [] for part in PARTS} for plan in names}
    bar = tqdm(total=len(names) * len(queries), desc="profile", unit="pt", disable=not progress)
    for n in queries:  # plans interleaved per point, so a burst of machine noise hits all of them
        for plan in names:
            point = engine.profile_forward(plan, n, ctx_len, repeats)
            for part in PARTS:
                curves[plan][part].append(float(point[part]))
            bar.update(1)
    bar.close()
    c = {}
    if "full" in curves:
        full = curves["full"]["total"]
        c = {plan: [t / f if f > 0 else 0.0 for t, f in zip(cur["total"], full)] for plan, cur in curves.items()}
    weights = {plan: engine.plan_weights(plan) for plan in names} if hasattr(engine, "plan_weights") else {}
    return {"model": engine.name, "ctx_len": ctx_len, "weights": weights, "repeats": repeats, "n_query": queries, "plans": curves,
            "c": c, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cpu": cpu_summary(), "torch": torch.__version__}


def plot_profile(result: dict[str, Any], path: Path) -> str:
    """Milliseconds per forward vs query tokens: total (solid) and matmul part (dashed), one colour per plan."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    tab10 = matplotlib.colormaps["tab10"]
    assert isinstance(tab10, ListedColormap)  # a fixed list of 10 colours (`.colors`)
    colours = cast("Sequence[Any]", tab10.colors)  # (stubs: ArrayLike; a tuple of RGB tuples)
    for i, (plan, cur) in enumerate(result["plans"].items()):
        colour = colours[i % len(colours)]
        ax.plot(result["n_query"], [1e3 * s for s in cur["total"]], marker="o", markersize=3, color=colour,
                label=f"{plan} total")
        ax.plot(result["n_query"], [1e3 * s for s in cur["matmul"]], linestyle="--", color=colour,
                label=f"{plan} matmul")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("query tokens in one forward")
    ax.set_ylabel("median ms per forward")
    ax.set_title(f"{result['model']}: forward cost at context {result['ctx_len']}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def write_profile(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, png = out / "profile.json", out / "profile.png"
    js.write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot_profile(result, png)
    return js, png


def print_profile(result: dict[str, Any], console: Any = None) -> None:
    """One row per (plan, query tokens): total, matmul and rest in ms, and c = total / full's total."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"{result['model']}: forward cost at context {result['ctx_len']} (median ms)",
              caption=result.get("cpu"))
    weights = result.get("weights", {})
    if weights:
        w = Table(title="weights each plan reads per step")
        for col in ("plan", "formats", "MB"):
            w.add_column(col, justify="right" if col == "MB" else "left")
        for plan, info in weights.items():
            w.add_row(plan, str(info["formats"]), f"{info['bytes'] / 1e6:.1f}")
        console.print(w)
    for col in ("plan", "n_query", "total", "matmul", "rest", "c vs full"):
        t.add_column(col, justify="left" if col == "plan" else "right")
    for plan, cur in result["plans"].items():
        for i, n in enumerate(result["n_query"]):
            c = result["c"].get(plan)
            t.add_row(plan, str(n), *(f"{1e3 * cur[p][i]:.2f}" for p in PARTS), f"{c[i]:.2f}" if c else "-")
    console.print(t)
