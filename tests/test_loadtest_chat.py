"""``casspec loadtest --turns`` and ``--system-tokens``: what the clients send, what the report says; and,
against a real tiny server, that a conversation's later turns come back with cached prompt tokens."""
from __future__ import annotations

import json
import random

import pytest

from casspec.loadtest import format_report, main, run_load
from casspec.loadtest.chat import CHARS_PER_TOKEN, filler
from casspec.server import create_app
from helpers import ThreadServer
from test_loadtest import FakeOpenAI


class RecordingOpenAI(FakeOpenAI):
    """FakeOpenAI that keeps every request body and reports some cached prompt tokens."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.bodies: list[dict] = []
        handler = self.server.RequestHandlerClass
        fake = self

        class Recording(handler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}"
                with fake.lock:
                    fake.bodies.append(json.loads(raw))
                    fake.received += 1
                fake.stream(self) if fake.bodies[-1].get("stream") else fake.plain(self)

        self.server.RequestHandlerClass = Recording


def test_filler_is_seeded_and_about_the_asked_length():
    a = filler(random.Random(1), 400)
    assert a == filler(random.Random(1), 400) != filler(random.Random(2), 400)
    assert 400 * CHARS_PER_TOKEN <= len(a) < 400 * CHARS_PER_TOKEN + 200


def test_multi_turn_clients_continue_their_own_conversations():
    with RecordingOpenAI(first_delay=0.005, chunks=2) as srv:
        rep = run_load(srv.url, clients=2, duration=0.8, max_tokens=4, stream=True, turns=3, turn_tokens=50,
                       request_timeout=5)
        bodies = list(srv.bodies)
    assert rep.mode == "conversations" and rep.errors == 0 and rep.ok >= 6
    assert set(rep.ttft_by_turn_s) == {"1", "2", "3"} and all(d["n"] >= 1 for d in rep.ttft_by_turn_s.values())
    timed = bodies[1:]  # the warmup is a plain one-message request
    for b in timed:
        roles = [m["role"] for m in b["messages"]]
        turn = (len(roles) + 1) // 2
        assert roles == ["user", "assistant"] * (turn - 1) + ["user"] and 1 <= turn <= 3
        if turn > 1:  # the earlier turns are sent again, answers included
            assert b["messages"][-2]["content"] == "tok tok "
            assert 50 * CHARS_PER_TOKEN <= len(b["messages"][-1]["content"]) < 50 * CHARS_PER_TOKEN + 200
    text = format_report(rep)
    assert "turn 3 time to first token" in text and "turn 3 / turn 1" in text


def test_shared_system_prompt_is_the_same_for_every_timed_request():
    with RecordingOpenAI(first_delay=0.005) as srv:
        rep = run_load(srv.url, clients=3, duration=0.5, max_tokens=4, stream=True, system_tokens=100,
                       request_timeout=5)
        bodies = list(srv.bodies)
    assert rep.errors == 0 and rep.ok >= 3
    assert bodies[0]["messages"][0]["role"] == "user"  # the warmup does not warm the system prompt
    systems = {b["messages"][0]["content"] for b in bodies[1:]}
    assert len(systems) == 1 and len(systems.pop()) >= 100 * CHARS_PER_TOKEN
    assert rep.ttft_first_s is not None and rep.ttft_rest_s["p50"] > 0
    assert "shared system prompt of ~100 tokens" in format_report(rep)


@pytest.mark.parametrize("argv", [["--turns", "3", "--rate", "2"], ["--turns", "2", "--endpoint", "completions"],
                                  ["--system-tokens", "-1"], ["--turns", "0"]])
def test_bad_mode_arguments_exit_2(argv, capsys):
    assert main(["--url", "http://127.0.0.1:9", "--duration", "1", *argv]) == 2
    assert "error:" in capsys.readouterr().err


def test_real_server_reports_cached_prompt_tokens_on_later_turns():
    from casspec.testing import tiny_engine

    app = create_app(tiny_engine(), method="casspec", max_queue=8, max_tokens_limit=8, request_timeout=60)
    with ThreadServer(app) as srv:
        rep = run_load(srv.url, clients=2, duration=1.5, max_tokens=4, stream=True, turns=3, turn_tokens=20,
                       request_timeout=60, max_requests=6)
    assert rep.errors == 0 and rep.ok == 6
    assert rep.cached_prompt_tokens > 0
