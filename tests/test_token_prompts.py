"""Token-id prompts: the API and /v1/completions take token ids (OpenAI semantics) and answer as for the text."""
from __future__ import annotations

import json

import httpx
import pytest

from casspec.errors import InvalidRequestError
from casspec.server import create_app
from helpers import ThreadServer, assert_error, sse_events

TEXT = "Token ids and text give one answer"


def test_generate_stream_and_batch_take_token_ids(llama_engine):
    e = llama_engine
    ids = e.encode_prompt(TEXT)
    for method in ("ar", "casspec"):
        want = e.generate(TEXT, method, max_new_tokens=10)
        got = e.generate(ids, method, max_new_tokens=10)
        assert got.token_ids == want.token_ids and got.stats.prompt_tokens == len(ids)
        assert "".join(e.stream(ids, method, max_new_tokens=10)) == want.text
    texts = [TEXT, "Another prompt"]
    batch = e.generate_batch([e.encode_prompt(t) for t in texts], "casspec", max_new_tokens=8)
    assert [r.token_ids for r in batch] == [r.token_ids for r in e.generate_batch(texts, "casspec", max_new_tokens=8)]


@pytest.mark.parametrize("bad", [[1, 260], [-1], [1, True], [3, 2.0], [5, "a"]])
def test_invalid_token_ids_raise_value_error(llama_engine, bad):
    with pytest.raises(InvalidRequestError) as err:
        llama_engine.generate(bad, "ar", max_new_tokens=2)
    assert isinstance(err.value, ValueError) and "token" in str(err.value)


def test_token_ids_with_a_chat_template_are_refused(llama_engine):
    with pytest.raises(ValueError):
        llama_engine.generate([1, 2, 3], "ar", max_new_tokens=2, chat=True)


@pytest.fixture(scope="module")
def server():
    from casspec.testing import tiny_engine

    engine = tiny_engine()
    app = create_app(engine, method="casspec", max_queue=16, max_tokens_limit=32, request_timeout=60)
    with ThreadServer(app) as srv:
        srv.engine = engine
        yield srv


def _post(srv, body: dict) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/completions", json={"max_tokens": 8, "temperature": 0, **body}, timeout=60)


def test_completions_token_ids_equal_text(server):
    ids = server.engine.encode_prompt(TEXT)
    text = _post(server, {"prompt": TEXT}).json()
    tok = _post(server, {"prompt": ids}).json()
    assert tok["choices"][0]["text"] == text["choices"][0]["text"]
    assert tok["usage"]["prompt_tokens"] == len(ids)
    assert "cached_tokens" in tok["usage"]["prompt_tokens_details"]


def test_several_prompts_give_one_choice_each_in_order(server):
    prompts = [TEXT, "Second prompt", "A third one"]
    single = [_post(server, {"prompt": p}).json()["choices"][0]["text"] for p in prompts]
    ids = [server.engine.encode_prompt(p) for p in prompts]
    for body in ({"prompt": prompts}, {"prompt": ids}):
        r = _post(server, body).json()
        assert [c["index"] for c in r["choices"]] == [0, 1, 2]
        assert [c["text"] for c in r["choices"]] == single
        assert r["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
            "prompt": ids, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    texts = ["", "", ""]
    for ev in events[:-1]:
        for c in ev["choices"]:
            texts[c["index"]] += c["text"]
    assert texts == single
    assert events[-2]["usage"]["prompt_tokens"] == sum(len(i) for i in ids)


@pytest.mark.parametrize("prompt,code", [([1, 260], "invalid_token_id"), ([[1], [-3]], "invalid_token_id"),
                                         ([], "invalid_value"), ([[1], []], "invalid_value")])
def test_invalid_token_ids_are_400(server, prompt, code):
    assert_error(_post(server, {"prompt": prompt}), 400, code, "prompt")


def test_repeated_prompt_reports_cached_tokens(server):
    ids = server.engine.encode_prompt("A long shared prefix that the second request finds in the cache. " * 2)
    _post(server, {"prompt": ids})
    before = httpx.get(f"{server.url}/metrics", timeout=10).json()
    r = _post(server, {"prompt": ids + [65, 66]}).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(ids) - 1
    after = httpx.get(f"{server.url}/metrics", timeout=10).json()
    assert after["tokens"]["prompt_cached"] - before["tokens"]["prompt_cached"] >= len(ids) - 1
    assert after["prefix_cache"]["hits"] > before["prefix_cache"]["hits"]
    prom = httpx.get(f"{server.url}/metrics?format=prometheus", timeout=10).text
    assert "casspec_prompt_tokens_cached_total" in prom
    json.dumps(after)
