"""Driving a server for a while: closed-loop clients, Poisson arrivals, conversations."""
from __future__ import annotations

import itertools
import sys
import threading
import time

from casspec.loadtest.chat import first_and_rest, run_conversations, system_message, ttft_by_turn, with_system
from casspec.loadtest.client import DEFAULT_CLIENTS, DEFAULT_MAX_INFLIGHT, PROMPTS, Client, Report, Sample
from casspec.loadtest.stats import fill_report, poisson_arrivals, server_delta


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
    _check_mode(endpoint, rate, max_inflight, turns, system_tokens)
    offsets = poisson_arrivals(rate, duration, seed) if rate is not None else []
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
    _fill(rep, done, wall, before, after, turns, turn_tokens, system_tokens)
    return rep


def _check_mode(endpoint: str, rate: float | None, max_inflight: int, turns: int, system_tokens: int) -> None:
    """ValueError for a combination of load modes that does not exist."""
    if rate is not None and max_inflight < 1:
        raise ValueError("max_inflight must be >= 1")
    if (turns > 1 or system_tokens) and endpoint != "chat":
        raise ValueError("multi-turn and shared-system-prompt runs use the chat endpoint")
    if turns > 1 and rate is not None:
        raise ValueError("multi-turn runs are closed loop (clients), not Poisson arrivals")


def _fill(rep: Report, done: list[Sample], wall: float, before: dict | None, after: dict | None, turns: int,
          turn_tokens: int, system_tokens: int) -> None:
    """The report's measurements: latencies and throughput, the server's and planner's counters over the window,
    cached prompt tokens, and TTFT by turn (multi-turn) or first against the rest (shared system prompt)."""
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


def _planner_delta(before: dict | None, after: dict | None) -> dict:
    """The casspec batch planner's steps and time in the window (from /metrics), or {}."""
    if after is None:  # /metrics unavailable
        return {}
    try:
        a, b = after["batch_planner"], (before or {}).get("batch_planner") or {}
        steps = a["steps"] - b.get("steps", 0)
        seconds = a["seconds"] - b.get("seconds", 0.0)
        planned, left = a["planned"] - b.get("planned", 0), a["left_out"] - b.get("left_out", 0)
    except (TypeError, KeyError):
        return {}
    return {"steps": steps, "seconds": round(seconds, 6), "ms_per_step": 1000 * seconds / steps if steps else 0.0,
            "planned": planned, "left_out": left}
