"""DyTC scheduler: exactness when it drafts, budget, objective maximisation, adaptation."""
from __future__ import annotations

import pytest

from casspec.scheduler.acceptance import AcceptanceEstimator
from casspec.scheduler.dytc import DyTC, DyTCConfig, Level
from casspec.scheduler.latency import LatencyModel
from casspec.tree import DraftTree

PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat"


def linear_latency(costs: dict[str, tuple[float, float]]) -> LatencyModel:
    """A latency model fitted to t = a + b * n_query per plan (seconds)."""
    lat = LatencyModel()
    for plan, (a, b) in costs.items():
        for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
            for ctx in (16, 256):
                lat.observe(plan, n, ctx, a + b * n)
    return lat


CHEAP_DRAFTS = {"full": (0.010, 0.0005), "int8": (0.002, 0.0001)}


def make_dytc(engine, config=DyTCConfig(), alphas=(0.8, 0.6), latency=None):
    levels = [Level(engine.pool.get("int8"), AcceptanceEstimator(prior=alphas[0])),
              Level(engine.pool.get("pld"), AcceptanceEstimator(prior=alphas[1]))]
    return DyTC(levels, latency or linear_latency(CHEAP_DRAFTS), config)


@pytest.mark.parametrize("config", [DyTCConfig(), DyTCConfig(use_tree=False), DyTCConfig(use_ema=False),
                                    DyTCConfig(use_latency=False), DyTCConfig(max_nodes=6, siblings=2)])
def test_dytc_greedy_is_exact_while_drafting(engine, config):
    ref = engine.generate(PROMPT, "ar", max_new_tokens=40)
    out = engine.generate(PROMPT, make_dytc(engine, config), max_new_tokens=40)
    assert out.token_ids == ref.token_ids
    assert sum(s.proposed for s in out.stats.drafters.values()) > 0
    assert out.stats.target_forwards < 40


def test_tree_respects_node_budget(llama_engine):
    out = llama_engine.generate(PROMPT, make_dytc(llama_engine, DyTCConfig(max_nodes=7)), max_new_tokens=30)
    proposed = sum(s.proposed for s in out.stats.drafters.values())
    assert proposed <= 6 * out.stats.target_forwards


def test_chain_ablation_builds_chains_only(llama_engine):
    sched = make_dytc(llama_engine, DyTCConfig(use_tree=False))
    shapes = []
    real_draft = sched.draft

    def spy(tree, state):
        real_draft(tree, state)
        shapes.append(all(len(c) <= 1 for c in tree.children))

    sched.draft = spy
    llama_engine.generate(PROMPT, sched, max_new_tokens=20)
    assert shapes and all(shapes)


def _brute_force(sched, tree, state, leaf):
    """The best (score, level, k) at the root by the documented objective, computed here from the cost and
    acceptance models alone (not through DyTC's own option list): a self level's chain of k costs k draft steps
    plus verifying 1 + k nodes and ranks with the bottom level's tail; prompt lookup costs one lookup and drafts
    no deeper than max(cfg.lookup_depth, 2 x state.lookup_run)."""
    assert leaf == 0 and len(tree) == 1
    ctx, cfg, bottom = state.ctx_len, sched.cfg, sched.bottom
    room = min(cfg.max_nodes, tree.capacity) - 1
    kmax = min(cfg.max_k, state.max_depth())
    best = None
    for level in sched.levels:
        if level.is_lookup:
            reach = max(cfg.lookup_depth, 2 * state.lookup_run)
            draft, match = level.drafter.lookup(tree, state, 0, min(kmax, room, reach))
            a, ks, tail = level.estimator.token_prob(match / level.drafter.max_n), range(1, len(draft) + 1), 0.0
            cost = lambda k: sched._t_lookup() + sched._t_verify(1 + k, ctx)  # noqa: E731
        else:
            a, tail = level.estimator.token_prob(None), bottom.estimator.token_prob(None)
            ks = range(1, min(kmax, room // (1 + cfg.siblings)) + 1)
            cost = lambda k, lv=level: k * sched._t_draft(lv, 1, ctx) + sched._t_verify(1 + k, ctx)  # noqa: E731
        for k in ks:
            score = (1 + sum(a ** i for i in range(1, k + 1)) + a ** k * tail) / cost(k)
            if best is None or score > best[0]:
                best = (score, level.name, k)
    return best


def test_chosen_expansion_maximises_the_objective(llama_engine):
    from casspec.config import SamplingConfig
    from casspec.metrics import GenerationStats
    from casspec.state import DecodeState

    e = llama_engine
    ids = e.encode_prompt(PROMPT)
    state = DecodeState(list(ids), e.runner.new_cache(256), SamplingConfig(), GenerationStats("t"), 50)
    state.cache.length = len(ids) - 1
    for alphas, expect_level, run in [((0.9, 0.1), "int8", 0), ((0.05, 0.95), "pld", 0), ((0.05, 0.95), "pld", 3)]:
        sched = make_dytc(e, alphas=alphas)
        state.lookup_run = run
        tree = DraftTree(ids[-1], state.cache.length)
        opt = sched._best_option(tree, state, 0, 0.0)
        score, name, k = _brute_force(sched, tree, state, 0)
        assert (opt.level.name, opt.k) == (name, k) == (expect_level, k)
        # the predicted rate equals the closed form for that choice
        a, t_v = opt.level.estimator.token_prob(None if name == "int8" else opt.lookup[1] / 3), sched._t_verify
        if name == "int8":
            cost = k * sched._t_draft(opt.level, 1, state.ctx_len) + t_v(1 + k, state.ctx_len)
            assert opt.rate == pytest.approx((1 + sum(a ** i for i in range(1, k + 1))) / cost, rel=1e-6)


def test_no_expansion_when_drafting_cannot_pay(llama_engine):
    slow = linear_latency({"full": (0.010, 0.0005), "int8": (0.050, 0.0)})  # drafts cost 5x a verification
    sched = make_dytc(llama_engine, alphas=(0.3, 0.0), latency=slow)
    out = llama_engine.generate("zq", sched, max_new_tokens=10)
    assert out.stats.drafters.get("int8") is None or out.stats.drafters["int8"].proposed == 0


def test_prompt_lookup_reaches_as_deep_as_its_last_run_allows(llama_engine):
    """A lookup chain stops at max(cfg.lookup_depth, 2 x the tokens lookup got committed last round); the
    round's run is its accepted lookup chain from the root."""
    from casspec.config import SamplingConfig
    from casspec.metrics import GenerationStats
    from casspec.state import DecodeState
    from casspec.verify.accept import AcceptResult

    e = llama_engine
    ids = e.encode_prompt(" ".join(["one two three four five six seven eight nine ten"] * 4) + " one")
    state = DecodeState(list(ids), e.runner.new_cache(256), SamplingConfig(), GenerationStats("t"), 50)
    state.cache.length = len(ids) - 1
    sched = make_dytc(e, alphas=(0.05, 0.99))
    depths = {}
    for run in (0, 1, 3, 20):
        state.lookup_run = run
        tree = DraftTree(ids[-1], state.cache.length)
        sched.draft(tree, state)
        assert set(tree.drafter[1:]) == {"pld"}
        depths[run] = max(tree.depth)
    cfg = sched.cfg
    assert depths[0] == depths[1] == cfg.lookup_depth and depths[3] == 6 and depths[20] > 6
    # the run a round leaves: the accepted lookup chain from the root
    tree = DraftTree(ids[-1], state.cache.length)
    state.lookup_run = 0
    sched.draft(tree, state)
    result = AcceptResult(path=[0, 1, 2], tokens=[tree.tokens[1], tree.tokens[2], 7])
    assert sched._lookup_run(tree, result) == 2


def test_prompt_lookup_reach_grows_over_a_copied_stretch(llama_engine):
    """Rounds that commit nothing but their root lookup's continuation are one copied stretch: their runs add up
    (a loop copied 2 tokens a round once kept the reach at 4 for 70 rounds), and a round that leaves the stretch
    starts the count again from what it copied."""
    from casspec.config import SamplingConfig
    from casspec.metrics import GenerationStats
    from casspec.state import DecodeState
    from casspec.verify.accept import AcceptResult

    e = llama_engine
    ids = e.encode_prompt(" ".join(["one two three four five six seven eight nine ten"] * 6) + " one")
    state = DecodeState(list(ids), e.runner.new_cache(512), SamplingConfig(), GenerationStats("t"), 200)
    state.cache.length = len(ids) - 1
    sched = make_dytc(e, alphas=(0.05, 0.99))
    runs, depths = [], []
    for wrong_at in (None, None, 2):  # two rounds copied whole, then one that leaves the text after 2 tokens
        tree = DraftTree(state.tokens[-1], state.cache.length)
        sched.draft(tree, state)
        root = sched._round.root
        chain = tree.tokens[1:]
        assert set(tree.drafter[1:]) == {"pld"} and chain == root[0][:len(chain)]
        depths.append(len(chain))
        if wrong_at is None:  # every drafted token and the bonus (the continuation's next token) committed
            result = AcceptResult(path=list(range(len(tree))), tokens=chain + [root[0][len(chain)]])
        else:
            result = AcceptResult(path=list(range(wrong_at + 1)), tokens=chain[:wrong_at] + [e.tokenizer.eos_token_id])
        sched._learn_lookup(tree, result, state, root)
        state.tokens += result.tokens
        runs.append(state.lookup_run)
    cfg = sched.cfg
    assert depths[0] == cfg.lookup_depth and runs[0] == depths[0]
    assert depths[1] == 2 * runs[0] and runs[1] == runs[0] + depths[1]  # the stretch's runs add up
    assert depths[2] > depths[1] and runs[2] == 2 and not state.lookup_streak  # left the stretch: starts again
