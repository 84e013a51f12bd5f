"""The `casspec loadtest` command: arguments, the run, the printed report."""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict

from casspec.loadtest.client import DEFAULT_CLIENTS, DEFAULT_MAX_INFLIGHT, Report
from casspec.loadtest.run import run_load
from casspec.loadtest.stats import format_summary


def format_report(rep: Report) -> str:
    """The report as human-readable lines."""
    if rep.mode == "poisson":
        who = f"poisson arrivals at {rep.rate:g} req/s (seed {rep.seed}, max in-flight {rep.max_inflight})"
    else:
        who = f"{rep.clients} clients"
    lines = [
        f"load test: {who} x {rep.duration_s:g} s window ({rep.wall_s:.1f} s until the last reply) "
        f"-> {rep.url} ({rep.endpoint}, max_tokens {rep.max_tokens}, {'stream' if rep.stream else 'no stream'})",
        f"  requests: {rep.requests} ({rep.ok} ok, {rep.errors} errors{': ' + str(rep.errors_by_kind) if rep.errors else ''})",
        f"  arrivals: {rep.arrivals}, {rep.dropped} dropped at the in-flight cap, peak in flight {rep.peak_inflight}; "
        f"offered {rep.offered_requests_per_s:.2f} req/s, achieved {rep.achieved_requests_per_s:.2f} req/s",
        f"  throughput: {rep.requests_per_s:.2f} req/s, {rep.completion_tokens} completion tokens, "
        f"{rep.tokens_per_s:.1f} tok/s (client side, wall clock)",
    ]
    if rep.latency_s:
        lines.append(format_summary("latency", rep.latency_s))
    if rep.ttft_s:
        lines.append(format_summary("time to first token", rep.ttft_s))
    if rep.itl_s:
        lines.append(format_summary(f"inter-token latency ({rep.itl_samples} chunk gaps)", rep.itl_s, unit_ms=True))
    if rep.tpot_s:
        lines.append(format_summary(f"time per output token ({rep.tpot_samples} requests)", rep.tpot_s, unit_ms=True))
    if rep.itl_s:
        lines.append(f"  note: {rep.itl_note}")
    if rep.turns > 1:
        lines.append(f"  conversations of {rep.turns} turns, ~{rep.turn_tokens} user tokens added a turn:")
        for turn, d in rep.ttft_by_turn_s.items():
            lines.append(format_summary(f"  turn {turn} time to first token ({d['n']} requests)", d))
        first, last = rep.ttft_by_turn_s.get("1"), rep.ttft_by_turn_s.get(str(rep.turns))
        if first and last and first["p50"] > 0:
            lines.append(f"  p50 time to first token, turn {rep.turns} / turn 1: {last['p50'] / first['p50']:.2f}x")
    if rep.system_tokens:
        first = "-" if rep.ttft_first_s is None else f"{rep.ttft_first_s:.2f} s"
        lines.append(f"  shared system prompt of ~{rep.system_tokens} tokens: first request's time to first "
                     f"token {first}")
        if rep.ttft_rest_s:
            lines.append(format_summary("time to first token of every later request", rep.ttft_rest_s))
    if rep.planner.get("steps"):
        p = rep.planner
        lines.append(f"  batch planner: {p['ms_per_step']:.2f} ms a step over {p['steps']} steps (lookups + "
                     f"planning); request-steps planned {p['planned']}, left out (drafts did not pay) {p['left_out']}")
    if rep.prompt_tokens:
        lines.append(f"  prompt tokens: {rep.prompt_tokens}, of which served from the server's prefix cache: "
                     f"{rep.cached_prompt_tokens} ({rep.cached_prompt_tokens / rep.prompt_tokens:.0%})")
    sv = rep.server
    if sv:
        drafters = ", ".join(f"{n} {d['acceptance']:.2f}" for n, d in sv["drafters"].items()) or "-"
        lines.append(f"  server ({sv['model']}, {sv['method']}): {sv['generations']} generations, "
                     f"{sv['tokens_per_s_while_generating']:.1f} tok/s while generating, mean accepted length "
                     f"{sv['mean_accepted_length']:.2f}, acceptance {drafters}, 429s {sv['rejected_queue_full']}, "
                     f"timeouts {sv['timeouts']}")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    """Register ``loadtest`` on an argparse subparsers object."""
    p = subparsers.add_parser("loadtest", help="bounded load test against a running server",
                              description="Concurrent clients (closed loop, default) or Poisson arrivals "
                                          "(--rate, open loop) against an OpenAI-compatible server for a fixed time.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: http://127.0.0.1:8000)")
    p.add_argument("--clients", type=int, default=None,
                   help=f"closed loop: concurrent clients sending back to back (default: {DEFAULT_CLIENTS})")
    p.add_argument("--rate", type=float, default=None,
                   help="open loop instead: Poisson arrivals at this many requests/s (exclusive with --clients)")
    p.add_argument("--max-inflight", type=int, default=DEFAULT_MAX_INFLIGHT,
                   help="with --rate: most requests in flight; arrivals over it are dropped, not queued "
                        f"(default: {DEFAULT_MAX_INFLIGHT})")
    p.add_argument("--seed", type=int, default=0, help="with --rate: seed of the arrival schedule (default: 0)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to keep starting requests (default: 60)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default: 64)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--stream", action="store_true",
                   help="stream responses (measures time to first token, inter-token latency, time per output token)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request (default: 300)")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first (default: 1)")
    p.add_argument("--turns", type=int, default=1,
                   help="multi-turn chats: each client continues its own conversation for this many turns, "
                        "then starts a new one; TTFT per turn (closed loop, chat endpoint; default: 1)")
    p.add_argument("--turn-tokens", type=int, default=400,
                   help="with --turns: user tokens added a turn (estimated; default: 400)")
    p.add_argument("--system-tokens", type=int, default=0,
                   help="every request opens with the same system prompt of about this many tokens; the first "
                        "request's TTFT is reported apart (default: 0, none)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON ('-' = stdout)")
    p.set_defaults(func=loadtest)


def _arg_error(args: argparse.Namespace) -> str | None:
    """Why the arguments are unusable, or None."""
    rate, clients = getattr(args, "rate", None), args.clients
    if rate is not None and clients is not None:
        return ("--rate (open loop, Poisson arrivals) and --clients (closed loop, fixed clients) are exclusive "
                "modes: pass only one")
    if rate is not None and not (rate > 0 and math.isfinite(rate)):
        return "--rate must be a positive number of requests per second"
    if rate is not None and getattr(args, "max_inflight", DEFAULT_MAX_INFLIGHT) < 1:
        return "--max-inflight must be >= 1"
    turns, system = getattr(args, "turns", 1), getattr(args, "system_tokens", 0)
    if turns < 1 or getattr(args, "turn_tokens", 400) < 1 or system < 0:
        return "--turns and --turn-tokens must be >= 1 and --system-tokens >= 0"
    if turns > 1 and rate is not None:
        return "--turns (multi-turn chats) runs closed loop: use --clients, not --rate"
    if (turns > 1 or system) and args.endpoint != "chat":
        return "--turns and --system-tokens need --endpoint chat"
    if (clients is not None and clients < 1) or args.max_tokens < 1 or args.max_requests < 1 \
            or not 0 < args.duration <= 24 * 3600:
        return "--clients, --max-tokens, --max-requests must be >= 1 and --duration in (0, 86400]"
    return None


def loadtest(args: argparse.Namespace) -> int:
    """The ``casspec loadtest`` command: run, print (or write JSON), exit 0 only if all requests succeeded."""
    err = _arg_error(args)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rep = run_load(args.url, args.clients or DEFAULT_CLIENTS, args.duration, args.max_tokens, api_key=args.api_key,
                   endpoint=args.endpoint, stream=args.stream, temperature=args.temperature,
                   request_timeout=args.request_timeout, max_requests=args.max_requests, warmup=args.warmup,
                   progress=sys.stderr.isatty(), rate=getattr(args, "rate", None),
                   max_inflight=getattr(args, "max_inflight", DEFAULT_MAX_INFLIGHT), seed=getattr(args, "seed", 0),
                   turns=getattr(args, "turns", 1), turn_tokens=getattr(args, "turn_tokens", 400),
                   system_tokens=getattr(args, "system_tokens", 0))
    if args.json == "-":
        print(json.dumps(asdict(rep), indent=2))
    else:
        print(format_report(rep))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(asdict(rep), f, indent=2)
    return 0 if rep.ok and not rep.errors else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="casspec-loadtest")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["loadtest", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
