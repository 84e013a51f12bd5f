"""Test-only schedulers (drafters that are always right, always wrong, or shape random trees) and the serving
tests' helpers: a uvicorn server in a thread, a controllable fake engine, SSE parsing, OpenAI error checks."""
from __future__ import annotations

import json
import random
import socket
import threading
import time

import httpx
import openai
import torch
import uvicorn

from casspec.drafters.self_draft import SelfDrafter
from casspec.errors import ContextOverflowError, InvalidRequestError
from casspec.metrics import DrafterStats, GenerationResult, GenerationStats, StreamChunk
from casspec.runtime.plans import FULL
from casspec.state import DecodeState
from casspec.tree import DraftTree


class _Base:
    name = "test"

    def observe(self, tree, result, state, times) -> None:
        pass


class AlwaysRight(_Base):
    """Drafts with the full model itself: every greedy draft token is accepted."""

    name = "always-right"

    def __init__(self, engine, k: int = 4) -> None:
        self.drafter, self.k = SelfDrafter(engine.runner, FULL, name="full"), k

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        self.drafter.propose(tree, state, [0], self.k)


class AlwaysWrong(_Base):
    """Proposes the target's runner-up token at every position: every draft is rejected."""

    name = "always-wrong"

    def __init__(self, engine, k: int = 3) -> None:
        self.drafter, self.k = SelfDrafter(engine.runner, FULL, name="full"), k

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        node = 0
        for _ in range(min(self.k, state.max_depth())):
            logits = self.drafter._forward(tree, state, [node])[0]  # [V]
            second = int(torch.topk(logits, 2).indices[1])
            node = tree.add(node, second, "wrong", 0.0, 0.0)


class RandomTree(_Base):
    """Random tree shapes mixing correct (full-model) branches and random tokens, non-contiguous paths included."""

    name = "random-tree"

    def __init__(self, engine, seed: int = 0, nodes: int = 12) -> None:
        self.drafter = SelfDrafter(engine.runner, FULL, name="full")
        self.rng, self.nodes, self.vocab = random.Random(seed), nodes, engine.runner.vocab_size

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        for _ in range(self.nodes):
            leaf = self.rng.randrange(len(tree))
            if tree.depth[leaf] >= state.max_depth():
                continue
            if self.rng.random() < 0.5:
                self.drafter.propose(tree, state, [leaf], self.rng.randint(1, 3))
            else:
                tree.add(leaf, self.rng.randrange(self.vocab), "random", 0.0, 0.0)


# -- serving tests -----------------------------------------------------------------------------------------
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


_expected: dict = {}


def expected(ref, prompt, n, **kw) -> str:
    key = (json.dumps(prompt), n, json.dumps(kw, sort_keys=True))
    if key not in _expected:
        _expected[key] = ref.generate(prompt, "casspec", max_new_tokens=n, **kw).text
    return _expected[key]
