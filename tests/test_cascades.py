"""The cascade baselines (scheduler/cascades.py): vc, hc, vchc and the confidence-aware static tree.

Each draft rule is checked on a real prefilled state of the tiny model, with a scripted prompt lookup where the
lookup's proposal must decide the outcome. A self-draft on the FULL plan drafts exactly the target's greedy tokens,
so what a cascade keeps or corrects can be checked against plain `ar` decoding, computed independently.
"""
from __future__ import annotations

import pytest
import torch

from casspec.api import Engine
from casspec.decoder import SpeculativeDecoder
from casspec.drafters.ngram import NgramDrafter
from casspec.drafters.self_draft import SelfDrafter
from casspec.runtime.plans import FULL, EarlyExit
from casspec.scheduler.cascades import ConfidenceTree, HorizontalCascade, VerticalCascade, VerticalHorizontalCascade
from casspec.scheduler.static import NoDraft
from casspec.sizes import TREE_CAPACITY
from casspec.testing import tiny_model, tiny_tokenizer
from casspec.tree import DraftTree

PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat"
PROMPTS = [PROMPT, "abcabcabcabc", "Q: 2+2? A:"]


class ScriptedLookup(NgramDrafter):
    """Prompt lookup that proposes the given tokens (cut to the room asked for) and records (leaf, k) per call."""

    def __init__(self, draft: list[int], name: str = "pld", match: int = 3) -> None:
        super().__init__(name=name)
        self.draft, self.match, self.calls = list(draft), match, []

    def lookup(self, tree, state, leaf, k):
        self.calls.append((leaf, k))
        draft = self.draft[:k]
        return draft, self.match if draft else 0


def prefilled(engine, prompt: str = PROMPT, max_new_tokens: int = 40):
    """A decode state whose cache holds the prompt but its last token, as at the first step of a generation."""
    state = engine.start(prompt, "ar", max_new_tokens=max_new_tokens, chat=False).state
    SpeculativeDecoder(engine.runner, NoDraft()).prefill(state)
    return state


def new_tree(state) -> DraftTree:
    return DraftTree(state.tokens[-1], state.cache.length, TREE_CAPACITY)


def chain_of(tree: DraftTree) -> list[int]:
    """The nodes below the root of a tree that must be a single chain."""
    assert all(len(c) <= 1 for c in tree.children), "not a chain"
    nodes, node = [], 0
    while tree.children[node]:
        node = tree.children[node][0]
        nodes.append(node)
    return nodes


def tokens(tree: DraftTree, nodes: list[int]) -> list[int]:
    return [tree.tokens[n] for n in nodes]


def labels(tree: DraftTree, nodes: list[int]) -> list[str | None]:
    return [tree.drafter[n] for n in nodes]


def wrong(token: int) -> int:
    """A byte token that is not `token`."""
    return (token + 1) % 256


@pytest.fixture(scope="module")
def greedy(llama_engine) -> list[int]:
    """The target's own greedy continuation of PROMPT (plain `ar` decoding)."""
    out = llama_engine.generate(PROMPT, "ar", max_new_tokens=16, chat=False).token_ids
    assert len(out) == 16 and not set(out) & llama_engine.eos_ids  # the tests below index into it
    return out


@pytest.fixture(scope="module")
def full(llama_engine) -> SelfDrafter:
    return SelfDrafter(llama_engine.runner, FULL, name="full")


@pytest.fixture(scope="module")
def exit2(llama_engine) -> SelfDrafter:
    return SelfDrafter(llama_engine.runner, EarlyExit(2), name="exit2")


# -- vc: lookup, reviewed by the self-draft in one forward, then the self-draft continues --------------------------
@pytest.mark.parametrize("agree,length", [(0, 6), (3, 6), (5, 5)], ids=["all-wrong", "3-right", "all-right"])
def test_vc_keeps_the_agreeing_lookup_prefix_corrects_the_first_miss_and_continues(llama_engine, greedy, full,
                                                                                   agree, length):
    state = prefilled(llama_engine)
    draft = greedy[:agree] + [wrong(t) for t in greedy[agree:length]]
    lookup = ScriptedLookup(draft)
    vc = VerticalCascade(lookup, full, k_lookup=8, k_self=2)
    tree = new_tree(state)
    vc.draft(tree, state)
    nodes = chain_of(tree)
    corrected = 1 if agree < length else 0
    assert lookup.calls == [(0, 8)]
    assert labels(tree, nodes) == ["pld"] * agree + ["full"] * (corrected + 2)
    assert tokens(tree, nodes) == greedy[:agree + corrected + 2]  # the reviewer's tokens are the target's
    assert state.stats.drafters["full"].forwards == 1 + 2  # one review forward, then one per continued token


def test_vc_without_a_lookup_match_self_drafts_from_the_root(llama_engine, greedy, full):
    state = prefilled(llama_engine)
    vc = VerticalCascade(ScriptedLookup([]), full, k_lookup=8, k_self=3)
    tree = new_tree(state)
    vc.draft(tree, state)
    nodes = chain_of(tree)
    assert labels(tree, nodes) == ["full"] * 3 and tokens(tree, nodes) == greedy[:3]
    assert state.stats.drafters["full"].forwards == 3  # no review forward


def test_vc_stays_within_the_token_budget(llama_engine, greedy, full):
    state = prefilled(llama_engine, max_new_tokens=4)  # drafts deeper than 3 could never be kept
    lookup = ScriptedLookup(greedy[:8])
    tree = new_tree(state)
    VerticalCascade(lookup, full, k_lookup=8, k_self=4).draft(tree, state)
    nodes = chain_of(tree)
    assert lookup.calls == [(0, 3)]
    assert labels(tree, nodes) == ["pld"] * 3 and max(tree.depth) == 3


def test_vc_with_real_lookup_follows_the_reviewers_own_greedy_chain(llama_engine):
    """The real n-gram lookup and the pool's first self-draft level: the reviewed chain is that level's own greedy
    chain, and exactly the lookup tokens it agrees with keep the lookup's label."""
    state = prefilled(llama_engine)
    drafter = llama_engine.pool.self_levels()[0]
    ngram = NgramDrafter(name="pld")
    looked, n = ngram.lookup(new_tree(state), state, 0, 8)
    assert n > 0 and looked  # the prompt repeats itself: the lookup has a continuation
    tree = new_tree(state)
    VerticalCascade(ngram, drafter, k_lookup=8, k_self=3).draft(tree, state)
    got = tokens(tree, chain_of(tree))
    ref = new_tree(state)
    own = tokens(ref, drafter.propose(ref, state, [0], len(got)))
    assert got == own
    agree = next((i for i, (a, b) in enumerate(zip(looked, own)) if a != b), len(looked))
    expect = ["pld"] * agree + [drafter.name] * (len(got) - agree)
    assert labels(tree, chain_of(tree)) == expect


# -- hc: each stage drafts its block below the previous one, strongest first; lookup takes the tail -----------------
def test_hc_stages_draft_their_blocks_in_order_then_lookup_the_tail(llama_engine, greedy, full, exit2):
    state = prefilled(llama_engine)
    tail = ScriptedLookup([11, 12, 13, 14, 15, 16])
    tree = new_tree(state)
    HorizontalCascade([full, exit2], tail, ks=[2, 3], k_tail=4).draft(tree, state)
    nodes = chain_of(tree)
    assert labels(tree, nodes) == ["full"] * 2 + ["exit2"] * 3 + ["pld"] * 4
    assert tokens(tree, nodes[:2]) == greedy[:2]
    assert tail.calls == [(nodes[4], 4)] and tokens(tree, nodes[5:]) == [11, 12, 13, 14]
    # the second stage continues below the first stage's block with its own greedy tokens
    ref = new_tree(state)
    end = ref.add(ref.add(0, greedy[0], "x", 1.0, 1.0), greedy[1], "x", 1.0, 1.0)
    assert tokens(tree, nodes[2:5]) == tokens(ref, exit2.propose(ref, state, [end], 3))


def test_hc_stops_at_the_token_budget(llama_engine, greedy, full, exit2):
    state = prefilled(llama_engine, max_new_tokens=4)  # max depth 3
    tail = ScriptedLookup([11, 12, 13])
    tree = new_tree(state)
    HorizontalCascade([full, exit2], tail, ks=[2, 3], k_tail=4).draft(tree, state)
    nodes = chain_of(tree)
    assert labels(tree, nodes) == ["full", "full", "exit2"] and tokens(tree, nodes[:2]) == greedy[:2]
    assert tail.calls == [(nodes[-1], 0)] and max(tree.depth) == 3


# -- vchc: the first block by vertical cascade (or, without a lookup match, the hc head), the tail by lookup --------
def test_vchc_reviews_the_lookup_then_takes_the_tail_by_lookup(llama_engine, greedy, full, exit2):
    state = prefilled(llama_engine)
    lead = ScriptedLookup(greedy[:2] + [wrong(greedy[2]), 7, 7])
    tail = ScriptedLookup([21, 22, 23, 24], name="tail")
    vc = VerticalCascade(lead, full, k_lookup=8, k_self=4)
    hc = HorizontalCascade([full, exit2], tail, ks=[2, 3], k_tail=3)
    tree = new_tree(state)
    VerticalHorizontalCascade(vc, hc).draft(tree, state)
    nodes = chain_of(tree)
    # reviewed lookup (2 kept, the 3rd corrected), no self continuation and no hc stage: then the tail
    assert labels(tree, nodes) == ["pld", "pld", "full", "tail", "tail", "tail"]
    assert tokens(tree, nodes[:3]) == greedy[:3] and tokens(tree, nodes[3:]) == [21, 22, 23]
    assert lead.calls == [(0, 8)] and tail.calls == [(nodes[2], 3)]


def test_vchc_without_a_lookup_match_leads_with_the_hc_stages(llama_engine, greedy, full, exit2):
    state = prefilled(llama_engine)
    tail = ScriptedLookup([21, 22, 23, 24], name="tail")
    vc = VerticalCascade(ScriptedLookup([]), full, k_lookup=8, k_self=4)
    hc = HorizontalCascade([full, exit2], tail, ks=[2, 1], k_tail=2)
    tree = new_tree(state)
    VerticalHorizontalCascade(vc, hc).draft(tree, state)
    nodes = chain_of(tree)
    assert labels(tree, nodes) == ["full", "full", "exit2", "tail", "tail"]
    assert tokens(tree, nodes[:2]) == greedy[:2] and tail.calls == [(nodes[2], 2)]


# -- tree: the self-draft's chain with runner-up siblings, more where its confidence is low -------------------------
def documented_width(conf: float) -> int:
    """cascades.py's table: top-1 probability below 0.5 -> 3 candidates, below 0.8 -> 2, else 1."""
    return 3 if conf < 0.5 else 2 if conf < 0.8 else 1


def spine(tree: DraftTree) -> list[int]:
    """The chain through each node's first (most confident) child."""
    nodes, node = [], 0
    while tree.children[node]:
        node = tree.children[node][0]
        nodes.append(node)
    return nodes


def spine_confidences(tree: DraftTree) -> list[float]:
    return [tree.confidence[n] for n in spine(tree)]


def grow(engine, sched, max_new_tokens: int = 40) -> DraftTree:
    state = prefilled(engine, max_new_tokens=max_new_tokens)
    tree = new_tree(state)
    sched.draft(tree, state)
    return tree


@pytest.fixture(scope="module")
def sharp():
    """The tiny llama with its head scaled up: the same greedy tokens, top-1 probabilities spread over (0, 1)
    (the plain tiny models stay below 0.5, where every level would get three candidates)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return Engine(model, tiny_tokenizer(), name="tiny-sharp", prepare=False, progress=False)


def test_tree_spine_is_the_greedy_chain_with_candidates_sized_by_confidence(sharp):
    greedy = sharp.generate(PROMPT, "ar", max_new_tokens=8, chat=False).token_ids
    tree = grow(sharp, ConfidenceTree(SelfDrafter(sharp.runner, FULL, name="full"), depth=8, min_conf=0.0))
    nodes = spine(tree)
    assert tokens(tree, nodes) == greedy
    widths = [documented_width(tree.confidence[n]) for n in nodes]
    assert set(widths) == {1, 2, 3}  # every row of the table decides somewhere
    for parent, main, width in zip([0] + nodes[:-1], nodes, widths):
        kids = tree.children[parent]
        assert len(kids) == width, (tree.confidence[main], len(kids))
        confs = [tree.confidence[c] for c in kids]
        assert confs == sorted(confs, reverse=True)  # the drafted token first, then the runner-ups, best first
        assert all(not tree.children[c] for c in kids[1:])  # only the drafted token is expanded
    assert len(tree) == 1 + sum(widths)


def test_tree_width_follows_the_confidence_bounds(llama_engine, full):
    """Bounds placed between the observed confidences decide each level's number of candidates."""
    confs = spine_confidences(grow(llama_engine, ConfidenceTree(full, depth=6, min_conf=0.0)))
    assert len(set(confs)) > 1
    sched = ConfidenceTree(full, depth=6, min_conf=0.0)
    sched.WIDTH = ((max(confs), 3), (1.01, 1))  # the most confident level alone gets a single candidate
    tree = grow(llama_engine, sched)
    nodes = spine(tree)
    assert spine_confidences(tree) == pytest.approx(confs)
    assert [len(tree.children[p]) for p in [0] + nodes[:-1]] == [1 if c >= max(confs) else 3 for c in confs]
    sched.WIDTH = ((1.01, 1),)  # one candidate everywhere: a plain chain
    assert len(chain_of(grow(llama_engine, sched))) == 6


def test_tree_stops_below_the_first_unconfident_token_and_at_the_budget(llama_engine, full):
    confs = spine_confidences(grow(llama_engine, ConfidenceTree(full, depth=8, min_conf=0.0)))
    assert len(confs) == 8
    min_conf = sorted(confs)[len(confs) // 2]
    stop = next(i for i, c in enumerate(confs) if c < min_conf)  # the last level drafted
    tree = grow(llama_engine, ConfidenceTree(full, depth=8, min_conf=min_conf))
    assert len(spine(tree)) == stop + 1
    assert len(spine(grow(llama_engine, ConfidenceTree(full, depth=8, min_conf=1.01)))) == 1  # one level only
    assert max(grow(llama_engine, ConfidenceTree(full, depth=8, min_conf=0.0), max_new_tokens=4).depth) == 3


# -- greedy and seeded output stay exactly `ar`'s under non-default cascade configurations -------------------------
CONFIGS = {
    "vc-short": lambda e: VerticalCascade(e.pool.ngram, e.pool.self_levels()[0], k_lookup=3, k_self=1),
    "vc-wrong-lookup": lambda e: VerticalCascade(ScriptedLookup([1, 2, 3, 4, 5, 6]), SelfDrafter(e.runner, FULL, "full")),
    "hc-two-stages": lambda e: HorizontalCascade([e.pool.self_levels()[0], SelfDrafter(e.runner, EarlyExit(2), "exit2")],
                                                 e.pool.ngram, ks=[1, 2], k_tail=3),
    "vchc-small": lambda e: VerticalHorizontalCascade(
        VerticalCascade(e.pool.ngram, e.pool.self_levels()[0], k_lookup=4, k_self=1),
        HorizontalCascade([SelfDrafter(e.runner, EarlyExit(2), "exit2")], NgramDrafter(name="tail"), ks=[2], k_tail=2)),
    "tree-shallow": lambda e: ConfidenceTree(e.pool.self_levels()[0], depth=3, min_conf=0.0),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_cascade_output_equals_autoregressive(engine, config):
    for prompt in PROMPTS:
        for kw in ({}, dict(temperature=0.8, top_p=0.95, seed=5)):  # greedy; coupled sampling with a seed
            ref = engine.generate(prompt, "ar", max_new_tokens=30, chat=False, **kw)
            out = engine.generate(prompt, CONFIGS[config](engine), max_new_tokens=30, chat=False, **kw)
            assert out.token_ids == ref.token_ids, (config, prompt, kw)
            assert sum(s.proposed for s in out.stats.drafters.values()) > 0  # it did draft


def test_horizontal_cascade_needs_one_length_of_at_least_one_per_stage():
    with pytest.raises(ValueError, match="one draft length"):
        HorizontalCascade([], None, ks=[2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one draft length"):
        HorizontalCascade([None, None], None, ks=[2, 0])  # type: ignore[list-item, arg-type]
