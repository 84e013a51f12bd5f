"""End-to-end tests of `casspec serve`: real uvicorn servers on loopback ports, the official openai client.

Servers run uvicorn in a thread of this process (tiny random model or a controllable fake engine) and,
once, as a real `python -m casspec.server` subprocess (the CLI path, with --api-key).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

import casspec
from casspec.errors import ContextOverflowError, InvalidRequestError
from casspec.metrics import DrafterStats, GenerationResult, GenerationStats, StreamChunk
from casspec.server import create_app

SRC = str(Path(casspec.__file__).resolve().parents[1])


# -- helpers ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn serving ``app`` on a free loopback port from a background thread."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> openai.OpenAI:
        kw.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kw)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert time.monotonic() - t0 < 20, "server did not start"
            assert self.thread.is_alive(), "server thread died"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_until(pred, timeout: float = 10.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)


def sse_events(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = "any") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    if param != "any":
        assert err["param"] == param, err
    return err


class FakeEngine:
    """The Engine surface with controllable speed; detects concurrent use; records start order."""

    methods = ("ar", "casspec")

    def __init__(self, name: str = "fake", has_chat_template: bool = True, delay: float = 0.0,
                 context_length: int = 64):
        self.name, self.has_chat_template, self.delay, self.context_length = name, has_chat_template, delay, context_length
        self._busy = threading.Lock()
        self.overlaps = 0
        self.started: list[str] = []
        self.ended: list[str] = []  # "done" | "cancelled" | "closed", in order

    @staticmethod
    def key(prompt) -> str:
        return prompt if isinstance(prompt, str) else prompt[-1]["content"]

    def reply(self, prompt, n: int) -> str:
        src = "reply to " + self.key(prompt) + ". "
        return "".join(src[i % len(src)] for i in range(n))

    def iter_generate(self, prompt, method="casspec", *, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0,
                      seed=None, stop=None, chat=None, cancel=None):
        if method not in self.methods:
            raise InvalidRequestError(f"unknown method {method!r}")
        if not self.key(prompt).strip():
            raise InvalidRequestError("prompt is empty")
        if len(self.key(prompt)) >= self.context_length:
            raise ContextOverflowError("prompt does not fit")
        if not self._busy.acquire(blocking=False):
            self.overlaps += 1
            raise RuntimeError("engine used concurrently")
        stats = GenerationStats(method=method, prompt_tokens=len(self.key(prompt)))
        stats.drafters["fake"] = DrafterStats(proposed=4, accepted=3)
        text, how = self.reply(prompt, max_new_tokens), "closed"
        self.started.append(self.key(prompt))
        try:
            out = ""
            for ch in text:
                if cancel is not None and cancel.is_set():
                    how = "cancelled"
                    break
                time.sleep(self.delay)
                out += ch
                stats.accept_lengths.append(1)
                yield StreamChunk(ch, [ord(ch)])
            else:
                how = "done"
            stats.new_tokens, stats.wall_time = len(out), 0.001 + self.delay * len(out)
            stats.finish_reason = "length" if how == "done" else "cancelled"
            yield StreamChunk("", [], GenerationResult(out, [ord(c) for c in out], stats))
        finally:
            self.ended.append(how)
            self._busy.release()

    def generate(self, prompt, method="casspec", **kw):
        return [c.result for c in self.iter_generate(prompt, method, **kw) if c.result is not None][0]


# -- the tiny random model behind a real server ---------------------------------------------------------------
@pytest.fixture(scope="module")
def ref():
    from casspec.testing import tiny_engine

    return tiny_engine()


@pytest.fixture(scope="module")
def tiny():
    from casspec.testing import tiny_engine

    app = create_app(tiny_engine(), method="casspec", max_queue=16, max_tokens_limit=64, request_timeout=120)
    with ThreadServer(app) as srv:
        yield srv


_expected: dict = {}


def expected(ref, prompt, n, **kw) -> str:
    key = (json.dumps(prompt), n, json.dumps(kw, sort_keys=True))
    if key not in _expected:
        _expected[key] = ref.generate(prompt, "casspec", max_new_tokens=n, **kw).text
    return _expected[key]


def test_models_and_health(tiny):
    c = tiny.client()
    ids = [m.id for m in c.models.list().data]
    assert ids == ["tiny-llama"]
    assert c.models.retrieve("casspec").id == "tiny-llama"
    h = httpx.get(tiny.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny-llama"


def test_completions_stream_equals_nonstream_equals_engine(tiny, ref):
    c = tiny.client()
    r = c.completions.create(model="tiny-llama", prompt="The quick brown fox", max_tokens=12, temperature=0)
    want = expected(ref, "The quick brown fox", 12, temperature=0.0, chat=False)
    assert r.choices[0].text == want and r.choices[0].finish_reason in ("length", "stop")
    assert r.object == "text_completion" and r.model == "tiny-llama"
    assert r.usage.prompt_tokens == len(ref.encode_prompt("The quick brown fox", chat=False))
    assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ext = r.model_extra["casspec"]
    assert ext["method"] == "casspec" and ext["mean_accepted_length"] >= 1 and ext["tokens_per_s"] > 0
    assert isinstance(ext["drafters"], dict)
    chunks = list(c.completions.create(model="casspec", prompt="The quick brown fox", max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["casspec"]["method"] == "casspec"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_stream_equals_nonstream_equals_engine(tiny, ref):
    c = tiny.client()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=12, temperature=0)
    want = expected(ref, msgs, 12, temperature=0.0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(ref.encode_prompt(msgs))
    assert r.model_extra["casspec"]["method"] == "casspec"
    stream = c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # content parts are joined; "developer" is a system message
    r2 = c.chat.completions.create(model="tiny-llama", max_tokens=12, temperature=0, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}])
    assert r2.choices[0].message.content == want


def test_sampling_seed_and_stop(tiny, ref):
    c = tiny.client()
    kw = dict(model="tiny-llama", prompt="Once upon a time", max_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    # coupled sampling (default): a seed gives the tokens plain `ar` decoding samples, whatever the drafts
    a = c.completions.create(**kw)
    assert a.choices[0].finish_reason in ("length", "stop") and 1 <= a.usage.completion_tokens <= 10
    assert a.choices[0].text == ref.generate("Once upon a time", "ar", max_new_tokens=10, temperature=0.9, top_p=0.95,
                                             seed=7, chat=False).text
    b = [ch for ch in c.completions.create(stream=True, extra_body={"top_k": 50, "min_p": 0.05}, **kw)]
    assert b[-1].choices[0].finish_reason in ("length", "stop")
    assert "".join(ch.choices[0].text for ch in b) == ref.generate(
        "Once upon a time", "ar", max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=50, min_p=0.05, seed=7,
        chat=False).text
    r = c.completions.create(extra_body={"sampling_rule": "rejection"}, **kw)  # the other rule is served too
    assert 1 <= r.usage.completion_tokens <= 10
    full = expected(ref, "Once upon a time", 12, temperature=0.0, chat=False)
    stop = next((full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].isprintable()
                 and full[i:i + 2] not in full[:i]), None)
    if stop:
        r = c.completions.create(model="tiny-llama", prompt="Once upon a time", max_tokens=12, temperature=0,
                                 stop=[stop])
        assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_eight_concurrent_clients(tiny, ref):
    prompts = [f"Client {i} says hello" for i in range(8)]
    want = {p: expected(ref, p, 8, temperature=0.0, chat=False) for p in prompts[:4]}
    want.update({p: expected(ref, [{"role": "user", "content": p}], 8, temperature=0.0) for p in prompts[4:]})

    def one(i: int) -> str:
        c, p = tiny.client(), prompts[i]
        if i < 4 and i % 2:
            return "".join(ch.choices[0].text for ch in c.completions.create(
                model="tiny-llama", prompt=p, max_tokens=8, temperature=0, stream=True))
        if i < 4:
            return c.completions.create(model="tiny-llama", prompt=p, max_tokens=8, temperature=0).choices[0].text
        msgs = [{"role": "user", "content": p}]
        if i % 2:
            return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="tiny-llama", messages=msgs, max_tokens=8, temperature=0, stream=True))
        return c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8,
                                         temperature=0).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    assert got == [want[p] for p in prompts]


BAD = [  # (endpoint, raw body, status, error code, param)
    ("completions", "{not json", 400, "invalid_json", None),
    ("completions", "[1, 2]", 400, "invalid_body", None),
    ("completions", "", 400, None, None),
    ("completions", '{"prompt": 5}', 400, "invalid_value", "prompt"),
    ("completions", '{"prompt": "hi", "max_tokens": "10"}', 400, "invalid_value", "max_tokens"),
    ("completions", '{"prompt": "hi", "temperature": "hot"}', 400, "invalid_value", "temperature"),
    ("completions", '{"prompt": "hi", "stream": "yes"}', 400, "invalid_value", "stream"),
    ("completions", '{"prompt": ""}', 400, "empty_prompt", "prompt"),
    ("completions", '{"prompt": []}', 400, "invalid_value", "prompt"),
    ("completions", '{"prompt": [[]]}', 400, "invalid_value", "prompt"),
    ("completions", '{"prompt": ["a", ""]}', 400, "empty_prompt", "prompt"),
    ("completions", '{"prompt": [1, -1]}', 400, "invalid_token_id", "prompt"),
    ("completions", '{"prompt": [[1, 2], [260]]}', 400, "invalid_token_id", "prompt"),
    ("completions", '{"prompt": [1, "a"]}', 400, "invalid_value", "prompt"),
    ("completions", '{"prompt": [true]}', 400, "invalid_value", "prompt"),
    ("completions", '{"prompt": "  \\n "}', 400, "empty_prompt", "prompt"),
    ("completions", '{"prompt": "hi", "model": "gpt-4o"}', 404, "model_not_found", "model"),
    ("completions", '{"prompt": "hi", "max_tokens": 65}', 400, "max_tokens_too_large", "max_tokens"),
    ("completions", '{"prompt": "hi", "max_tokens": 0}', 400, "invalid_value", "max_tokens"),
    ("completions", '{"prompt": "%s"}' % ("x" * 600), 400, "context_length_exceeded", "prompt"),
    ("completions", '{"prompt": "%s"}' % ("z" * 40000), 400, "context_length_exceeded", "prompt"),
    ("completions", '{"prompt": "hi", "temperature": -1}', 400, "invalid_value", "temperature"),
    ("completions", '{"prompt": "hi", "temperature": NaN}', 400, "invalid_value", "temperature"),
    ("completions", '{"prompt": "hi", "top_p": 0}', 400, "invalid_value", "top_p"),
    ("completions", '{"prompt": "hi", "top_p": 1.5}', 400, "invalid_value", "top_p"),
    ("completions", '{"prompt": "hi", "min_p": -0.5}', 400, "invalid_value", "min_p"),
    ("completions", '{"prompt": "hi", "min_p": 2}', 400, "invalid_value", "min_p"),
    ("completions", '{"prompt": "hi", "sampling_rule": "metropolis"}', 400, "invalid_value", "sampling_rule"),
    ("completions", '{"prompt": "hi", "seed": 1e400}', 400, "invalid_value", "seed"),
    ("completions", '{"prompt": "hi", "seed": 99999999999999999999999}', 400, "invalid_value", "seed"),
    ("completions", '{"prompt": "hi", "stop": ""}', 400, "invalid_value", "stop"),
    ("completions", '{"prompt": "hi", "stop": ["a","b","c","d","e"]}', 400, "invalid_value", "stop"),
    ("completions", '{"prompt": "hi", "n": 2}', 400, "unsupported_parameter", "n"),
    ("completions", '{"prompt": "hi", "logprobs": 21}', 400, None, "logprobs"),
    ("completions", '{"prompt": "hi", "best_of": 3}', 400, "unsupported_parameter", "best_of"),
    ("completions", '{"prompt": "hi", "echo": true}', 400, "unsupported_parameter", "echo"),
    ("completions", '{"prompt": "hi", "presence_penalty": 0.5}', 400, "unsupported_parameter", "presence_penalty"),
    ("chat/completions", '{"messages": []}', 400, "empty_messages", "messages"),
    ("chat/completions", '{"messages": "hi"}', 400, "invalid_value", "messages"),
    ("chat/completions", '{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "invalid_value",
     "messages.0.role"),
    ("chat/completions", '{"messages": [{"role": "user"}]}', 400, "empty_content", "messages.0.content"),
    ("chat/completions", '{"messages": [{"role": "user", "content": " "}]}', 400, "empty_content",
     "messages.0.content"),
    ("chat/completions", '{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400,
     "unsupported_content", None),
    ("chat/completions", '{"messages": [{"role": "user", "content": "%s"}]}' % ("y" * 600), 400,
     "context_length_exceeded", "messages"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "model": "nope"}', 404,
     "model_not_found", "model"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', 400,
     "unsupported_parameter", "top_logprobs"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "n": 3, "stream": true}', 400,
     "unsupported_parameter", "n"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}',
     400, "unsupported_parameter", "tools"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000}',
     400, "max_tokens_too_large", "max_tokens"),
    ("chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "response_format": '
     '{"type": "json_object"}}', 400, "unsupported_parameter", "response_format"),
]


@pytest.mark.parametrize("endpoint,body,status,code,param", BAD, ids=[f"{i}-{b[:30]}" for i, (_, b, *_r) in
                                                                      enumerate(BAD)])
def test_bad_input_gives_openai_4xx(tiny, endpoint, body, status, code, param):
    r = httpx.post(f"{tiny.url}/v1/{endpoint}", content=body, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert_error(r, status, code, param if param is not None or code in (None, "invalid_json", "invalid_body")
                 else "any")
    if '"stream": true' in body:
        assert "text/event-stream" not in r.headers.get("content-type", "")


def test_engine_not_stuck_after_bad_inputs_and_unknown_fields(tiny, ref):
    r = httpx.post(f"{tiny.url}/v1/completions", timeout=60, json={
        "prompt": "After errors", "max_tokens": 6, "temperature": 0, "some_future_field": {"x": 1}, "user": "u"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(ref, "After errors", 6,
                                                                                temperature=0.0, chat=False)
    assert_error(httpx.get(f"{tiny.url}/v1/nothing-here"), 404)
    assert_error(httpx.get(f"{tiny.url}/v1/completions"), 405)
    m = httpx.get(f"{tiny.url}/metrics").json()
    assert not [s for s in m["requests"]["by_status"] if s.startswith("5")], m
    assert m["tokens"]["completion"] > 0 and m["generation"]["tokens_per_s"] > 0
    assert m["generation"]["mean_accepted_length"] >= 1 and m["queue"]["waiting"] == 0
    prom = httpx.get(f"{tiny.url}/metrics?format=prometheus")
    assert prom.headers["content-type"].startswith("text/plain") and "casspec_completion_tokens_total" in prom.text


def test_disconnect_cancels_real_engine():
    """A client that goes away mid-stream stops its generation; the next request is served at once."""
    from casspec.testing import tiny_engine

    app = create_app(tiny_engine(), max_tokens_limit=512, request_timeout=60, step_delay=0.1)
    with ThreadServer(app) as srv:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": "A long story", "max_tokens": 400, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # got the first text; hang up
        t0 = time.monotonic()
        r2 = httpx.post(srv.url + "/v1/completions", timeout=60,
                        json={"prompt": "Next", "max_tokens": 2, "temperature": 0})
        assert r2.status_code == 200
        assert time.monotonic() - t0 < 8.0  # the abandoned one needed >= 20 s (400 tokens, 0.1 s/step)
        wait_until(lambda: app.state.metrics.cancelled == 1, 5, "cancel count")


# -- fake engine: queueing, timeouts, disconnects, auth ----------------------------------------------------------
def test_queue_full_gives_429_and_fifo():
    eng = FakeEngine(delay=0.02)
    app = create_app(eng, method="casspec", max_queue=1, request_timeout=60)
    with ThreadServer(app) as srv:
        sched = app.state.scheduler
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": "A", "max_tokens": 2000, "stream": True}) as a:
            lines = a.iter_lines()  # keep the iterator: dropping it would close the connection
            next(lines)  # A is running
            done = {}
            t = threading.Thread(target=lambda: done.setdefault("b", httpx.post(
                srv.url + "/v1/completions", json={"prompt": "B", "max_tokens": 3}, timeout=60)))
            t.start()
            wait_until(lambda: sched.waiting == 1, what="B queued")
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "C", "max_tokens": 3})
            assert_error(r, 429, "queue_full")
            assert r.headers["retry-after"] == "1"
            with pytest.raises(openai.RateLimitError):
                srv.client().chat.completions.create(model="fake", messages=[{"role": "user", "content": "D"}])
        t.join(10)  # A hung up -> B runs
        assert done["b"].status_code == 200 and done["b"].json()["choices"][0]["text"] == eng.reply("B", 3)
        assert eng.overlaps == 0 and eng.started == ["A", "B"] and eng.ended == ["closed", "done"]

    # FIFO: requests are served in arrival order
    eng = FakeEngine(delay=0.01)
    app = create_app(eng, max_queue=8)
    with ThreadServer(app) as srv:
        results, threads = {}, []
        for i in range(6):
            p = f"p{i}"
            threads.append(threading.Thread(target=lambda p=p: results.setdefault(p, httpx.post(
                srv.url + "/v1/completions", json={"prompt": p, "max_tokens": 20 if p == "p0" else 3}, timeout=60))))
            threads[-1].start()
            wait_until(lambda i=i: len(eng.started) + app.state.scheduler.waiting == i + 1, what=f"p{i} admitted")
        for t in threads:
            t.join(20)
        assert eng.started == [f"p{i}" for i in range(6)] and eng.overlaps == 0
        assert all(r.status_code == 200 for r in results.values())


def test_timeout_cancels_and_reports():
    eng = FakeEngine(delay=0.05)
    app = create_app(eng, request_timeout=1.0)
    with ThreadServer(app) as srv:
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "slow", "max_tokens": 1000}, timeout=30)
        assert_error(r, 504, "timeout")
        assert r.json()["error"]["type"] == "timeout_error" and time.monotonic() - t0 < 5
        with pytest.raises(openai.APIError, match="timed out"):
            for _ in srv.client().completions.create(model="fake", prompt="slow2", max_tokens=1000, stream=True):
                pass
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "quick", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == eng.reply("quick", 3)
        assert eng.overlaps == 0 and eng.ended == ["closed", "closed", "done"]
        assert app.state.metrics.timeouts == 2


def test_nonstream_disconnect_cancels():
    eng = FakeEngine(delay=0.02)
    app = create_app(eng, request_timeout=60)
    with ThreadServer(app) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/chat/completions", timeout=0.5,
                       json={"messages": [{"role": "user", "content": "long"}], "max_tokens": 2000})
        wait_until(lambda: eng.ended == ["closed"], 5, "generation cancelled")
        assert len(eng.started) == 1 and app.state.metrics.cancelled == 1


def test_api_key_and_no_chat_template():
    eng = FakeEngine(has_chat_template=False)
    app = create_app(eng, api_key="sk-test")
    with ThreadServer(app) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200  # health stays open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
            assert_error(r, 401, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/metrics").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").models.list()
        c = srv.client(api_key="sk-test")
        assert c.completions.create(model="fake", prompt="hi", max_tokens=4).choices[0].text == eng.reply("hi", 4)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])


def test_create_app_rejects_bad_config():
    with pytest.raises(ValueError, match="unknown method"):
        create_app(FakeEngine(), method="nope")
    with pytest.raises(ValueError):
        create_app(FakeEngine(), max_queue=-1)


def test_cli_subprocess_server_with_api_key():
    """`python -m casspec.server` (what `casspec serve` runs) serving the tiny model, loopback, with a key."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "casspec.server", "--tiny-engine", "llama", "--port", str(port),
                             "--api-key", "sk-cli", "--max-tokens-limit", "16", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() - t0 < 90, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert_error(httpx.get(url + "/v1/models"), 401, "invalid_api_key")
        c = openai.OpenAI(base_url=url + "/v1", api_key="sk-cli", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                      temperature=0)
        assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            c.completions.create(model="tiny-llama", prompt="hi", max_tokens=17)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- logprobs through the server ---------------------------------------------------------------------------------
LP_CASES = [("The quick brown fox", False), ([{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hello there"}], True)]


def hf_logprobs(engine, prompt, chat: bool, new_ids: list[int]) -> torch.Tensor:
    """log_softmax of the HF model's own logits at each new token's position: [len(new_ids), V]."""
    ids = engine.encode_prompt(prompt, chat)
    with torch.no_grad():
        logits = engine.hf_model(torch.tensor([ids + new_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(ids) - 1:len(ids) - 1 + len(new_ids)]


def lp_request(prompt, chat: bool, stream: bool, n: int = 12) -> tuple[str, dict]:
    if chat:
        return "chat/completions", {"messages": prompt, "max_tokens": n, "temperature": 0, "logprobs": True,
                                    "top_logprobs": 2, "stream": stream}
    return "completions", {"prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 2, "stream": stream}


def streamed_logprobs(url: str, endpoint: str, body: dict) -> tuple[str, object]:
    """(text, logprobs) of a streamed answer: the chunks' logprobs concatenated in the non-streamed shape."""
    r = httpx.post(f"{url}/v1/{endpoint}", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = sse_events(r.text.splitlines())
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), r.text[:500]
    choices = [e["choices"][0] for e in events[:-1] if e["choices"]]
    if "messages" in body:
        text = "".join(c["delta"].get("content") or "" for c in choices)
        return text, [entry for c in choices if c["logprobs"] for entry in c["logprobs"]["content"]]
    text = "".join(c["text"] for c in choices)
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in choices:
        if c["logprobs"]:
            for k in out:
                out[k] += c["logprobs"][k]
    return text, out


def same_json(a, b, abs_tol: float = 1e-5) -> bool:
    """Equal structures, floats within abs_tol (tree shapes may differ between runs: tiny float noise)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= abs_tol
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_json(a[k], b[k], abs_tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_json(x, y, abs_tol) for x, y in zip(a, b))
    return a == b


def byte_exact(e: dict) -> bool:
    """A token's `bytes` are its own: its text's UTF-8, or for a byte of a multi-byte character (whose text
    alone reads U+FFFD) that one byte."""
    if e["token"] == "\ufffd":
        return len(e["bytes"]) == 1 and e["bytes"][0] >= 0x80
    return e["bytes"] == list(e["token"].encode("utf-8"))


@pytest.mark.parametrize("prompt,chat", LP_CASES, ids=["completions", "chat"])
def test_logprobs_match_hf_model_and_openai_shape(tiny, ref, prompt, chat):
    endpoint, body = lp_request(prompt, chat, stream=False)
    r = httpx.post(f"{tiny.url}/v1/{endpoint}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    want = ref.generate(prompt, "casspec", max_new_tokens=12, temperature=0.0, chat=chat)
    text = choice["message"]["content"] if chat else choice["text"]
    assert text == want.text
    ids = want.token_ids
    assert r.json()["usage"]["completion_tokens"] == len(ids)
    lp = hf_logprobs(ref, prompt, chat, ids)  # the target model's own distribution, outside casspec
    top = torch.topk(lp, 2, dim=-1)
    tok = ref.tokenizer
    token_texts = [tok.decode([i]) for i in ids]
    if chat:
        lps = choice["logprobs"]
        assert set(lps) == {"content", "refusal"} and lps["refusal"] is None
        content = lps["content"]
        assert len(content) == len([i for i in ids if i not in ref.eos_ids])  # no EOS entry: the text has none
        assert bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace") == text
        for j, (e, i) in enumerate(zip(content, ids)):
            assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
            assert e["token"] == token_texts[j] and byte_exact(e)
            assert e["logprob"] == pytest.approx(lp[j, i].item(), abs=1e-4)
            assert len(e["top_logprobs"]) == 2
            for alt, a_id, a_lp in zip(e["top_logprobs"], top.indices[j].tolist(), top.values[j].tolist()):
                assert set(alt) == {"token", "logprob", "bytes"}
                assert alt["token"] == tok.decode([a_id]) and byte_exact(alt)
                assert alt["logprob"] == pytest.approx(a_lp, abs=1e-4)
            assert e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"], abs=1e-6)  # greedy: the argmax
        tokens = [e["token"] for e in content]
    else:
        lps = choice["logprobs"]
        assert set(lps) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert all(len(lps[k]) == len(ids) for k in lps)
        assert lps["tokens"] == token_texts
        assert lps["token_logprobs"] == pytest.approx([lp[j, i].item() for j, i in enumerate(ids)], abs=1e-4)
        for j, alts in enumerate(lps["top_logprobs"]):
            expect: dict = {}
            for a_id, a_lp in zip(top.indices[j].tolist(), top.values[j].tolist()):
                expect.setdefault(tok.decode([a_id]), a_lp)  # same text twice (byte tokens): the likelier one
            assert alts == pytest.approx(expect, abs=1e-4) and 1 <= len(alts) <= 2
            assert alts[lps["tokens"][j]] == pytest.approx(lps["token_logprobs"][j], abs=1e-6)  # greedy: the argmax
        offsets = lps["text_offset"]
        assert offsets[0] == 0 and all(b > a for a, b in zip(offsets, offsets[1:]))
        assert offsets == [sum(len(t) for t in token_texts[:j]) for j in range(len(ids))]
        tokens = lps["tokens"]
    # the token texts make up the answer (byte tokens of one character each decode to U+FFFD alone)
    assert tok.decode(ids, skip_special_tokens=True) == text
    if "".join(token_texts) == tok.decode(ids):
        assert "".join(tokens) == text
    # streamed: the chunks' logprobs concatenate to the same list
    s_text, s_lps = streamed_logprobs(tiny.url, *lp_request(prompt, chat, stream=True))
    assert s_text == text
    assert same_json(s_lps, lps["content"] if chat else lps), (s_lps, lps)


def test_logprobs_off_and_zero_alternatives(tiny):
    body = {"prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0}
    assert httpx.post(f"{tiny.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"] is None
    c = httpx.post(f"{tiny.url}/v1/completions", json={**body, "logprobs": 0}, timeout=60).json()["choices"][0]
    assert len(c["logprobs"]["tokens"]) == 4 and c["logprobs"]["top_logprobs"] == [{}] * 4
    msgs = [{"role": "user", "content": "Hello there"}]
    r = httpx.post(f"{tiny.url}/v1/chat/completions", timeout=60,
                   json={"messages": msgs, "max_tokens": 4, "temperature": 0, "logprobs": True}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(e["top_logprobs"] == [] for e in content)
    r = httpx.post(f"{tiny.url}/v1/chat/completions", timeout=60,
                   json={"messages": msgs, "max_tokens": 4, "temperature": 0, "logprobs": False}).json()
    assert r["choices"][0]["logprobs"] is None


def test_logprobs_with_openai_client(tiny, ref):
    c = tiny.client()
    msgs = [{"role": "user", "content": "Hello there"}]
    r = c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                  top_logprobs=2)
    want = ref.generate(msgs, "casspec", max_new_tokens=8, temperature=0.0)
    content = r.choices[0].logprobs.content
    lp = hf_logprobs(ref, msgs, True, want.token_ids)
    assert r.choices[0].message.content == want.text and len(content) == len(want.token_ids)
    assert [e.logprob for e in content] == pytest.approx([lp[j, i].item() for j, i in enumerate(want.token_ids)],
                                                         abs=1e-4)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)
    assert all(byte_exact({"token": e.token, "bytes": e.bytes}) for e in content)
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == r.choices[0].message.content
    streamed = [e for ch in c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8, temperature=0,
                                                      logprobs=True, top_logprobs=2, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content or []]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    comp = c.completions.create(model="tiny-llama", prompt="The quick brown fox", max_tokens=6, temperature=0,
                                logprobs=2)
    assert len(comp.choices[0].logprobs.tokens) == comp.usage.completion_tokens == 6
    assert comp.choices[0].logprobs.text_offset[0] == 0


# -- the batched worker ------------------------------------------------------------------------------------------
def test_batch_worker_queue_full_outputs_and_metrics(ref):
    """max_batch=4, max_queue=1: of 8 simultaneous streams, 5 are served (exactly the engine's greedy output), 3 get 429."""
    from casspec.server.batch_worker import BatchWorker
    from casspec.testing import tiny_engine

    app = create_app(tiny_engine(), max_batch=4, max_queue=1, step_delay=0.05, max_tokens_limit=64,
                     request_timeout=60)
    sched = app.state.scheduler
    assert isinstance(sched, BatchWorker) and sched.max_batch == 4
    prompts = [f"Batch client {i} asks" for i in range(8)]
    want = {p: ref.generate(p, "casspec", max_new_tokens=24, temperature=0.0, chat=False).text for p in prompts}
    with ThreadServer(app) as srv:
        gate = threading.Barrier(8)

        def one(p: str):
            gate.wait()
            with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                              json={"prompt": p, "max_tokens": 24, "temperature": 0, "stream": True}) as r:
                if r.status_code != 200:
                    r.read()
                    return r.status_code, r
                events = sse_events(r.iter_lines())
            assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events
            return 200, "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])

        with ThreadPoolExecutor(8) as pool:
            got = dict(zip(prompts, pool.map(one, prompts)))
        served = {p: text for p, (status, text) in got.items() if status == 200}
        refused = [r for status, r in got.values() if status != 200]
        assert len(served) == 5 and len(refused) == 3, {p: s for p, (s, _) in got.items()}
        for r in refused:
            assert_error(r, 429, "queue_full")
        assert served == {p: want[p] for p in served}
        m = httpx.get(srv.url + "/metrics").json()
        assert m["queue"]["max_batch"] == 4 and m["queue"]["max_queue"] == 1
        assert m["requests"]["rejected_queue_full"] == 3 and m["generation"]["count"] == 5
        wait_until(lambda: sched.batch.kv.used == 0 and sched.waiting == 0 and not sched.busy, 5, "batch drained")


def test_batch_worker_disconnect_frees_slots_others_go_on(ref):
    """A client gone mid-stream leaves the batch (its KV region freed); the request beside it is unaffected."""
    from casspec.testing import tiny_engine

    app = create_app(tiny_engine(), max_batch=4, max_queue=1, step_delay=0.05, max_tokens_limit=512,
                     request_timeout=60)
    sched = app.state.scheduler
    want_b = ref.generate("Neighbour request", "casspec", max_new_tokens=30, temperature=0.0, chat=False).text
    want_c = ref.generate("After the hang-up", "casspec", max_new_tokens=8, temperature=0.0, chat=False).text
    with ThreadServer(app) as srv:
        done = {}
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": "A long story", "max_tokens": 400, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            b = threading.Thread(target=lambda: done.setdefault("b", httpx.post(
                srv.url + "/v1/completions", json={"prompt": "Neighbour request", "max_tokens": 30, "temperature": 0},
                timeout=60)))
            b.start()
            wait_until(lambda: sched.running == 2, 10, "both in the batch")
            assert sched.batch.kv.used > 0
            for line in lines:
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # got text while B runs beside it; hang up
        wait_until(lambda: app.state.metrics.cancelled == 1, 10, "cancel count")
        b.join(30)
        assert done["b"].status_code == 200 and done["b"].json()["choices"][0]["text"] == want_b
        wait_until(lambda: sched.batch.kv.used == 0 and not sched.busy and sched.waiting == 0, 10, "slots freed")
        assert not sched.batch.running and not sched.batch.waiting
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "After the hang-up", "max_tokens": 8,
                                                         "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want_c
        assert sched.batch.kv.used == 0 and sched._outstanding == 0


def _jobs(n: int, loop, **kw):
    from casspec.server.worker import GenRequest, Job

    return [Job(GenRequest(prompt=f"job {i}", max_new_tokens=kw.get("max_new_tokens", 4), temperature=0.0), loop, 60)
            for i in range(n)]


def test_batch_scheduler_admission_counts_running_plus_queue(ref, monkeypatch):
    """submit refuses exactly beyond max_batch running + max_queue waiting, however far the worker lags behind."""
    import asyncio

    from casspec.server.batch_worker import BatchWorker
    from casspec.server.worker import Metrics, QueueFullError

    sched = BatchWorker(ref, "casspec", max_queue=1, metrics=Metrics(), max_batch=4)
    monkeypatch.setattr(sched, "start", lambda: None)  # the worker has not picked anything up yet
    loop = asyncio.new_event_loop()
    try:
        jobs = _jobs(6, loop)
        for job in jobs[:5]:
            sched.submit(job)
        with pytest.raises(QueueFullError):
            sched.submit(jobs[5])
        assert sched.abandon(jobs[0]) and jobs[0].state == "dropped"
        sched.submit(jobs[5])  # a dropped request gives its place back
    finally:
        loop.close()


def test_batch_scheduler_abandon_while_starting_counts_once(ref, monkeypatch):
    """A request abandoned while the worker is submitting it to the batch is counted out exactly once."""
    import asyncio

    from casspec.server.batch_worker import BatchWorker
    from casspec.server.worker import Metrics

    sched = BatchWorker(ref, "casspec", max_queue=2, metrics=Metrics(), max_batch=2)
    submit = sched.batch.submit

    def racing_submit(*a, tag=None, **kw):
        sched.abandon(tag)  # the client goes away right now
        return submit(*a, tag=tag, **kw)

    monkeypatch.setattr(sched.batch, "submit", racing_submit)
    loop = asyncio.new_event_loop()
    try:
        job, = _jobs(1, loop)
        sched.submit(job)
        wait_until(lambda: job.state == "done" and not sched.batch.busy, 10, "job retired")
        assert sched._outstanding == 0 and sched.waiting == 0 and sched.batch.kv.used == 0
    finally:
        sched.stop()
        loop.close()


def test_serve_help_lists_max_batch_and_create_app_rejects_zero():
    exe = Path(sys.executable).with_name("casspec")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "casspec"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd + ["serve", "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "--max-batch" in out.stdout, out.stdout + out.stderr
    from casspec.testing import tiny_engine

    with pytest.raises(ValueError, match="max_batch"):
        create_app(tiny_engine(), max_batch=0)
    with pytest.raises(ValueError, match="max_batch"):
        create_app(FakeEngine(), max_batch=0)
    # max_batch=1, or an engine without a runner: the one-at-a-time worker
    from casspec.server.worker import FifoWorker

    assert isinstance(create_app(FakeEngine(), max_batch=4).state.scheduler, FifoWorker)


# -- property-based fuzzing against the published OpenAPI schema -------------------------------------------------
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_schema():
    from casspec.testing import tiny_engine

    app = create_app(tiny_engine(), max_queue=4, max_tokens_limit=2, request_timeout=30)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.phases.update(phases=["examples", "fuzzing"])
    return schema


FUZZ_OPS = [("/v1/completions", "POST", "positive"), ("/v1/completions", "POST", "negative"),
            ("/v1/chat/completions", "POST", "positive"), ("/v1/chat/completions", "POST", "negative"),
            ("/v1/models/{model_id}", "GET", "positive"), ("/metrics", "GET", "positive")]


@pytest.mark.parametrize("path,method,mode", FUZZ_OPS)
def test_fuzz_openapi_never_5xx(fuzz_schema, path, method, mode):
    """Schema-driven fuzzing (schemathesis strategies + hypothesis): valid and invalid requests never get a 5xx."""
    strategy = fuzz_schema[path][method].as_strategy(schemathesis.GenerationMode(mode))
    n = {"GET": 10, "positive": 20}.get(method, {"positive": 20}.get(mode, 30))

    @given(case=strategy)
    @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        response = case.call()
        assert response.status_code < 500, (case.path, case.body, response.status_code, response.text[:500])
        if response.status_code >= 400 and response.status_code != 405:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()


def test_fuzz_generation_params_reach_engine_without_5xx(fuzz_schema):
    """Hypothesis over *valid-shaped* generation requests (unicode prompts, stops, sampling, seeds, stream)."""
    from fastapi.testclient import TestClient
    from hypothesis import strategies as st

    client = TestClient(fuzz_schema.app)
    seen = set()

    @given(prompt=st.text(min_size=1, max_size=30), chat=st.booleans(), stream=st.booleans(),
           stop=st.none() | st.lists(st.text(min_size=1, max_size=3), max_size=2),
           temperature=st.sampled_from([0.0, 0.5, 2.0]), top_p=st.floats(0.01, 1.0), top_k=st.integers(-1, 400),
           seed=st.integers(-(2**63), 2**64 - 1), max_tokens=st.integers(1, 2))
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(prompt, chat, stream, stop, temperature, top_p, top_k, seed, max_tokens):
        body = dict(stop=stop, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens,
                    stream=stream)
        if chat:
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}], **body})
        else:
            r = client.post("/v1/completions", json={"prompt": prompt, **body})
        assert r.status_code in (200, 400), (body, prompt, r.status_code, r.text[:300])
        if r.status_code == 400:
            assert r.json()["error"]["code"] in ("empty_prompt", "empty_content", "context_length_exceeded"), r.text
        elif stream:
            events = sse_events(r.text.splitlines())
            assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), r.text[:300]
        seen.add(r.status_code)

    check()
    assert 200 in seen


def test_add_parser_registers_serve():
    import argparse

    from casspec.server import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["serve", "--port", "9001", "--max-queue", "0", "--api-key", "k"])
    assert (args.cmd, args.host, args.port, args.max_queue, args.api_key, args.method) == \
        ("serve", "127.0.0.1", 9001, 0, "k", "casspec")
    assert callable(args.func) and args.max_tokens_limit == 2048 and args.timeout == 300.0
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-queue", "-1"])


def test_loadtest_command_against_fake_server(capsys):
    from casspec.loadtest import main, percentile, run_load

    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([1.0], 95) == 1.0 and percentile([], 50) == 0.0
    eng = FakeEngine(delay=0.002)
    app = create_app(eng, max_queue=8)
    with ThreadServer(app) as srv:
        rep = run_load(srv.url, clients=3, duration=1.0, max_tokens=5, stream=True, request_timeout=10)
        assert rep.ok > 3 and rep.errors == 0 and rep.completion_tokens == 5 * rep.ok
        assert rep.latency_s["p95"] >= rep.latency_s["p50"] > 0 and rep.ttft_s
        assert rep.server["generations"] == rep.ok and rep.server["mean_accepted_length"] == 1.0
        assert main(["--url", srv.url, "--clients", "2", "--duration", "0.5", "--max-tokens", "3",
                     "--endpoint", "completions"]) == 0
        assert "latency: p50" in capsys.readouterr().out
        assert eng.overlaps == 0
    assert main(["--url", "http://127.0.0.1:9", "--clients", "1", "--duration", "0.3", "--warmup", "0",
                 "--request-timeout", "1"]) == 1  # nothing listening: errors, and it still stops
