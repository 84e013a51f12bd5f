"""Greedy speculative output must equal plain greedy decoding token for token."""
from __future__ import annotations

import pytest

from helpers import AlwaysRight, AlwaysWrong, RandomTree

PROMPTS = ["hello world, hello world, the cat sat on", "abcabcabcabc", "Q: 2+2? A:"]


METHODS = ["pld", "self", "pld+self", "vc", "hc", "vchc", "tree", "casspec", "casspec-nolat", "casspec-noema",
           "casspec-chain", "casspec-nopld", "casspec-noself"]


def test_registry_is_covered(llama_engine):
    assert set(llama_engine.methods) == set(METHODS) | {"ar"}


@pytest.mark.parametrize("method", METHODS)
def test_greedy_matches_autoregressive_for_every_method(engine, method):
    for prompt in PROMPTS:
        ref = engine.generate(prompt, "ar", max_new_tokens=40)
        out = engine.generate(prompt, method, max_new_tokens=40)
        assert out.token_ids == ref.token_ids, (method, prompt)
        assert out.text == ref.text


def test_always_right_drafter_is_fully_accepted_and_exact(engine):
    ref = engine.generate(PROMPTS[0], "ar", max_new_tokens=30)
    out = engine.generate(PROMPTS[0], AlwaysRight(engine, k=4), max_new_tokens=30)
    assert out.token_ids == ref.token_ids
    # a) every draft accepted, b) 4 drafts + bonus per step, c) several target forwards
    s = out.stats.drafters["full"]
    assert s.accepted == s.proposed > 0
    assert out.stats.accept_lengths[:-1] == [5] * (len(out.stats.accept_lengths) - 1)
    assert out.stats.target_forwards == -(-30 // 5)


def test_always_wrong_drafter_is_fully_rejected_and_exact(engine):
    ref = engine.generate(PROMPTS[1], "ar", max_new_tokens=20)
    out = engine.generate(PROMPTS[1], AlwaysWrong(engine), max_new_tokens=20)
    assert out.token_ids == ref.token_ids
    assert out.stats.drafters["wrong"].accepted == 0
    assert out.stats.drafters["wrong"].proposed > 0
    assert out.stats.target_forwards == 20


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_tree_shapes_are_exact(engine, seed):
    ref = engine.generate(PROMPTS[2], "ar", max_new_tokens=40)
    out = engine.generate(PROMPTS[2], RandomTree(engine, seed=seed), max_new_tokens=40)
    assert out.token_ids == ref.token_ids
    assert out.stats.target_forwards < 40  # some full-model branches were accepted


def test_chat_messages_match_across_methods(llama_engine):
    msgs = [{"role": "user", "content": "say something"}]
    ref = llama_engine.generate(msgs, "ar", max_new_tokens=24)
    assert llama_engine.generate(msgs, "casspec", max_new_tokens=24).token_ids == ref.token_ids
