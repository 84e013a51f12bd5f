"""PayGuard's probe of the bottom level, and DyTC restricted to prompt lookup while its self levels pause."""
from __future__ import annotations

from casspec.drafters.ngram import NgramDrafter
from casspec.scheduler.acceptance import GREEDY
from casspec.scheduler.guard import PayGuard
from casspec.scheduler.latency import ForwardTimes
from casspec.tree import DraftTree
from casspec.verify.accept import AcceptResult
from test_dytc import PROMPT, make_dytc


def test_probe_measures_the_alternative_before_judging():
    g = PayGuard(min_rounds=4, min_plain=2, pause=3, probe=True)
    for _ in range(4):
        assert g.allows()
        g.record(True, 1, 0.010, plain_estimate=0.0)  # 100 tok/s with the self levels
    assert not g.allows() and g.left == 2 and g.pauses == 0  # a probe, not a pause
    for _ in range(2):
        g.record(False, 2, 0.010, plain_estimate=0.0)  # 200 tok/s with prompt lookup alone
    assert g.allows()
    g.record(True, 1, 0.010, plain_estimate=0.0)
    assert not g.allows() and g.pauses == 1 and g.left == 3


def test_probe_keeps_levels_that_pay():
    g = PayGuard(min_rounds=4, min_plain=2, probe=True)
    for _ in range(4):
        g.record(True, 3, 0.010, plain_estimate=0.0)
    for _ in range(2):
        g.record(False, 1, 0.010, plain_estimate=0.0)
    for _ in range(30):
        g.record(True, 3, 0.010, plain_estimate=0.0)
        assert g.allows()
    assert g.pauses == 0


def test_paused_self_levels_leave_prompt_lookup_alone(llama_engine):
    ref = llama_engine.generate(PROMPT, "ar", max_new_tokens=30)
    sched = make_dytc(llama_engine)
    sched.self_guards[GREEDY] = guard = PayGuard(probe=True)
    guard.left = 10_000
    out = llama_engine.generate(PROMPT, sched, max_new_tokens=30)
    assert out.token_ids == ref.token_ids
    assert "int8" not in out.stats.drafters or out.stats.drafters["int8"].proposed == 0
    out = llama_engine.generate(PROMPT, make_dytc(llama_engine), max_new_tokens=30)  # not paused: it drafts
    assert out.token_ids == ref.token_ids and out.stats.drafters["int8"].proposed > 0


def test_bottom_estimate_is_measured_while_other_levels_win(llama_engine):
    """Prompt lookup's shadow continuation is scored against the committed tokens as verification would have:
    each token only if the ones before it matched, nothing beyond what was committed."""
    sched = make_dytc(llama_engine)
    state = llama_engine.start("one two three", "ar", max_new_tokens=4).state
    first, then = sched.bottom.estimator, NgramDrafter.next_estimate(state)  # a continuation's first / next tokens
    n0, m0 = first.num_observed, then.num_observed
    sched._observe_shadow(([5, 6, 7, 8], 3), 2, False, AcceptResult(path=[0, 1], tokens=[5, 6, 9]), state)
    assert (first.num_observed, then.num_observed) == (n0 + 1, m0 + 2)  # 5, then 6 and 7 (rejected); 8 never seen
    sched._observe_shadow(([5, 6, 7], 3), 1, False, AcceptResult(path=[0], tokens=[5]), state)
    assert (first.num_observed, then.num_observed) == (n0 + 2, m0 + 2)  # one committed token: one observation


def test_shadow_lookup_keeps_the_output(llama_engine):
    prompt = "one two three four one two three four one two three four one two"
    ref = llama_engine.generate(prompt, "ar", max_new_tokens=40)
    sched = make_dytc(llama_engine, alphas=(0.99, 0.01))
    assert llama_engine.generate(prompt, sched, max_new_tokens=40).token_ids == ref.token_ids
    assert sched.bottom.estimator.num_observed > 0


def test_a_copied_stretch_goes_on_from_its_own_position(llama_engine):
    """While the last round committed only its lookup's continuation, the next round's continuation is the
    stretch's next tokens, not the latest occurrence of the new suffix (which may be another copy)."""
    sched = make_dytc(llama_engine)
    state = llama_engine.start("one two three", "ar", max_new_tokens=16).state
    state.tokens = [1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 1, 2, 3, 4]  # suffix [2, 3, 4] last seen before 7
    assert sched._root_lookup(state) == (([7, 1, 2, 3, 4], 3), 9)  # searched: the latest match
    state.lookup_streak, state.lookup_source = True, 4  # the text is copying tokens[1:4] and goes on at 4
    (draft, n), start = sched._root_lookup(state)
    assert (draft[:3], n, start) == ([5, 9, 2], 3, 4)


def test_lookup_chains_learn_first_and_next_tokens_apart(llama_engine):
    """A lookup node under the root feeds the first-token estimate, one under another lookup node the next-token
    one (each observed only when its parent was accepted)."""
    sched = make_dytc(llama_engine)
    state = llama_engine.start("one two three", "ar", max_new_tokens=8).state
    tree = DraftTree(state.tokens[-1], state.cache.length, 8)
    a = tree.add(0, 5, "pld", 1.0, 0.5)
    b = tree.add(a, 6, "pld", 1.0, 0.4)
    tree.add(b, 7, "pld", 1.0, 0.3)  # its parent b is rejected: not observed
    first, then = sched.bottom.estimator, NgramDrafter.next_estimate(state)
    n0, m0 = first.num_observed, then.num_observed
    sched.observe(tree, AcceptResult(path=[0, a], tokens=[5, 9]), state, ForwardTimes())
    assert (first.num_observed, then.num_observed) == (n0 + 1, m0 + 1)  # a accepted (first), b rejected (next)
