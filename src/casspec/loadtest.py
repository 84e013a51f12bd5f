"""``casspec loadtest``: a small, bounded load test against a running ``casspec serve`` (or any OpenAI server).

Two exclusive modes drive the server for --duration seconds:

* closed loop (default): --clients N threads send chat (or text) completion requests back to back;
* open loop: --rate R requests/s arrive as a Poisson process (exponential gaps from random.Random(--seed)),
  each in its own thread, at most --max-inflight at once; arrivals over that cap are counted as dropped.

It prints requests served, errors, throughput, latency percentiles and, with --stream, time to first token,
inter-token latency and time per output token (see casspec.loadtest_stats), plus the server's own counters
(/metrics delta: tokens/s, mean accepted length) when present. Standard library only (urllib + threads);
it always stops by itself: no new request starts after --duration, and each request has a timeout.

    casspec loadtest --url http://127.0.0.1:8000 --clients 4 --duration 60 --max-tokens 64
    casspec loadtest --url http://127.0.0.1:8000 --rate 2 --duration 60 --stream
    casspec loadtest --clients 4 --turns 4 --turn-tokens 400 --stream        # multi-turn chats, TTFT per turn
    casspec loadtest --clients 8 --system-tokens 1000 --stream               # one shared system prompt

(The multi-turn and shared-system-prompt workloads are in casspec.loadtest_chat.)
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

from casspec.loadtest_chat import first_and_rest, run_conversations, system_message, ttft_by_turn, with_system
from casspec.loadtest_stats import fill_report, format_summary, poisson_arrivals, server_delta, summary
from casspec.loadtest_stats import percentile  # noqa: F401  (re-exported: callers import it from here)

_summary, _server_delta = summary, server_delta  # former private names, kept for callers

DEFAULT_CLIENTS = 4
DEFAULT_MAX_INFLIGHT = 64

PROMPTS = [
    "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn leaves.",
    "List three uses of the Python `itertools` module.",
    "What is the difference between TCP and UDP? Answer briefly.",
    "Give me a short recipe for pancakes.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue? Keep it short.",
]


@dataclass
class Sample:
    ok: bool
    latency: float
    status: int = 0
    error: str = ""
    completion_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)  # gaps between consecutive content chunks (streaming)
    text: str = ""  # the answer (multi-turn chats send it back)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens: prompt tokens the server did not recompute
    turn: int = 0  # multi-turn mode: the turn of its conversation (1-based)
    seq: int = -1  # order in which requests were sent (0 = the first timed one)


@dataclass
class Report:
    url: str
    clients: int  # fixed clients (closed loop); 0 in poisson mode
    duration_s: float  # the window in which new requests start
    max_tokens: int
    endpoint: str
    stream: bool
    wall_s: float = 0.0  # until the last in-flight request finished
    requests: int = 0
    ok: int = 0
    errors: int = 0
    errors_by_kind: dict = field(default_factory=dict)
    latency_s: dict = field(default_factory=dict)
    ttft_s: dict = field(default_factory=dict)
    completion_tokens: int = 0
    tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    server: dict = field(default_factory=dict)
    mode: str = "clients"  # "clients" (closed loop) or "poisson" (open loop at `rate`)
    rate: float | None = None  # configured Poisson arrival rate, requests/s
    seed: int | None = None
    max_inflight: int | None = None
    arrivals: int = 0  # requests the load generator wanted to send in the window (sent + dropped)
    dropped: int = 0  # poisson arrivals not sent because max_inflight requests were already in flight
    peak_inflight: int = 0
    offered_requests_per_s: float = 0.0  # arrivals / duration_s
    achieved_requests_per_s: float = 0.0  # successful requests / wall_s (same as requests_per_s)
    itl_s: dict = field(default_factory=dict)  # pooled inter-chunk gaps, see itl_note
    itl_samples: int = 0
    tpot_s: dict = field(default_factory=dict)  # per-request (latency - ttft) / (completion_tokens - 1)
    tpot_samples: int = 0
    itl_note: str = ""
    turns: int = 1  # multi-turn mode: turns per conversation
    turn_tokens: int = 0  # multi-turn mode: user tokens added a turn (estimated)
    system_tokens: int = 0  # shared-system-prompt mode: tokens of the system message (estimated)
    ttft_by_turn_s: dict = field(default_factory=dict)  # turn -> TTFT summary (multi-turn, streaming)
    ttft_first_s: float | None = None  # shared system prompt: TTFT of the first request
    ttft_rest_s: dict = field(default_factory=dict)  # shared system prompt: TTFT of every later request
    prompt_tokens: int = 0  # as the server's usage reports them
    cached_prompt_tokens: int = 0
    planner: dict = field(default_factory=dict)  # casspec batch planner in the window: steps, ms per step


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float):
        self.base, self.timeout = url.rstrip("/"), timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def _open(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=self.headers)
        return urllib.request.urlopen(req, timeout=self.timeout)

    def get_json(self, path: str) -> dict | None:
        try:
            with self._open("GET", path) as r:
                return json.loads(r.read())
        except Exception:  # noqa: BLE001 - no counters: the report says so
            return None

    def request(self, endpoint: str, prompt: str | list[dict], max_tokens: int, temperature: float,
                stream: bool) -> Sample:
        """Send one completion request and time it (with --stream: each content chunk too); `prompt`: text,
        or the chat messages themselves."""
        body: dict = {"max_tokens": max_tokens, "temperature": temperature, "stream": stream}
        if endpoint == "chat":
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            path, body["messages"] = "/v1/chat/completions", messages
        else:
            path, body["prompt"] = "/v1/completions", prompt
        if stream:
            body["stream_options"] = {"include_usage": True}
        t0 = time.perf_counter()
        try:
            with self._open("POST", path, body) as r:
                if stream:
                    return _read_stream(r, t0)
                data = json.loads(r.read())
                choice = (data.get("choices") or [{}])[0]
                text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
                return _with_usage(Sample(True, time.perf_counter() - t0, r.status, text=text), data.get("usage"))
        except urllib.error.HTTPError as e:
            try:
                code = json.loads(e.read()).get("error", {}).get("code") or ""
            except Exception:  # noqa: BLE001 - an unreadable error body still counts as that HTTP error
                code = ""
            return Sample(False, time.perf_counter() - t0, e.code, f"HTTP {e.code}" + (f" {code}" if code else ""))
        except Exception as e:  # noqa: BLE001 - URLError, timeouts, resets, a server gone mid-stream
            # (http.client.IncompleteRead is no OSError), bad JSON: every failure is counted, none kills a client
            return Sample(False, time.perf_counter() - t0, 0, type(e).__name__)


def _read_stream(r, t0: float) -> Sample:
    """Read an SSE response, stamping every chunk that carries content (TTFT and inter-chunk gaps)."""
    stamps: list[float] = []
    pieces: list[str] = []
    usage, done = None, False
    for raw in r:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        now = time.perf_counter()
        event = json.loads(line[6:])
        if "error" in event:
            return Sample(False, now - t0, r.status,
                          f"stream error: {event['error'].get('code') or event['error'].get('type')}")
        texts = [(c.get("delta") or {}).get("content") or c.get("text") or "" for c in event.get("choices") or []]
        if any(texts):
            stamps.append(now)
            pieces += texts
        if event.get("usage"):
            usage = event["usage"]
    latency = time.perf_counter() - t0
    if not done:
        return Sample(False, latency, r.status, "stream ended without [DONE]")
    return _with_usage(Sample(True, latency, r.status, ttft=stamps[0] - t0 if stamps else None,
                              itl=[b - a for a, b in zip(stamps, stamps[1:])], text="".join(pieces)), usage)


def _with_usage(s: Sample, usage: dict | None) -> Sample:
    """Token counts of a response's usage into its Sample (cached prompt tokens when the server says)."""
    usage = usage or {}
    s.completion_tokens = int(usage.get("completion_tokens", 0) or 0)
    s.prompt_tokens = int(usage.get("prompt_tokens", 0) or 0)
    s.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0)
    return s


class _Run:
    """Shared state of one load run: samples, sent / in-flight / dropped counts, progress line."""

    def __init__(self, deadline: float, max_requests: int, progress: bool):
        self.lock = threading.Lock()
        self.samples: list[Sample] = []
        self.deadline, self.max_requests, self.progress = deadline, max_requests, progress
        self.sent = self.inflight = self.peak = self.dropped = 0

    def try_start(self, cap: int | None = None) -> str:
        """Reserve one request: "ok", "limit" (max_requests reached) or "cap" (counted as dropped)."""
        with self.lock:
            if self.sent >= self.max_requests:
                return "limit"
            if cap is not None and self.inflight >= cap:
                self.dropped += 1
                return "cap"
            self.sent += 1
            self.inflight += 1
            self.peak = max(self.peak, self.inflight)
            return "ok"

    def finish(self, s: Sample) -> None:
        with self.lock:
            self.samples.append(s)
            self.inflight -= 1
            n, errs = len(self.samples), sum(not x.ok for x in self.samples) if self.progress else 0
        if self.progress:
            print(f"\r{n} requests, {errs} errors, {max(0.0, self.deadline - time.perf_counter()):.0f}s left ",
                  end="", file=sys.stderr, flush=True)


def _run_clients(run: _Run, send, clients: int, join_until: float) -> None:
    """Closed loop: ``clients`` threads send back to back until the deadline."""
    def worker(cid: int) -> None:
        i = cid
        while time.perf_counter() < run.deadline and run.try_start() == "ok":
            run.finish(send(i))
            i += clients

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, join_until - time.perf_counter()))


def _run_poisson(run: _Run, send, offsets: list[float], start: float, max_inflight: int,
                 join_until: float) -> None:
    """Open loop: one thread per arrival at ``start + offset``; arrivals over ``max_inflight`` are dropped."""
    threads = []
    for i, off in enumerate(offsets):
        delay = start + off - time.perf_counter()
        if delay > 0:
            time.sleep(delay)  # late arrivals (scheduler behind) go out at once, as an open loop should
        verdict = run.try_start(max_inflight)
        if verdict == "limit":
            break
        if verdict == "ok":
            t = threading.Thread(target=lambda i=i: run.finish(send(i)), daemon=True)
            t.start()
            threads.append(t)
    else:  # the window lasts the whole duration, even when its last arrival came early
        time.sleep(max(0.0, run.deadline - time.perf_counter()))
    for t in threads:
        t.join(max(0.0, join_until - time.perf_counter()))


def run_load(url: str, clients: int = DEFAULT_CLIENTS, duration: float = 60.0, max_tokens: int = 64, *,
             api_key: str | None = None, endpoint: str = "chat", stream: bool = False, temperature: float = 0.0,
             request_timeout: float = 300.0, max_requests: int = 100_000, warmup: int = 1,
             prompts: list[str] | None = None, progress: bool = False, rate: float | None = None,
             max_inflight: int = DEFAULT_MAX_INFLIGHT, seed: int = 0, turns: int = 1, turn_tokens: int = 400,
             system_tokens: int = 0) -> Report:
    """Run the load test and return its Report (bounded by ``duration`` + one request timeout).

    With ``rate`` (requests/s) it runs the open-loop Poisson mode and ``clients`` is ignored. ``turns`` > 1:
    each client holds multi-turn chats (``turn_tokens`` user tokens a turn); ``system_tokens`` > 0: every
    request opens with the same system message of about that many tokens (loadtest_chat.py).
    """
    prompts = prompts or PROMPTS
    offsets = poisson_arrivals(rate, duration, seed) if rate is not None else []
    if rate is not None and max_inflight < 1:
        raise ValueError("max_inflight must be >= 1")
    if (turns > 1 or system_tokens) and endpoint != "chat":
        raise ValueError("multi-turn and shared-system-prompt runs use the chat endpoint")
    if turns > 1 and rate is not None:
        raise ValueError("multi-turn runs are closed loop (clients), not Poisson arrivals")
    client = Client(url, api_key, request_timeout)
    system = system_message(system_tokens, seed) if system_tokens else None
    order = itertools.count()

    def ask(prompt: str | list[dict], timed: bool = True) -> Sample:
        t0 = time.perf_counter()
        seq = next(order) if timed else -1
        try:
            sample = client.request(endpoint, prompt, max_tokens, temperature, stream)
        except Exception as e:  # noqa: BLE001 - belt and braces: a client thread never dies uncounted
            sample = Sample(False, time.perf_counter() - t0, 0, type(e).__name__)
        sample.seq = seq
        return sample

    def send(i: int) -> Sample:
        prompt = prompts[i % len(prompts)]
        return ask(with_system(system, prompt) if system else prompt)

    for i in range(warmup):  # first requests pay one-off costs (e.g. building the int8 drafter); never
        ask(prompts[i % len(prompts)], timed=False)  # the system prompt: its first timed request finds it cold
    before = client.get_json("/metrics")
    start = time.perf_counter()
    run = _Run(start + duration, max_requests, progress)
    join_until = run.deadline + request_timeout + 5
    if turns > 1:
        run_conversations(run, ask, clients, turns, turn_tokens, system, seed, join_until)
    elif rate is None:
        _run_clients(run, send, clients, join_until)
    else:
        _run_poisson(run, send, offsets, start, max_inflight, join_until)
    wall = time.perf_counter() - start
    if progress:
        print(file=sys.stderr)
    after = client.get_json("/metrics")
    with run.lock:
        done, sent, dropped, peak = list(run.samples), run.sent, run.dropped, run.peak
    rep = Report(url=url, clients=0 if rate is not None else clients, duration_s=duration, max_tokens=max_tokens,
                 endpoint=endpoint, stream=stream, mode="clients" if rate is None else "poisson", rate=rate,
                 seed=seed if rate is not None else None, max_inflight=max_inflight if rate is not None else None,
                 arrivals=sent + dropped, dropped=dropped, peak_inflight=peak)
    fill_report(rep, done, wall)
    rep.server = server_delta(before, after)
    rep.planner = _planner_delta(before, after)
    ok = [x for x in done if x.ok]
    rep.prompt_tokens, rep.cached_prompt_tokens = sum(x.prompt_tokens for x in ok), sum(x.cached_tokens for x in ok)
    if turns > 1:
        rep.mode, rep.turns, rep.turn_tokens = "conversations", turns, turn_tokens
        rep.ttft_by_turn_s = ttft_by_turn(done)
    if system_tokens:
        rep.system_tokens = system_tokens
        rep.ttft_first_s, rep.ttft_rest_s = first_and_rest(done)
    return rep


def _planner_delta(before: dict | None, after: dict | None) -> dict:
    """The casspec batch planner's steps and time in the window (from /metrics), or {}."""
    try:
        a, b = after["batch_planner"], (before or {}).get("batch_planner") or {}
        steps = a["steps"] - b.get("steps", 0)
        seconds = a["seconds"] - b.get("seconds", 0.0)
        planned, left = a["planned"] - b.get("planned", 0), a["left_out"] - b.get("left_out", 0)
    except (TypeError, KeyError):
        return {}
    return {"steps": steps, "seconds": round(seconds, 6), "ms_per_step": 1000 * seconds / steps if steps else 0.0,
            "planned": planned, "left_out": left}


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
