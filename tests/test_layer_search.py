"""On-the-fly layer-set search: scoring is teacher-forced agreement; results improve and are cached."""
from __future__ import annotations

from casspec.decoder import SpeculativeDecoder
from casspec.drafters.layer_search import LayerSetSearch
from casspec.runtime.plans import FULL
from casspec.scheduler.static import NoDraft


def _generated_state(engine, n_new=48):
    """The state of a finished `ar` generation (KV of prompt and output committed), as Engine.iter_generate
    leaves it."""
    gen = engine.start("the cat sat on the mat and then", "ar", max_new_tokens=n_new, chat=False)
    gen.state.eos_ids = frozenset()  # the full n_new tokens: the score windows are generated text
    decoder = SpeculativeDecoder(engine.runner, NoDraft())
    decoder.prefill(gen.state)
    while not gen.finished:
        gen.push(decoder.step(gen.state).tokens)
    return gen.state


def test_full_plan_agrees_with_its_own_greedy_output(engine):
    state = _generated_state(engine)
    length = state.cache.length
    search = LayerSetSearch(engine.runner, 0.25, window=16)
    assert search.score(state, FULL) == 1.0
    assert search.score(state, search.plan) == _agreement(engine, state, search.plan, 16)
    assert state.cache.length == length  # committed cache untouched


def _agreement(engine, state, plan, w):
    """The same agreement computed the plain way: a fresh cache, the prefix under the target, the window
    under `plan` in the slots right after it (score() uses scratch slots past a draft tree instead)."""
    import torch

    r, start = engine.runner, state.cache.length - w
    cache = r.new_cache(state.cache.length + 1)
    pos = torch.arange(start)
    r.forward(torch.tensor(state.tokens[:start]), pos, pos, cache)
    cache.length = start
    pos = torch.arange(start, start + w)
    logits = r.forward(torch.tensor(state.tokens[start:start + w]), pos, pos, cache, plan)  # [w, V]
    target = torch.tensor(state.tokens[start + 1:start + w + 1])
    return float((logits.argmax(-1) == target).float().mean())


def test_search_improves_monotonically_and_caches(tmp_path, llama_engine):
    state = _generated_state(llama_engine)
    path = tmp_path / "sets.json"
    search = LayerSetSearch(llama_engine.runner, 0.25, window=16, interval=1, max_evals=12, path=path)
    scores = []
    for _ in range(12):
        search.maybe_step(state)
        scores.append(search.best_score)
    assert search.done and scores == sorted(scores)
    assert len(search.best) == search.num_skip
    again = LayerSetSearch(llama_engine.runner, 0.25, window=16, path=path)
    assert again.best == search.best
