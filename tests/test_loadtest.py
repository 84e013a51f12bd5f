"""``casspec loadtest`` against a tiny in-process fake OpenAI server (no model): both modes, streaming metrics."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from casspec.loadtest import Report, Sample, format_report, main, run_load
from casspec.loadtest.stats import poisson_arrivals, timing_stats, tpot


class FakeOpenAI:
    """/v1/chat/completions (streaming and not) on 127.0.0.1, a free port, with controllable delays.

    Streaming: waits ``first_delay``, then sends ``chunks`` content chunks ``gap`` seconds apart, each standing
    for ``tokens_per_chunk`` tokens (like a speculative step), then a usage chunk and ``data: [DONE]``.
    Non-streaming: waits ``delay`` and answers with ``chunks * tokens_per_chunk`` completion tokens.
    """

    def __init__(self, delay: float = 0.01, first_delay: float = 0.01, gap: float = 0.0, chunks: int = 3,
                 tokens_per_chunk: int = 1):
        self.delay, self.first_delay, self.gap = delay, first_delay, gap
        self.chunks, self.tokens_per_chunk = chunks, tokens_per_chunk
        self.received, self.lock = 0, threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                with fake.lock:
                    fake.received += 1
                fake.stream(self) if body.get("stream") else fake.plain(self)

        return Handler

    def plain(self, h: BaseHTTPRequestHandler) -> None:
        time.sleep(self.delay)
        n = self.chunks * self.tokens_per_chunk
        data = json.dumps({"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi " * n}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def stream(self, h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()

        def send(event) -> None:
            h.wfile.write(f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode())
            h.wfile.flush()

        send({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})  # role only: not content
        time.sleep(self.first_delay)
        for i in range(self.chunks):
            if i:
                time.sleep(self.gap)
            send({"choices": [{"index": 0, "delta": {"content": "tok " * self.tokens_per_chunk}}]})
        n = self.chunks * self.tokens_per_chunk
        send({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}})
        send("[DONE]")

    def __enter__(self) -> FakeOpenAI:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_poisson_schedule_is_seeded_and_has_the_right_rate():
    a = poisson_arrivals(5.0, 2.0, seed=3)
    assert a == poisson_arrivals(5.0, 2.0, seed=3) and a != poisson_arrivals(5.0, 2.0, seed=4)
    assert all(0 < x < 2.0 for x in a) and a == sorted(a)
    long = poisson_arrivals(100.0, 100.0, seed=0)  # ~10000 arrivals, sd ~100
    assert 9500 < len(long) < 10500
    gaps = [b - a for a, b in zip(long, long[1:])]
    assert 0.009 < sum(gaps) / len(gaps) < 0.011
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, 1.0, seed=0)


def test_stats_from_known_chunk_timings():
    s1 = Sample(True, latency=0.5, completion_tokens=5, ttft=0.1, itl=[0.01, 0.03, 0.02])
    s2 = Sample(True, latency=0.3, completion_tokens=1, ttft=0.3)  # one token: no TPOT
    bad = Sample(False, latency=9.0, error="HTTP 500", itl=[5.0])  # failures are left out
    assert tpot(s1) == pytest.approx(0.1) and tpot(s2) is None
    st = timing_stats([s1, s2, bad])
    assert st["itl_samples"] == 3 and st["itl_s"]["p50"] == 0.02 and st["itl_s"]["max"] == 0.03
    assert st["tpot_samples"] == 1 and st["tpot_s"]["p50"] == pytest.approx(0.1)
    assert st["ttft_s"]["p50"] == 0.1 and st["latency_s"]["max"] == 0.5


def test_poisson_mode_sends_about_rate_times_duration():
    rate, duration, seed = 40.0, 1.0, 7
    expected = len(poisson_arrivals(rate, duration, seed))
    assert 20 <= expected <= 65
    with FakeOpenAI(delay=0.01) as srv:
        rep = run_load(srv.url, duration=duration, max_tokens=4, rate=rate, seed=seed, warmup=1, request_timeout=5)
        received = srv.received
    assert (rep.mode, rep.rate, rep.seed, rep.clients, rep.max_inflight) == ("poisson", rate, seed, 0, 64)
    assert rep.arrivals == expected and rep.dropped == 0 and rep.requests == expected == rep.ok
    assert received == expected + 1  # + the warmup request
    assert rep.offered_requests_per_s == pytest.approx(expected / duration)
    assert rep.wall_s >= duration
    assert 0 < rep.achieved_requests_per_s == rep.requests_per_s <= rep.offered_requests_per_s
    assert rep.completion_tokens == 3 * rep.ok and rep.tokens_per_s > 0 and 1 <= rep.peak_inflight <= 64
    assert rep.latency_s["p50"] >= 0.01 and not rep.itl_s and not rep.ttft_s  # no streaming: no chunk timings


def test_streaming_itl_ttft_tpot_come_from_chunk_timings():
    with FakeOpenAI(first_delay=0.05, gap=0.02, chunks=6, tokens_per_chunk=2) as srv:
        rep = run_load(srv.url, duration=0.6, max_tokens=12, stream=True, rate=10.0, seed=1, request_timeout=5)
    assert rep.ok >= 2 and rep.errors == 0 and rep.completion_tokens == 12 * rep.ok
    assert rep.itl_samples == 5 * rep.ok and rep.tpot_samples == rep.ok
    assert 0.015 <= rep.itl_s["p50"] <= 0.06  # the server sleeps 20 ms between chunks
    assert rep.itl_s["p95"] >= rep.itl_s["p50"] and rep.itl_s["max"] >= rep.itl_s["p99"]
    assert 0.04 <= rep.ttft_s["p50"] <= 0.25
    # TPOT = (latency - ttft) / 11 tokens ~ 5 gaps * 20 ms / 11 ~ 9 ms: below ITL, as 2 tokens come per chunk
    assert 0.007 <= rep.tpot_s["p50"] <= 0.03 and rep.tpot_s["p50"] < rep.itl_s["p50"]
    assert "speculative decoding" in rep.itl_note
    text = format_report(rep)
    assert "inter-token latency" in text and "time per output token" in text and "poisson arrivals at 10" in text


def test_tiny_max_inflight_drops_arrivals():
    with FakeOpenAI(delay=0.3) as srv:
        rep = run_load(srv.url, duration=0.5, max_tokens=3, rate=60.0, seed=2, max_inflight=1, warmup=0,
                       request_timeout=5)
    assert rep.arrivals == len(poisson_arrivals(60.0, 0.5, 2))
    assert rep.requests + rep.dropped == rep.arrivals and rep.peak_inflight == 1
    assert 1 <= rep.requests <= 3 and rep.dropped >= 10 and rep.errors == 0
    assert "dropped" in format_report(rep)


def test_rate_and_clients_together_is_an_error(capsys):
    assert main(["--url", "http://127.0.0.1:9", "--rate", "5", "--clients", "2", "--duration", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "--rate" in err and "--clients" in err and "exclusive" in err
    assert main(["--url", "http://127.0.0.1:9", "--rate", "0", "--duration", "0.2"]) == 2
    assert main(["--url", "http://127.0.0.1:9", "--rate", "5", "--max-inflight", "0", "--duration", "0.2"]) == 2


def test_cli_rate_mode_json(capsys):
    with FakeOpenAI(delay=0.005) as srv:
        assert main(["--url", srv.url, "--rate", "20", "--seed", "5", "--duration", "0.4", "--max-tokens", "3",
                     "--stream", "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "poisson" and out["rate"] == 20.0 and out["arrivals"] == len(poisson_arrivals(20, 0.4, 5))
    assert out["ok"] == out["requests"] and out["itl_s"] and out["ttft_s"] and out["tpot_s"]


def test_clients_mode_unchanged_and_reports_new_fields(capsys):
    with FakeOpenAI(first_delay=0.01, gap=0.005, chunks=3) as srv:
        rep = run_load(srv.url, clients=2, duration=0.4, max_tokens=3, stream=True, request_timeout=5)
        assert main(["--url", srv.url, "--duration", "0.3", "--max-tokens", "3"]) == 0  # default: 4 clients
    old = {"url", "clients", "duration_s", "max_tokens", "endpoint", "stream", "wall_s", "requests", "ok", "errors",
           "errors_by_kind", "latency_s", "ttft_s", "completion_tokens", "tokens_per_s", "requests_per_s", "server"}
    d = asdict(rep)
    assert old <= d.keys() and isinstance(rep, Report)
    assert (rep.mode, rep.clients, rep.rate, rep.dropped) == ("clients", 2, None, 0)
    assert rep.ok >= 4 and rep.errors == 0 and rep.arrivals == rep.requests and rep.peak_inflight <= 2
    assert rep.latency_s["p95"] >= rep.latency_s["p50"] > 0 and rep.ttft_s and rep.itl_s and rep.tpot_s
    assert rep.server == {}  # the fake has no /metrics
    out = capsys.readouterr().out
    assert "load test: 4 clients" in out and "latency: p50" in out


class DyingServer:
    """Answers 200 with a Content-Length it never fills, or a chunked SSE stream cut off mid-chunk: the
    server dying mid-response (http.client raises IncompleteRead, which is no OSError)."""

    def __init__(self, stream: bool):
        self.stream = stream
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self):
        stream = self.stream

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                if stream:
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"200\r\ndata: {\"choices\": [{\"delta\": {\"content\": \"hi\"}}]}\n\n")
                else:
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"usage": {"completion')
                self.wfile.flush()
                self.close_connection = True

        return Handler

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("stream", [False, True])
def test_server_dying_mid_response_is_counted_and_kills_no_client(stream, monkeypatch):
    died = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_type))
    with DyingServer(stream) as srv:
        rep = run_load(srv.url, clients=2, duration=0.3, max_tokens=4, stream=stream, warmup=0, request_timeout=5)
    assert not died, died
    assert rep.requests > 0 and rep.ok == 0 and rep.errors == rep.requests, (rep.requests, rep.errors_by_kind)
