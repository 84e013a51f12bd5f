"""DyTC at temperature > 0: acceptance per regime, sampling work in the cost model, the pay guard, and the
coupled output (the same tokens as `ar` for a seed) whatever the scheduler decides."""
from __future__ import annotations

import pytest

from casspec.config import SamplingConfig
from casspec.drafters.self_draft import SelfDrafter
from casspec.metrics import GenerationStats
from casspec.runtime.plans import FULL
from casspec.scheduler.acceptance import GREEDY, AcceptanceEstimator, RatioEstimator, regime
from casspec.scheduler.dytc import DyTC, DyTCConfig, Level, PayGuard
from casspec.state import DecodeState
from casspec.tree import DraftTree
from test_dytc import CHEAP_DRAFTS, PROMPT, linear_latency, make_dytc

SAMPLED = dict(temperature=0.7, top_p=0.95)
WRONG = dict(temperature=1.0, top_k=20)  # the reversed drafter's top 20 never meet the target's


class ReversedDrafter(SelfDrafter):
    """The target with negated logits: at T > 0 it samples among the tokens the target finds least likely,
    so (with top_k well under half the vocabulary) no draft is ever accepted."""

    def _forward(self, tree, state, frontier):
        return -super()._forward(tree, state, frontier)


def _state(engine, sampling: SamplingConfig) -> DecodeState:
    ids = engine.encode_prompt(PROMPT)
    state = DecodeState(list(ids), engine.runner.new_cache(256), sampling, GenerationStats("t"), 50)
    state.cache.length = len(ids) - 1
    return state


def _with_samples(costs: dict[str, tuple[float, float]], samples: dict[str, float]):
    """linear_latency(costs) plus "sample:<plan>" costing `seconds` per sampled row."""
    lat = linear_latency(costs)
    for plan, per_row in samples.items():
        for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
            lat.observe(f"sample:{plan}", n, 0, per_row * n)
    return lat


def test_regimes_bucket_rule_and_temperature():
    assert regime(SamplingConfig()) == GREEDY
    assert regime(SamplingConfig(temperature=0.7, top_p=0.9)) == regime(SamplingConfig(temperature=0.8))
    assert regime(SamplingConfig(temperature=0.7)) != regime(SamplingConfig(temperature=1.3))
    assert regime(SamplingConfig(temperature=0.7)) != regime(SamplingConfig(temperature=0.7, rule="rejection"))
    assert regime(SamplingConfig(temperature=9.0)) == regime(SamplingConfig(temperature=30.0))


def test_sampled_outcomes_do_not_move_greedy_estimates_nor_the_reverse(llama_engine):
    # fixed costs: with measured ones, a CPU where the int8 draft is slow (AVX2 without VNNI) leaves it out of the
    # greedy run, and there is nothing to observe
    sched = make_dytc(llama_engine, DyTCConfig(use_latency=False), alphas=(0.8, 0.6))
    int8 = sched.levels[0]
    llama_engine.generate(PROMPT, sched, max_new_tokens=40, seed=1, **SAMPLED)
    sampled = int8.estimate(regime(SamplingConfig(**SAMPLED)))
    assert sampled.num_observed > 0
    assert int8.estimator.num_observed == 0 and int8.estimator.alpha == 0.8  # greedy untouched
    seen = sampled.state_dict()
    llama_engine.generate(PROMPT, sched, max_new_tokens=40)
    assert int8.estimator.num_observed > 0
    assert sampled.state_dict() == seen  # and greedy outcomes leave the sampled estimate alone
    assert int8.estimate(regime(SamplingConfig(temperature=1.5))).num_observed == 0  # another bucket: fresh


def test_estimator_fresh_keeps_prior_and_hyperparameters():
    est = AcceptanceEstimator(prior=0.9, lam=0.5, window=10, n_bins=5)
    est.observe_many([False] * 30)
    new = est.fresh()
    assert (new.alpha, new.prior, new.lam, new.window, new.n_bins, new.num_observed) == (0.9, 0.9, 0.5, 10, 5, 0)


def test_drafts_never_accepted_when_sampling_end_in_plain_decoding(llama_engine):
    """A level whose sampled drafts are always rejected is dropped by its own (sampled) estimate, without
    the guard's help; the output stays `ar`'s for each seed, and the greedy estimate is not dragged down.
    (Fixed cost ratios: the tiny model's real timings would make this a test of the latency model.)"""
    level = Level(ReversedDrafter(llama_engine.runner, FULL, name="rev"), AcceptanceEstimator(prior=0.8))
    sched = DyTC([level], linear_latency(CHEAP_DRAFTS), DyTCConfig(use_latency=False, guard=False))
    proposed = []
    for seed in range(4):
        ref = llama_engine.generate(PROMPT, "ar", max_new_tokens=60, seed=seed, **WRONG).token_ids
        out = llama_engine.generate(PROMPT, sched, max_new_tokens=60, seed=seed, **WRONG)
        assert out.token_ids == ref
        stats = out.stats.drafters.get("rev")
        proposed.append(0 if stats is None else stats.proposed)
        assert stats is None or stats.accepted == 0
    assert proposed[0] > 0 and proposed[-1] == 0, proposed
    assert level.estimate(regime(SamplingConfig(**WRONG))).alpha < 0.5
    assert level.estimator.alpha == 0.8 and level.estimator.num_observed == 0
    # greedy: the same drafter proposes the target's least likely token; the greedy regime starts afresh
    assert sched._best_option(DraftTree(0, 10), _state(llama_engine, SamplingConfig()), 0, 0.0) is not None


def test_sampling_work_enters_the_objective(llama_engine):
    """At T > 0 a draft step costs its forward plus sampling its rows, verification the target's sampling of
    the tree: the predicted rate is the closed form with both, and a costly draft sampler rules the level out
    at T > 0 while greedy still drafts with it."""
    greedy, sampled = _state(llama_engine, SamplingConfig()), _state(llama_engine, SamplingConfig(**SAMPLED, seed=1))
    lat = _with_samples(CHEAP_DRAFTS, {"full": 0.0004, "int8": 0.0003})
    sched = make_dytc(llama_engine, alphas=(0.9, 0.1), latency=lat)
    tree = DraftTree(sampled.tokens[-1], sampled.cache.length)
    opt = sched._best_option(tree, sampled, 0, 0.0)
    assert opt.level.name == "int8"
    a, k, ctx = opt.level.estimate(regime(sampled.sampling)).alpha, opt.k, sampled.ctx_len
    cost = k * (lat.predict("int8", 1, ctx) + lat.predict("sample:int8", 1, 0)) \
        + lat.predict("full", 1 + k, ctx) + lat.predict("sample:full", 1 + k, 0)
    assert opt.rate == pytest.approx((1 + sum(a ** i for i in range(1, k + 1))) / cost, rel=1e-6)
    greedy_opt = sched._best_option(DraftTree(greedy.tokens[-1], greedy.cache.length), greedy, 0, 0.0)
    assert greedy_opt.rate > opt.rate  # the same expansion without sampling work is predicted faster

    costly = _with_samples(CHEAP_DRAFTS, {"full": 0.0004, "int8": 0.006})  # int8 step + sampling > 0.6 step
    sched = make_dytc(llama_engine, alphas=(0.9, 0.1), latency=costly)
    assert not sched._pays(sched.levels[0], ctx)
    opt = sched._best_option(DraftTree(sampled.tokens[-1], sampled.cache.length), sampled, 0, 0.0)
    assert opt is None or opt.level.name != "int8"
    opt = sched._best_option(DraftTree(greedy.tokens[-1], greedy.cache.length), greedy, 0, 0.0)
    assert opt.level.name == "int8"


def test_sampling_costs_are_measured(llama_engine):
    sched = make_dytc(llama_engine, alphas=(0.9, 0.6))
    llama_engine.generate(PROMPT, sched, max_new_tokens=30, seed=2, **SAMPLED)
    assert sched.latency.knows("sample:full") and sched.latency.knows("sample:int8")
    assert 0 < sched._t_sample("int8", 1) < 0.1


def test_pay_guard_pauses_drafting_that_measures_slower_than_plain_rounds():
    g = PayGuard(min_rounds=4, min_plain=2, pause=3, max_pause=12)
    for _ in range(3):
        g.record(False, 1, 0.010, plain_estimate=100.0)  # plain rounds: 100 tok/s
    for _ in range(4):
        assert g.allows()
        g.record(True, 1, 0.015, plain_estimate=100.0)  # drafted rounds: 67 tok/s
    assert not g.allows() and g.pauses == 1
    for _ in range(3):
        g.record(False, 1, 0.010, plain_estimate=100.0)
    assert g.allows()
    for _ in range(4):  # the probe fails again: a longer pause
        g.record(True, 1, 0.015, plain_estimate=100.0)
    assert g.left == 6 and g.pauses == 2
    for _ in range(6):
        g.record(False, 1, 0.010, plain_estimate=100.0)
    for _ in range(20):  # drafting now pays: no pause, and the next pause is short again
        g.record(True, 3, 0.015, plain_estimate=100.0)
        assert g.allows()
    assert g.pause == 3


def test_pay_guard_judges_against_the_prediction_before_plain_rounds():
    g = PayGuard(min_rounds=4, pause=5)
    for _ in range(4):
        g.record(True, 2, 0.010, plain_estimate=150.0)  # 200 tok/s drafted vs 150 predicted plain
    assert g.allows()
    for _ in range(40):
        g.record(True, 1, 0.010, plain_estimate=150.0)  # 100 tok/s now
    assert g.pauses >= 1


def test_ratio_estimator_tracks_observed_over_predicted():
    r = RatioEstimator(strength=1.0, decay=1.0)
    assert r.ratio == 1.0
    for _ in range(200):
        r.observe(False, 0.2)
    assert r.ratio < 0.03
    r = RatioEstimator(decay=1.0)
    for i in range(400):
        r.observe(i % 2 == 0, 0.25)  # half accepted where the heuristic said a quarter
    assert r.ratio == pytest.approx(2.0, rel=0.02)


class OneRunnerUp(SelfDrafter):
    """Adds a drafted child and one runner-up (heuristic p_acc 0.3 of the leaf's) below the first leaf."""

    def propose(self, tree, state, leaves, k, *, min_sibling_p_acc=0.0, score=lambda c: c, **_):
        self.min_sibling_p_acc, leaf = min_sibling_p_acc, leaves[0]
        main = tree.add(leaf, 1, self.name, 0.6, tree.p_acc[leaf] * score(0.6))
        return [main, tree.add(leaf, 2, self.name, 0.3, tree.p_acc[leaf] * 0.3)]


def test_rejected_runner_ups_lose_their_p_acc_when_sampling(llama_engine):
    """Runner-up siblings never accepted at T > 0: their p_acc is scaled down by what the regime measured,
    and the bar a runner-up must pass rises alike; the greedy regime keeps the heuristic."""
    drafter = OneRunnerUp(llama_engine.runner, FULL, name="int8")
    sched = DyTC([Level(drafter, AcceptanceEstimator(prior=0.8))], linear_latency(CHEAP_DRAFTS))
    ratio = sched.levels[0].sibling_ratio(regime(SamplingConfig(**SAMPLED)))
    for _ in range(300):
        ratio.observe(False, 0.3)
    assert sched.levels[0].sibling_ratio(GREEDY) is None
    for sampling, scale in ((SamplingConfig(), 1.0), (SamplingConfig(**SAMPLED, seed=1), ratio.ratio)):
        state = _state(llama_engine, sampling)
        tree = DraftTree(state.tokens[-1], state.cache.length)
        opt = sched._best_option(tree, state, 0, 0.0)
        sched._expand(tree, state, opt)
        assert tree.p_acc[2] == pytest.approx(0.3 * scale)
        assert drafter.min_sibling_p_acc == pytest.approx(opt.min_sibling_p_acc / scale)
    assert ratio.ratio < 0.1


@pytest.mark.parametrize("kw", [SAMPLED, dict(temperature=1.2, top_p=0.8, min_p=0.05), WRONG])
def test_casspec_samples_what_ar_samples_for_a_seed(engine, kw):
    """The engine's own casspec (persistent across requests, its guard and regimes included)."""
    for seed in (5, 77, 2024):
        ref = engine.generate(PROMPT, "ar", max_new_tokens=40, seed=seed, **kw).token_ids
        for _ in range(2):
            assert engine.generate(PROMPT, "casspec", max_new_tokens=40, seed=seed, **kw).token_ids == ref


def test_guard_times_rounds_only_with_the_latency_model(llama_engine):
    """The guard decides by wall-clock time, like the latency model: off under use_latency=False, so a frozen
    scheduler's drafting (and its rejection-rule output) depends on nothing measured."""
    frozen = make_dytc(llama_engine, DyTCConfig(use_latency=False, use_ema=False))
    llama_engine.generate(PROMPT, frozen, max_new_tokens=12, seed=1, **SAMPLED)
    assert frozen.guards == {}
    live = make_dytc(llama_engine)
    llama_engine.generate(PROMPT, live, max_new_tokens=12, seed=1, **SAMPLED)
    assert list(live.guards) == [regime(SamplingConfig(**SAMPLED))]
    llama_engine.generate(PROMPT, live, max_new_tokens=12)
    assert list(live.guards) == [regime(SamplingConfig(**SAMPLED))]  # greedy: no guard
