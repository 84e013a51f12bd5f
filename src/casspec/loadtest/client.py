"""Requests and what one request measured: the client of `casspec loadtest`."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

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
