"""Verification cost curve: median time of one target forward vs number of query tokens.

On CPU the cost of verifying n draft tokens grows with n, and how fast depends on the execution
plan and matmul layout (DESIGN.md section 4), so the scheduler's latency model must be measured
on the machine. This sweeps n_query = 1..max_query at a fixed context length for each plan the
engine exposes (`engine.plan_names`, `engine.profile_forward`).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from casspec.errors import InvalidRequestError


def run_profile(engine: Any, *, ctx_len: int = 512, max_query: int = 32, repeats: int = 5,
                plans: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """{"n_query": [...], "plans": {plan: [median seconds per n_query]}, ...}."""
    from tqdm.auto import tqdm

    if not hasattr(engine, "profile_forward") or not hasattr(engine, "plan_names"):
        raise InvalidRequestError("this engine does not expose profile_forward()/plan_names")
    names = list(plans) if plans else list(engine.plan_names)
    unknown = [p for p in names if p not in engine.plan_names]
    if unknown:
        raise InvalidRequestError(f"unknown plan(s) {unknown}; engine has: {', '.join(engine.plan_names)}")
    ctx_len = min(ctx_len, int(engine.context_length) - max_query)
    queries = list(range(1, max_query + 1))
    curves: dict[str, list[float]] = {plan: [] for plan in names}
    bar = tqdm(total=len(names) * len(queries), desc="profile", unit="pt", disable=not progress)
    for n in queries:  # plans interleaved per point, so a burst of machine noise hits all of them
        for plan in names:
            curves[plan].append(float(engine.profile_forward(plan, n, ctx_len, repeats)))
            bar.update(1)
    bar.close()
    return {"model": engine.name, "ctx_len": ctx_len, "repeats": repeats, "n_query": queries,
            "plans": curves, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "torch": torch.__version__}


def plot_profile(result: dict[str, Any], path: Path) -> str:
    """Milliseconds per forward vs query tokens, one line per plan."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for plan, secs in result["plans"].items():
        ax.plot(result["n_query"], [1e3 * s for s in secs], marker="o", markersize=3, label=plan)
    ax.set_xlabel("query tokens in one forward")
    ax.set_ylabel("median ms per forward")
    ax.set_title(f"{result['model']}: forward cost at context {result['ctx_len']}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
    """Rows = query tokens, columns = plans: ms per forward and cost relative to one query token."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    plans = list(result["plans"])
    t = Table(title=f"{result['model']}: verification cost, context {result['ctx_len']} "
                    f"(ms per forward, x = relative to 1 query token)")
    t.add_column("n_query", justify="right")
    for p in plans:
        t.add_column(p, justify="right")
    for i, n in enumerate(result["n_query"]):
        cells = []
        for p in plans:
            s, s1 = result["plans"][p][i], result["plans"][p][0]
            cells.append(f"{1e3 * s:.2f} ({s / s1:.2f}x)" if s1 > 0 else f"{1e3 * s:.2f}")
        t.add_row(str(n), *cells)
    console.print(t)
