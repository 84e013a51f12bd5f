"""``casspec loadtest``: a small, bounded load test against a running ``casspec serve`` (or any OpenAI server).

N client threads send chat (or text) completion requests back to back for a fixed duration, then it
prints requests served, errors, latency percentiles, time to first token (with --stream) and token
throughput, plus the server's own counters (/metrics delta: tokens/s, mean accepted length) when present.
Standard library only (urllib + threads); it always stops by itself: no new request starts after
--duration, and each request has a timeout.

    casspec loadtest --url http://127.0.0.1:8000 --clients 4 --duration 60 --max-tokens 64
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

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


@dataclass
class Report:
    url: str
    clients: int
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


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "mean": sum(values) / len(values), "max": max(values)}


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
        except (OSError, ValueError):
            return None

    def request(self, endpoint: str, prompt: str, max_tokens: int, temperature: float, stream: bool) -> Sample:
        body: dict = {"max_tokens": max_tokens, "temperature": temperature, "stream": stream}
        if endpoint == "chat":
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
        else:
            path, body["prompt"] = "/v1/completions", prompt
        if stream:
            body["stream_options"] = {"include_usage": True}
        t0 = time.perf_counter()
        try:
            with self._open("POST", path, body) as r:
                if not stream:
                    data = json.loads(r.read())
                    return Sample(True, time.perf_counter() - t0, r.status,
                                  completion_tokens=int(data.get("usage", {}).get("completion_tokens", 0)))
                ttft, tokens, done = None, 0, False
                for raw in r:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        return Sample(False, time.perf_counter() - t0, r.status,
                                      f"stream error: {event['error'].get('code') or event['error'].get('type')}")
                    if ttft is None and any((c.get("delta") or {}).get("content") or c.get("text")
                                            for c in event.get("choices", [])):
                        ttft = time.perf_counter() - t0
                    if event.get("usage"):
                        tokens = int(event["usage"].get("completion_tokens", 0))
                if not done:
                    return Sample(False, time.perf_counter() - t0, r.status, "stream ended without [DONE]")
                return Sample(True, time.perf_counter() - t0, r.status, completion_tokens=tokens, ttft=ttft)
        except urllib.error.HTTPError as e:
            try:
                code = json.loads(e.read()).get("error", {}).get("code") or ""
            except (OSError, ValueError):
                code = ""
            return Sample(False, time.perf_counter() - t0, e.code, f"HTTP {e.code}" + (f" {code}" if code else ""))
        except (OSError, ValueError) as e:  # URLError, timeouts, resets, bad JSON
            return Sample(False, time.perf_counter() - t0, 0, type(e).__name__)


def run_load(url: str, clients: int = 4, duration: float = 60.0, max_tokens: int = 64, *, api_key: str | None = None,
             endpoint: str = "chat", stream: bool = False, temperature: float = 0.0, request_timeout: float = 300.0,
             max_requests: int = 100_000, warmup: int = 1, prompts: list[str] | None = None,
             progress: bool = False) -> Report:
    """Run the load test and return its Report (bounded by ``duration`` + one request timeout)."""
    prompts = prompts or PROMPTS
    client = Client(url, api_key, request_timeout)
    for i in range(warmup):  # first requests pay one-off costs (e.g. building the int8 drafter)
        client.request(endpoint, prompts[i % len(prompts)], max_tokens, temperature, stream)
    before = client.get_json("/metrics")
    samples: list[Sample] = []
    lock = threading.Lock()
    count = [0]
    start = time.perf_counter()
    deadline = start + duration

    def worker(cid: int) -> None:
        i = cid
        while time.perf_counter() < deadline:
            with lock:
                if count[0] >= max_requests:
                    return
                count[0] += 1
            s = client.request(endpoint, prompts[i % len(prompts)], max_tokens, temperature, stream)
            i += clients
            with lock:
                samples.append(s)
            if progress:
                print(f"\r{len(samples)} requests, {sum(not x.ok for x in samples)} errors, "
                      f"{max(0.0, deadline - time.perf_counter()):.0f}s left ", end="", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + request_timeout + 5)
    wall = time.perf_counter() - start
    if progress:
        print(file=sys.stderr)
    after = client.get_json("/metrics")

    with lock:
        done = list(samples)
    ok = [s for s in done if s.ok]
    rep = Report(url=url, clients=clients, duration_s=duration, max_tokens=max_tokens, endpoint=endpoint,
                 stream=stream, wall_s=round(wall, 3), requests=len(done), ok=len(ok), errors=len(done) - len(ok))
    for s in done:
        if not s.ok:
            rep.errors_by_kind[s.error] = rep.errors_by_kind.get(s.error, 0) + 1
    rep.latency_s = _summary([s.latency for s in ok])
    rep.ttft_s = _summary([s.ttft for s in ok if s.ttft is not None])
    rep.completion_tokens = sum(s.completion_tokens for s in ok)
    rep.tokens_per_s = rep.completion_tokens / wall if wall > 0 else 0.0
    rep.requests_per_s = len(ok) / wall if wall > 0 else 0.0
    rep.server = _server_delta(before, after)
    return rep


def _server_delta(before: dict | None, after: dict | None) -> dict:
    """Server-side numbers over the run, from two casspec /metrics snapshots."""
    try:
        g0, g1 = before["generation"], after["generation"]
        t0, t1 = before["tokens"], after["tokens"]
        gen_time = g1["time_s"] - g0["time_s"]
        comp = t1["completion"] - t0["completion"]
        steps = g1["verify_steps"] - g0["verify_steps"]
        committed_before = g0["mean_accepted_length"] * g0["verify_steps"]
        committed_after = g1["mean_accepted_length"] * g1["verify_steps"]
        out = {"model": after.get("model"), "method": after.get("method"),
               "generations": g1["count"] - g0["count"], "completion_tokens": comp,
               "generation_time_s": round(gen_time, 3),
               "tokens_per_s_while_generating": comp / gen_time if gen_time > 0 else 0.0,
               "mean_accepted_length": (committed_after - committed_before) / steps if steps else 0.0,
               "rejected_queue_full": after["requests"]["rejected_queue_full"] - before["requests"]["rejected_queue_full"],
               "timeouts": after["requests"]["timeouts"] - before["requests"]["timeouts"]}
        out["drafters"] = {}
        for name, d1 in after.get("drafters", {}).items():
            d0 = before.get("drafters", {}).get(name, {"proposed": 0, "accepted": 0})
            prop, acc = d1["proposed"] - d0["proposed"], d1["accepted"] - d0["accepted"]
            out["drafters"][name] = {"proposed": prop, "accepted": acc, "acceptance": acc / prop if prop else 0.0}
        return out
    except (TypeError, KeyError):  # not a casspec server, or /metrics unavailable
        return {}


def format_report(rep: Report) -> str:
    lat, ttft = rep.latency_s, rep.ttft_s
    lines = [
        f"load test: {rep.clients} clients x {rep.duration_s:g} s window ({rep.wall_s:.1f} s until the last reply) "
        f"-> {rep.url} ({rep.endpoint}, "
        f"max_tokens {rep.max_tokens}, {'stream' if rep.stream else 'no stream'})",
        f"  requests: {rep.requests} ({rep.ok} ok, {rep.errors} errors{': ' + str(rep.errors_by_kind) if rep.errors else ''})",
        f"  throughput: {rep.requests_per_s:.2f} req/s, {rep.completion_tokens} completion tokens, "
        f"{rep.tokens_per_s:.1f} tok/s (client side, wall clock)",
    ]
    if lat:
        lines.append(f"  latency: p50 {lat['p50']:.2f} s, p95 {lat['p95']:.2f} s, p99 {lat['p99']:.2f} s, "
                     f"mean {lat['mean']:.2f} s, max {lat['max']:.2f} s")
    if ttft:
        lines.append(f"  time to first token: p50 {ttft['p50']:.2f} s, p95 {ttft['p95']:.2f} s")
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
                              description="Concurrent clients against an OpenAI-compatible server for a fixed time.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: http://127.0.0.1:8000)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default: 4)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to keep starting requests (default: 60)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default: 64)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--stream", action="store_true", help="stream responses (measures time to first token)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request (default: 300)")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first (default: 1)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON ('-' = stdout)")
    p.set_defaults(func=loadtest)


def loadtest(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.max_tokens < 1 or not 0 < args.duration <= 24 * 3600 or args.max_requests < 1:
        print("error: --clients, --max-tokens, --max-requests must be >= 1 and --duration in (0, 86400]",
              file=sys.stderr)
        return 2
    rep = run_load(args.url, args.clients, args.duration, args.max_tokens, api_key=args.api_key,
                   endpoint=args.endpoint, stream=args.stream, temperature=args.temperature,
                   request_timeout=args.request_timeout, max_requests=args.max_requests, warmup=args.warmup,
                   progress=sys.stderr.isatty())
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
