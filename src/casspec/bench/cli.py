"""`casspec bench` and `casspec profile` subcommands (argparse), and a standalone entry point.

The lead's `casspec/cli.py` calls `add_parser(subparsers)`; `python -m casspec.bench bench ...`
works without it.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from casspec.cli import add_drafts_arg
from casspec.runtime import heap

DEFAULT_LIMIT = 10


def _split(s: str | None) -> list[str] | None:
    items = [x.strip() for x in (s or "").split(",") if x.strip()]
    return items or None


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="Spec-Bench race of every method side by side (speedup over ar, losslessness)",
        description="Race every decoding method (and HF peers) on Spec-Bench prompts; writes "
                    "results.jsonl, summary.json, report.md and PNG plots to --out.")
    p.add_argument("--models", default="smollm2", help="comma list of models (default: smollm2)")
    p.add_argument("--methods", default=None,
                   help="comma list (default: all engine methods plus the peers hf,hf_pld,hf_assist,"
                        "llama.cpp,llama.cpp-pld); ar is always run")
    p.add_argument("--categories", default=None,
                   help="comma list of Spec-Bench groups (mt_bench,translation,summarization,qa,"
                        "math_reasoning,rag) or MT-bench labels (writing,coding,...); default all")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"first N questions per category, file order (default {DEFAULT_LIMIT}; 0 = all)")
    p.add_argument("--prompts", default=None, help="Spec-Bench-format question.jsonl "
                   "(default: $CASSPEC_SPEC_BENCH or ../shared/data/spec_bench/question.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0,
                   help="keep tokens with p >= min_p * p_max (0 = off); the peers take no min_p and sit out")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling: prompt q, turn t uses seed + 10 q + t for every method (default 0)")
    p.add_argument("--sampling-rule", choices=("gumbel", "rejection"), default="gumbel",
                   help="engine methods at temperature > 0: gumbel (seed-stable, the same tokens as ar) "
                        "or rejection (recursive rejection sampling)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per prompt; median wall time")
    p.add_argument("--out", default=None, help="output dir (default bench_out/<timestamp>)")
    p.add_argument("--no-peers", action="store_true", help="skip the peers (HF generate, llama.cpp)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads, and llama.cpp's (default: torch's choice, one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if any greedy mismatch is not a near-tie, any seeded sampled output of an engine "
                        "method differs from ar's under the gumbel rule, or any generation failed")
    add_drafts_arg(p)
    p.set_defaults(func=bench_command)
    return p


def add_profile_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile", help="forward cost per plan vs query tokens: total, matmul part, rest, and c vs full")
    p.add_argument("--model", default=None, help="model (default: the default model)")
    p.add_argument("--out", default=None, help="output dir (default bench_out/profile-<timestamp>)")
    p.add_argument("--ctx-len", type=int, default=512, help="context length held fixed (default 512)")
    p.add_argument("--max-query", type=int, default=32, help="sweep query tokens 1, 2, 4, ... N (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per point; median (default 5)")
    p.add_argument("--plans", default=None, help="comma list of plan names (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    add_drafts_arg(p)
    p.set_defaults(func=profile_command)
    return p


def add_parser(subparsers: Any) -> None:
    """Register `bench` and `profile` on the top-level CLI's subparsers."""
    add_bench_parser(subparsers)
    add_profile_parser(subparsers)


def _set_threads(n: int | None) -> None:
    """Pin torch's thread count: more threads than free cores makes CPU timings swing wildly."""
    if n:
        import torch
        torch.set_num_threads(n)


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _meta(args: argparse.Namespace, prompts_path: str, n_questions: int) -> dict[str, Any]:
    import platform

    import torch
    import transformers

    from casspec.runtime.machine import cpu_info

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "models": args.models,
        "methods": args.methods or "all engine methods" + ("" if args.no_peers else " + peers"),
        "categories": args.categories or "all", "limit per category": args.limit or "all",
        "questions": n_questions, "prompts": prompts_path, "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
        "repeats": args.repeats, "seed": args.seed, "sampling rule": args.sampling_rule if args.temperature > 0
        else "greedy", "torch": torch.__version__,
        "transformers": transformers.__version__, "torch threads": torch.get_num_threads(),
        "platform": platform.platform(), "cpu": cpu_info()["model"], "cpu features": cpu_info()["features"],
        "cpu cores": os.cpu_count(),
    }


def _peak_rss_mb() -> float | None:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):
        return None


def bench_command(args: argparse.Namespace, *, engines: dict[str, Any] | None = None) -> int:
    """Run the race, write the reports, print the summary table. `engines` injects loaded engines."""
    from .prompts import default_prompts_path, load_questions
    from .render import print_summary
    from .report import write_reports
    from .runner import BenchConfig, run_bench

    try:
        prompts_path = Path(args.prompts) if args.prompts else default_prompts_path()
        questions = load_questions(prompts_path, args.categories, args.limit or None)
    except (OSError, ValueError) as e:
        print(f"casspec bench: {e}", file=sys.stderr)
        return 2
    if not questions:
        print(f"casspec bench: no questions selected from {prompts_path}", file=sys.stderr)
        return 2
    cfg = BenchConfig(methods=_split(args.methods), peers=not args.no_peers,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, repeats=args.repeats, seed=args.seed,
                      sampling_rule=args.sampling_rule, threads=args.threads)
    try:
        cfg.validate()
    except ValueError as e:
        print(f"casspec bench: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("bench_out") / _stamp())
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    _set_threads(args.threads)
    load_before = _load_avg()
    if load_before is not None and load_before > 0.5 * (os.cpu_count() or 1):
        print(f"casspec bench: warning: load average {load_before} on {os.cpu_count()} cores; other "
              "processes are using the CPU and timings will be noisy", file=sys.stderr)
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:  # written as we go
        def on_record(rec: dict[str, Any]) -> None:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
        loader = None
        if args.drafts:  # every model's engine with this draft hierarchy
            import casspec
            loader = functools.partial(casspec.load, hierarchy=args.drafts)
        records = run_bench(_split(args.models) or ["smollm2"], questions, cfg, loader=loader, engines=engines,
                            progress=progress, on_record=on_record)
    meta = _meta(args, str(prompts_path), len(questions))
    meta["peak RSS (MiB)"] = round(_peak_rss_mb() or 0.0, 1)
    meta["load average (1 min) before / after"] = f"{load_before} / {_load_avg()}"
    summary = write_reports(records, out, meta=meta, write_results=False)
    print_summary(summary)
    print(f"casspec bench: wrote {out}/report.md, summary.json, results.jsonl, model_answer/, *.png")
    coupled = args.temperature > 0 and args.sampling_rule == "gumbel"
    if args.strict and _failed(summary, coupled):
        print("casspec bench: --strict: lossless divergence (greedy), seeded output unlike ar's (sampled), "
              "or failed generations", file=sys.stderr)
        return 1
    return 0


def _failed(summary: dict[str, Any], coupled: bool = False) -> bool:
    """Errors, greedy mismatches that are not near-ties, and under coupled sampling any engine method whose
    seeded output differs from ar's (the coupling makes them equal whatever the method)."""
    for s in summary["models"].values():
        if s["errors"] or any((m["mismatch"] or {}).get("near_tie") is not True for m in s["mismatches"]):
            return True
        if coupled and s.get("seeded_differs"):
            return True
    return False


def profile_command(args: argparse.Namespace, *, engine: Any = None) -> int:
    """Sweep query tokens per plan; print the table, write profile.json and profile.png."""
    from .profile import print_profile, run_profile, write_profile

    _set_threads(args.threads)
    if engine is None:
        import casspec
        engine = casspec.load(args.model, hierarchy=args.drafts)
        heap.settle()
    result = run_profile(engine, ctx_len=args.ctx_len, max_query=args.max_query,
                         repeats=args.repeats, plans=_split(args.plans), progress=not args.no_progress)
    out = Path(args.out or Path("bench_out") / f"profile-{_stamp()}")
    js, png = write_profile(result, out)
    print_profile(result)
    print(f"casspec profile: wrote {js} and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="casspec-bench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
