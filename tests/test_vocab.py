"""Vocabulary sparsity: a pruned draft head drafts only its tokens, learns the context's, stays lossless."""
from __future__ import annotations

import pytest
import torch

from casspec.api import Engine
from casspec.runtime.plans import Int8, PrunedVocab
from casspec.runtime.vocab import DraftVocab, corpus_texts, rank_tokens
from casspec.testing import tiny_model, tiny_tokenizer

PROMPT = "hello world, hello world, the cat sat on"


@pytest.fixture(scope="module")
def pruned():
    """A tiny engine drafting with int8 + a 40-token core (of 260), so pruning really bites."""
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), name="tiny-llama", hierarchy=("int8v", "pld"))
    order = torch.randperm(engine.runner.vocab_size, generator=torch.Generator().manual_seed(0))
    engine.runner.vocab = DraftVocab(engine.runner.weights.head, order, core=40)
    return engine


def test_pruned_head_returns_logits_over_its_ids(pruned):
    r = pruned.runner
    plan = Int8() | PrunedVocab()
    ids = torch.tensor([5, 6, 7])
    logits = r.forward(ids, torch.arange(3), torch.arange(3), r.new_cache(8), plan)
    full = r.forward(ids, torch.arange(3), torch.arange(3), r.new_cache(8), Int8())
    cols = r.token_ids(plan)
    assert logits.shape == (3, len(cols)) and len(cols) < r.vocab_size
    torch.testing.assert_close(logits, full[:, cols], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["casspec", "self", "vchc", "tree"])
def test_greedy_with_pruned_draft_head_equals_ar(pruned, method):
    ref = pruned.generate(PROMPT, "ar", max_new_tokens=40)
    out = pruned.generate(PROMPT, method, max_new_tokens=40)
    assert out.token_ids == ref.token_ids


def test_prompt_tokens_become_draftable(pruned):
    vocab = pruned.runner.vocab
    text = next(c for c in "qzjxkvwy0123456789" if not vocab.member[pruned.tokenizer.encode(c)[0]])
    token = pruned.tokenizer.encode(text)[0]
    pruned.generate(text * 3, "self", max_new_tokens=2)
    assert vocab.member[token] and token in vocab.ids.tolist()


def test_sampling_with_pruned_head_is_reproducible_once_the_vocabulary_is_fixed(pruned):
    """The draft vocabulary learns from every generation (so a seed fixes the distribution, not the
    sample); with nothing left to learn, a seed reproduces the sample."""
    pruned.runner.vocab.add(list(range(0, pruned.runner.vocab_size, 2)))
    first = DraftVocab(pruned.runner.weights.head, pruned.runner.vocab.core_ids, core=40)
    first.add(list(range(pruned.runner.vocab_size)))
    pruned.runner.vocab = first
    a = pruned.generate(PROMPT, "self", max_new_tokens=24, temperature=0.8, seed=3)
    b = pruned.generate(PROMPT, "self", max_new_tokens=24, temperature=0.8, seed=3)
    assert a.token_ids == b.token_ids and a.stats.drafters["int8v"].proposed > 0


def test_rank_tokens_puts_corpus_tokens_first(pruned):
    texts = [pruned.tokenizer.encode(t)[:48] for t in corpus_texts()[:3]]
    order = rank_tokens(pruned.runner, texts)
    assert sorted(order.tolist()) == list(range(pruned.runner.vocab_size))
    seen = {t for ids in texts for t in ids}
    assert set(order[: len(seen) // 2].tolist()) & seen


def test_draft_vocabulary_growth_is_capped():
    """Context tokens join the draft vocabulary in arrival order until `max_extra` of them have; after
    that nothing changes (no more head rebuilds), and greedy output stays exactly `ar`'s."""
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), name="tiny-llama", hierarchy=("int8v", "pld"))
    order = torch.randperm(engine.runner.vocab_size, generator=torch.Generator().manual_seed(0))
    vocab = engine.runner.vocab = DraftVocab(engine.runner.weights.head, order, core=40, max_extra=6)
    outside = [int(t) for t in order[40:].tolist()]
    vocab.add([outside[3], outside[0], outside[3], -1, 10**6])
    assert vocab.extra == [outside[3], outside[0]]
    vocab.add(outside[:20])
    assert vocab.extra == [outside[3], outside[0], outside[1], outside[2], outside[4], outside[5]]
    head = vocab.heads("int8")[1]
    vocab.add(outside[20:])  # full: a no-op, the extra head is not rebuilt
    assert len(vocab.extra) == 6 and vocab.heads("int8")[1] is head and len(vocab.ids) == 46
    assert not vocab.member[outside[30]]
    ref = engine.generate(PROMPT * 4, "ar", max_new_tokens=40)
    for method in ("casspec", "self"):
        assert engine.generate(PROMPT * 4, method, max_new_tokens=40).token_ids == ref.token_ids
    assert len(vocab.extra) == 6
