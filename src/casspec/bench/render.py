"""Human-facing views of a bench summary: report.md and a one-screen rich table."""
from __future__ import annotations

from typing import Any

from .prompts import OVERALL

HOW_TO_READ = """\
How to read these numbers:
- **tok/s**: Spec-Bench's per-question tokens/s (new tokens of all turns / wall time of all turns),
  averaged over the questions. Wall time is measured by the harness around each call, prefill
  included, after one untimed warm-up generation per method; with repeats, the median per turn.
- **speedup**: Spec-Bench convention (`evaluation/speed.py`): the method's mean per-question tok/s
  divided by that of `ar` (plain autoregressive decoding in the same engine), over the same questions.
- **speedup Σ**: the throughput ratio (total new tokens / total wall time, method over `ar`), which
  weighs long answers more. Both use the same timings; they differ when answer lengths differ.
- **MAT**: mean accepted tokens per target forward, bonus token included (1.00 for `ar`; blank for
  the HF peers, which do not report it).
- **lossless**: greedy only. Token ids compared with `ar`'s for the same prompt and turn; `yes (n)`
  over n comparisons, `NO k/n` with k mismatches, of which near-ties (target logit gap between
  the two tokens within eps, so fp rounding can flip them) are counted apart. `ar` is the
  reference: `ref (n)` means its later repeats reproduced its first (a determinism check).
  `n/a` when nothing could be compared (sampling, or turn 2 after a turn-1 answer that already
  differed).
- **same tokens as ar (seeded)**: sampled runs only. Every method gets the same seed per prompt and
  turn; `k/n`: k of n generations produced exactly `ar`'s tokens (all of them under the default
  coupled sampling rule, whatever the drafts; few under `--sampling-rule rejection`). The HF and
  llama.cpp peers use their own random streams and are not compared.
"""


def fmt(x: Any, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def lossless_cell(cell: dict[str, Any], method: str) -> str:
    n, k, t = cell["compared"], cell["mismatches"], cell["near_ties"]
    if n == 0:
        return "n/a"
    if k == 0:
        return f"ref ({n})" if method == "ar" else f"yes ({n})"
    ties = f", {t} near-tie" if t else ""
    return f"NO {k}/{n}{ties}"


def seeded_cell(cell: dict[str, Any], method: str) -> str:
    """"k/n": sampled generations with the same tokens as `ar` for the same seed; "n/a" if none compared."""
    n = cell.get("seeded_compared", 0)
    if not n:
        return "n/a"
    return f"ref ({n})" if method == "ar" else f"{cell.get('seeded_same', 0)}/{n}"


def _sampled(s: dict[str, Any]) -> bool:
    """Whether a model's race was sampled with seeds compared (adds the "same tokens as ar" column)."""
    return any(s["table"][m][OVERALL].get("seeded_compared") for m in s["methods"])


def _row(method: str, cell: dict[str, Any]) -> list[str]:
    return [method, str(cell["questions"]), str(cell["new_tokens"]), fmt(cell["wall_time"], ".1f", " s"),
            fmt(cell["tokens_per_s"], ".1f"), fmt(cell["speedup"], ".2f", "x"),
            fmt(cell["speedup_total"], ".2f", "x"), fmt(cell["mean_accepted_length"]),
            lossless_cell(cell, method) + (f", {cell['errors']} err" if cell["errors"] else "")]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(summary: dict[str, Any], images: dict[str, list[str]] | None = None) -> str:
    """report.md: run settings, how to read, then per model an overall table, a speedup matrix,
    one table per category, the mismatches and the errors."""
    meta = summary.get("meta", {})
    out = ["# casspec bench: Spec-Bench race", ""]
    if meta:
        out += ["| setting | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in meta.items()] + [""]
    out += [HOW_TO_READ]
    head = ["method", "questions", "new tokens", "wall", "tok/s", "speedup", "speedup Σ", "MAT", "lossless"]
    for model, s in summary["models"].items():
        cats, table = s["categories"], s["table"]
        sampled = _sampled(s)
        mhead = head + ["same tokens as ar (seeded)"] if sampled else head

        def row(m: str, cell: dict[str, Any], sampled: bool = sampled) -> list[str]:
            return _row(m, cell) + ([seeded_cell(cell, m)] if sampled else [])

        out += [f"## {model}", "", "### overall", ""]
        out += _table(mhead, [row(m, table[m][OVERALL]) for m in s["methods"]]) + [""]
        out += ["### speedup over ar by category (Spec-Bench convention)", ""]
        out += _table(["method"] + cats + [OVERALL],
                      [[m] + [fmt(table[m][c]["speedup"], ".2f", "x") for c in cats + [OVERALL]]
                       for m in s["methods"]]) + [""]
        for img in (images or {}).get(model, []):
            out += [f"![{img}]({img})", ""]
        for cat in cats:
            out += [f"### {cat}", ""]
            out += _table(mhead, [row(m, table[m][cat]) for m in s["methods"]]) + [""]
        out += _mismatch_section(s) + _error_section(s)
    return "\n".join(out) + "\n"


def _mismatch_section(s: dict[str, Any]) -> list[str]:
    if not s["mismatches"]:
        return ["### mismatches", "", "None: every compared method matched `ar` token for token.", ""]
    head = ["method", "question", "turn", "repeat", "position", "ar token", "token", "gap", "top1-top2",
            "verdict"]
    rows = []
    for m in s["mismatches"]:
        mm = m["mismatch"] or {}
        verdict = {True: "near-tie", False: "DIVERGED", None: "?"}[mm.get("near_tie")]
        rows.append([m["method"], str(m["question_id"]), str(m["turn"]), str(m["repeat"]),
                     str(mm.get("position")), str(mm.get("ref_token")), str(mm.get("token")),
                     fmt(mm.get("gap"), ".4g"), fmt(mm.get("top1_top2_gap"), ".4g"), verdict])
    return ["### mismatches", "", "gap = logit(ar token) − logit(method token), teacher-forced target "
            "forward on prompt + common prefix.", ""] + _table(head, rows) + [""]


def _error_section(s: dict[str, Any]) -> list[str]:
    if not s["errors"]:
        return []
    rows = [[e["method"], str(e["question_id"]), str(e["turn"]), str(e["repeat"]),
             str(e["error"]).replace("|", "/")[:200]] for e in s["errors"]]
    return ["### errors", ""] + _table(["method", "question", "turn", "repeat", "error"], rows) + [""]


SHORT = {"mt_bench": "MT", "translation": "Trans", "summarization": "Sum", "qa": "QA",
         "math_reasoning": "Math", "rag": "RAG"}  # Spec-Bench leaderboard column names


def print_summary(summary: dict[str, Any], console: Any = None) -> None:
    """One screen per model: methods x (tok/s, speedup overall and per category, MAT, lossless)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or pipe: do not squeeze to 80 columns
            console = Console(width=140)
    for model, s in summary["models"].items():
        cats = s["categories"]
        t = Table(title=f"casspec bench: {model}, speedup over ar (Spec-Bench convention)",
                  box=box.SIMPLE_HEAD, pad_edge=False)
        sampled = _sampled(s)
        extra = ["same as ar (seed)"] if sampled else []
        for col in ["method", "tok/s", "overall"] + [SHORT.get(c, c) for c in cats] + ["MAT", "lossless"] + extra:
            t.add_column(col, justify="left" if col in ("method", "lossless") else "right")
        for m in s["methods"]:
            row = s["table"][m]
            t.add_row(m, fmt(row[OVERALL]["tokens_per_s"], ".1f"), fmt(row[OVERALL]["speedup"], ".2f", "x"),
                      *[fmt(row[c]["speedup"], ".2f", "x") for c in cats],
                      fmt(row[OVERALL]["mean_accepted_length"]), lossless_cell(row[OVERALL], m),
                      *([seeded_cell(row[OVERALL], m)] if sampled else []))
        console.print(t)
