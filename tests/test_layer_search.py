"""On-the-fly layer-set search: scoring is teacher-forced agreement; results improve and are cached."""
from __future__ import annotations

from casspec.config import SamplingConfig
from casspec.decoder import SpeculativeDecoder
from casspec.drafters.layer_search import LayerSetSearch
from casspec.metrics import GenerationStats
from casspec.scheduler.static import NoDraft
from casspec.state import DecodeState
from casspec.runtime.plans import FULL


def _generated_state(engine, n_new=48):
    ids = engine.encode_prompt("the cat sat on the mat and then")
    cache = engine.runner.new_cache(len(ids) + n_new + 200)
    state = DecodeState(list(ids), cache, SamplingConfig(), GenerationStats("ar"), n_new)
    for _ in SpeculativeDecoder(engine.runner, NoDraft()).run(state):
        pass
    return state


def test_full_plan_agrees_with_its_own_greedy_output(engine):
    state = _generated_state(engine)
    length = state.cache.length
    search = LayerSetSearch(engine.runner, 0.25, window=16)
    assert search.score(state, FULL) == 1.0
    assert 0.0 <= search.score(state, search.plan) <= 1.0
    assert state.cache.length == length  # committed cache untouched


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
