"""The drafter pool's choice of paying levels, and the fixed policies' answers to the batch planner."""
from __future__ import annotations

from casspec.pool import DRAFTERS, PRIORS, DrafterPool, default_hierarchy
from casspec.scheduler.static import PLD_LENGTH, NoDraft, PromptLookup, SelfChain
from casspec.sizes import MAX_CHAIN
from test_dytc import linear_latency


def test_paying_leaves_out_levels_that_cost_most_of_a_step(llama_engine):
    pool = DrafterPool(llama_engine.runner, "tiny-llama", None, ("int8", "int4", "pld"))
    pool._latency = linear_latency({"full": (0.010, 0.001), "int8": (0.004, 0.0), "int4": (0.009, 0.0)})
    assert pool.paying() == ("int8", "pld")  # int4: 0.9 of a step, over MAX_DRAFT_COST
    pool._latency = linear_latency({"full": (0.010, 0.001)})  # unmeasured levels are kept
    assert pool.paying() == ("int8", "int4", "pld")


def test_every_level_has_a_prior_and_the_default_hierarchy_is_known(llama_engine):
    assert set(DRAFTERS) <= set(PRIORS)
    assert set(default_hierarchy(llama_engine.runner)) <= set(DRAFTERS)


def test_fixed_policies_answer_the_batch_planner(llama_engine):
    state = llama_engine.start("a b c", "ar", max_new_tokens=20).state
    assert NoDraft().batch_choice(state, ([1, 2, 3], 3)) == (None, 0)
    lookup = PromptLookup(llama_engine.pool.ngram)
    for n, k in PLD_LENGTH.items():
        assert lookup.batch_choice(state, (list(range(20)), n)) == ("pld", k)  # the match-gated length
    assert lookup.batch_choice(state, ([7, 8], 3)) == ("pld", 2)  # never more than was found
    chain = SelfChain(llama_engine.pool.get("int8"), min_conf=0.3)
    assert chain.batch_choice(state, ([], 0)) == ("int8", min(MAX_CHAIN, state.max_depth()))
    assert chain.chain_goes_on(0.3) and not chain.chain_goes_on(0.29)
    assert NoDraft().chain_goes_on(0.0)
