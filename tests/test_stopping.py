"""EOS and stop strings end generation at the same token as plain decoding."""
from __future__ import annotations

import pytest

from helpers import AlwaysRight

PROMPT = "hello world, hello world, the cat sat on"


def _eos_engine(engine, token):
    engine.eos_ids = frozenset({token})
    return engine


@pytest.mark.parametrize("method", ["pld", "self", "casspec", "always-right"])
def test_eos_ends_at_the_same_token(llama_engine, method):
    ref_free = llama_engine.generate(PROMPT, "ar", max_new_tokens=30).token_ids
    saved = llama_engine.eos_ids
    try:
        _eos_engine(llama_engine, ref_free[12])  # pretend the 13th generated token is EOS
        ref = llama_engine.generate(PROMPT, "ar", max_new_tokens=30)
        m = AlwaysRight(llama_engine) if method == "always-right" else method
        out = llama_engine.generate(PROMPT, m, max_new_tokens=30)
    finally:
        llama_engine.eos_ids = saved
    assert ref.token_ids == ref_free[:ref_free.index(ref_free[12]) + 1]
    assert out.token_ids == ref.token_ids
    assert out.stats.finish_reason == ref.stats.finish_reason == "stop"


@pytest.mark.parametrize("method", ["ar", "pld", "casspec", "always-right"])
def test_stop_string_cuts_text_and_tokens_like_plain_decoding(llama_engine, method):
    full = llama_engine.generate(PROMPT, "ar", max_new_tokens=30)
    stop = full.text[10:13]
    ref = llama_engine.generate(PROMPT, "ar", max_new_tokens=30, stop=stop)
    m = AlwaysRight(llama_engine) if method == "always-right" else method
    out = llama_engine.generate(PROMPT, m, max_new_tokens=30, stop=[stop, "\u2603never"])
    assert stop not in out.text and out.text == ref.text == full.text[:full.text.find(stop)]
    assert out.token_ids == ref.token_ids
    assert out.stats.finish_reason == "stop"


def test_streamed_text_equals_generated_text(llama_engine):
    ref = llama_engine.generate(PROMPT, "casspec", max_new_tokens=30)
    assert "".join(llama_engine.stream(PROMPT, "casspec", max_new_tokens=30)) == ref.text
    assert "".join(llama_engine.stream(PROMPT, "casspec", max_new_tokens=30, stop="zz")) == \
        llama_engine.generate(PROMPT, "casspec", max_new_tokens=30, stop="zz").text


def test_cancel_stops_generation(llama_engine):
    import threading

    cancel = threading.Event()
    chunks = []
    for chunk in llama_engine.iter_generate(PROMPT, "ar", max_new_tokens=50, cancel=cancel):
        chunks.append(chunk)
        cancel.set()
    assert chunks[-1].result.stats.finish_reason == "cancelled"
    assert chunks[-1].result.stats.new_tokens < 50
