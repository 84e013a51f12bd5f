"""Request validation (schemas.py, requests.py, errors.py): every bad request gets an OpenAI-shaped 4xx with
the right code and param, and the engine serves normally afterwards (the `tiny` server, tests/conftest.py)."""
from __future__ import annotations

import httpx
import pytest

from helpers import assert_error, expected

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
