"""Statistics for ``casspec loadtest``: percentiles, streaming timing metrics and the Poisson schedule.

Standard library only. Every number here is derived from measured per-request timings
(``time.perf_counter`` around real HTTP calls, see :mod:`casspec.loadtest`).

Streaming metrics (the names follow vLLM's ``benchmark_serving``):

* TTFT: time from sending the request to the first content chunk.
* ITL (inter-token latency): the gaps between consecutive content chunks of one response, pooled over
  all requests. With speculative decoding one chunk may carry several tokens (a verify step commits
  several at once), so ITL is really "inter-chunk" latency.
* TPOT (time per output token): per request, ``(latency - ttft) / (completion_tokens - 1)`` when it
  produced more than one token; this one is per token whatever the chunking.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

ITL_NOTE = ("inter-token latency is measured between streamed content chunks; speculative decoding can "
            "commit several tokens per step, so one chunk may carry several tokens (see TPOT for per-token time)")


class TimedSample(Protocol):
    """What the statistics need from one request's measurement."""

    ok: bool
    latency: float
    error: str
    completion_tokens: int
    ttft: float | None
    itl: list[float]


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def summary(values: list[float]) -> dict:
    """p50/p95/p99/mean/max of ``values``; ``{}`` when empty."""
    if not values:
        return {}
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "mean": sum(values) / len(values), "max": max(values)}


def tpot(sample: TimedSample) -> float | None:
    """Time per output token after the first, ``(latency - ttft) / (tokens - 1)``; None if undefined."""
    if sample.ttft is None or sample.completion_tokens <= 1:
        return None
    return max(0.0, sample.latency - sample.ttft) / (sample.completion_tokens - 1)


def timing_stats(samples: Iterable[TimedSample]) -> dict:
    """Latency, TTFT, pooled ITL and TPOT summaries over the successful samples."""
    ok = [s for s in samples if s.ok]
    itl = [gap for s in ok for gap in s.itl]
    tpots = [t for t in (tpot(s) for s in ok) if t is not None]
    return {"latency_s": summary([s.latency for s in ok]),
            "ttft_s": summary([s.ttft for s in ok if s.ttft is not None]),
            "itl_s": summary(itl), "itl_samples": len(itl),
            "tpot_s": summary(tpots), "tpot_samples": len(tpots)}


def fill_report(rep: Any, done: Sequence[TimedSample], wall: float) -> None:
    """Counts, rates and timing summaries of the finished samples into ``rep`` (a loadtest Report)."""
    ok = [s for s in done if s.ok]
    rep.wall_s, rep.requests, rep.ok, rep.errors = round(wall, 3), len(done), len(ok), len(done) - len(ok)
    for s in done:
        if not s.ok:
            rep.errors_by_kind[s.error] = rep.errors_by_kind.get(s.error, 0) + 1
    stats = timing_stats(done)
    rep.latency_s, rep.ttft_s, rep.itl_s, rep.tpot_s = (stats["latency_s"], stats["ttft_s"], stats["itl_s"],
                                                        stats["tpot_s"])
    rep.itl_samples, rep.tpot_samples = stats["itl_samples"], stats["tpot_samples"]
    rep.itl_note = ITL_NOTE if rep.stream else ""
    rep.completion_tokens = sum(s.completion_tokens for s in ok)
    rep.tokens_per_s = rep.completion_tokens / wall if wall > 0 else 0.0
    rep.requests_per_s = rep.achieved_requests_per_s = len(ok) / wall if wall > 0 else 0.0
    rep.offered_requests_per_s = rep.arrivals / rep.duration_s if rep.duration_s > 0 else 0.0


def poisson_arrivals(rate: float, duration: float, seed: int) -> list[float]:
    """Arrival offsets (seconds from the start, all < ``duration``) of a Poisson process at ``rate``/s.

    Exponential inter-arrival times from ``random.Random(seed)``: the same seed gives the same schedule.
    """
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive finite number, got {rate!r}")
    rng, t = random.Random(seed), 0.0
    out: list[float] = []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(t)


def server_delta(before: dict | None, after: dict | None) -> dict:
    """Server-side numbers over the run, from two casspec /metrics snapshots."""
    if before is None or after is None:  # /metrics unavailable
        return {}
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


def format_summary(name: str, d: dict, unit_ms: bool = False) -> str:
    """One report line for a summary dict, in seconds or milliseconds."""
    k, u = (1000.0, "ms") if unit_ms else (1.0, "s")
    fmt = ".1f" if unit_ms else ".2f"
    parts = ", ".join(f"{key} {d[key] * k:{fmt}} {u}" for key in ("p50", "p95", "p99", "mean", "max"))
    return f"  {name}: {parts}"
