"""The batch planner never makes a loaded batch pay for drafts that do not pay: such requests sit out planning
(no prompt lookup, no planner work) for 1, 2, 4, ... BACKOFF_MAX steps, and output stays exact."""
from __future__ import annotations

from casspec.batching import BatchEngine
from casspec.batching.planner import Choice
from casspec.batching.step import BACKOFF_MAX
from test_batching import _latency

PROMPTS = ["the cat sat on the mat", "one two three one two three", "a quick brown fox", "x y z x y z"]


def _steep(decoder) -> None:
    """A compute-bound latency model: every extra row costs a full step, so no draft ever pays."""
    rows = range(1, 80)
    decoder.planner.latency = _latency({n: 20 * n for n in rows}, {n: 6 * n for n in rows})


def test_requests_whose_drafts_do_not_pay_are_left_out_with_exponential_backoff(llama_engine):
    e = llama_engine
    want = [e.generate(p, "ar", max_new_tokens=40).token_ids for p in PROMPTS]
    batch = BatchEngine(e, max_batch=4, pool_tokens=4096)
    _steep(batch.decoder)
    calls = []
    lookup = e.pool.ngram.continuation  # a casspec request's lookup of its committed tokens
    e.pool.ngram.continuation = lambda *a, **k: calls.append(1) or lookup(*a, **k)
    try:
        results = batch.generate(PROMPTS, "casspec", max_new_tokens=40)
    finally:
        del e.pool.ngram.continuation
    assert [r.token_ids for r in results] == want
    st = batch.decoder.planner_stats()
    assert st["steps"] > 0 and st["left_out"] > st["planned"] and st["ms_per_step"] >= 0
    assert len(calls) == st["planned"] < 4 * st["steps"]  # left-out requests were not looked up


def test_backoff_doubles_up_to_the_cap_and_a_draft_resets_it(llama_engine):
    batch = BatchEngine(llama_engine, max_batch=2, pool_tokens=2048)
    d = batch.decoder
    g = batch.submit("hello there", "casspec", max_new_tokens=4)
    waits = []
    for _ in range(8):
        d._back_off(g, Choice())
        waits.append(d._idle[id(g)][1])
    assert waits == [1, 2, 4, 8, 16, 32, 32, 32][:len(waits)] and max(waits) == BACKOFF_MAX
    left = [d._planned(g) for _ in range(BACKOFF_MAX + 1)]
    assert left == [False] * BACKOFF_MAX + [True]
    d._back_off(g, Choice("pld", 2))
    assert d._planned(g) and id(g) not in d._idle
    d.forget(g)
