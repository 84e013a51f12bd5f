"""``casspec loadtest``: a small, bounded load test against a running ``casspec serve`` (or any OpenAI server).

Two exclusive modes drive the server for --duration seconds:

* closed loop (default): --clients N threads send chat (or text) completion requests back to back;
* open loop: --rate R requests/s arrive as a Poisson process (exponential gaps from random.Random(--seed)),
  each in its own thread, at most --max-inflight at once; arrivals over that cap are counted as dropped.

It prints requests served, errors, throughput, latency percentiles and, with --stream, time to first token,
inter-token latency and time per output token (see casspec.loadtest.stats), plus the server's own counters
(/metrics delta: tokens/s, mean accepted length) when present. Standard library only (urllib + threads);
it always stops by itself: no new request starts after --duration, and each request has a timeout.

    casspec loadtest --url http://127.0.0.1:8000 --clients 4 --duration 60 --max-tokens 64
    casspec loadtest --url http://127.0.0.1:8000 --rate 2 --duration 60 --stream
    casspec loadtest --clients 4 --turns 4 --turn-tokens 400 --stream        # multi-turn chats, TTFT per turn
    casspec loadtest --clients 8 --system-tokens 1000 --stream               # one shared system prompt

(The multi-turn and shared-system-prompt workloads are in casspec.loadtest.chat.)
"""
from __future__ import annotations

from casspec.loadtest.cli import add_parser, format_report, loadtest, main
from casspec.loadtest.client import PROMPTS, Client, Report, Sample
from casspec.loadtest.run import run_load
from casspec.loadtest.stats import percentile

__all__ = ["PROMPTS", "Client", "Report", "Sample", "add_parser", "format_report", "loadtest", "main", "percentile",
           "run_load"]
