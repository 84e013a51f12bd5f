"""Completions and chat completions through a real server on the tiny model (app.py, http.py, service.py):
the official openai client, streamed and non-streamed answers equal to the engine's own, sampling, stops,
concurrent clients. The server is uvicorn in a thread of this process (the `tiny` fixture, tests/conftest.py).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from helpers import expected


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
