"""The real default model (SmolLM2-135M-Instruct): every method reproduces plain greedy decoding."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration

PROMPTS = [
    [{"role": "user", "content": "Summarize: The quick brown fox jumps over the lazy dog. The dog was asleep "
                                 "in the sun, and the fox was hungry, so it ran into the forest to find food."}],
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "Write a Python function that returns the sum of a list of numbers."}],
]


@pytest.fixture(scope="module")
def smollm2():
    import casspec

    torch.set_num_threads(2)
    yield casspec.load()
    torch.set_num_threads(1)


def test_real_model_greedy_is_lossless_for_every_main_method(smollm2):
    for prompt in PROMPTS:
        ref = smollm2.generate(prompt, "ar", max_new_tokens=48)
        assert len(ref.token_ids) > 5
        for method in ("pld", "self", "vc", "casspec"):
            out = smollm2.generate(prompt, method, max_new_tokens=48)
            assert out.token_ids == ref.token_ids, (method, prompt[0]["content"][:30])


def test_real_model_seeded_sampling_equals_ar_for_every_method(smollm2):
    """Coupled sampling (default rule): for a seed, every method commits exactly `ar`'s sampled tokens."""
    from casspec.methods import METHODS

    kw = dict(max_new_tokens=40, temperature=0.7, top_p=0.95)
    for prompt, seed in zip(PROMPTS, (1, 2, 3)):
        ref = smollm2.generate(prompt, "ar", seed=seed, **kw)
        assert len(ref.token_ids) > 5
        for method in METHODS:
            out = smollm2.generate(prompt, method, seed=seed, **kw)
            assert out.token_ids == ref.token_ids, (method, seed)
    batch = smollm2.generate_batch(PROMPTS, "casspec", seed=2, **kw)  # one batch, one seed per request
    assert [b.token_ids for b in batch] == [smollm2.generate(p, "ar", seed=2, **kw).token_ids for p in PROMPTS]


def test_real_model_chat_answer_is_sensible(smollm2):
    out = smollm2.generate(PROMPTS[1], "casspec", max_new_tokens=32)
    assert "Paris" in out.text
    assert out.stats.finish_reason in {"stop", "length"}
