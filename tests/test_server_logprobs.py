"""Logprobs through the server (service.py, tokens.py): equal to the HF model's own log-softmax, in the
OpenAI shapes of both endpoints, byte-exact token bytes, streamed chunks concatenating to the same list."""
from __future__ import annotations

import httpx
import pytest
import torch

from helpers import sse_events

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
