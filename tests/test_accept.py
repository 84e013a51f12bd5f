"""Acceptance rules: greedy walks and the exactness of recursive rejection sampling."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import casspec.verify.accept as acc
import casspec.verify.sampling as sampling
from casspec.config import SamplingConfig
from casspec.tree import DraftTree

V = 6


def _logits(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_follows_argmax_and_appends_bonus():
    t = DraftTree(0, 0)
    a = t.add(0, 2, "d", 1, 1)
    t.add(0, 3, "d", 1, 1)
    t.add(a, 4, "d", 1, 1)
    logits = torch.full((4, V), -1.0)
    logits[0, 2] = logits[1, 5] = 1.0  # root -> 2 (accepted), node 1 -> 5 (its child 4 rejected)
    r = acc.accept(t, logits, SamplingConfig())
    assert r.path == [0, 1] and r.tokens == [2, 5]


def test_greedy_with_no_children_is_plain_decoding():
    t = DraftTree(0, 0)
    r = acc.accept(t, _logits([[0, 0, 3, 0, 0, 0]]), SamplingConfig())
    assert r.path == [0] and r.tokens == [2]


def _sampling_tree(q_child: torch.Tensor, g: torch.Generator) -> DraftTree:
    """Root with a sampled child (from q), a one-hot child, and a grandchild under the sampled child."""
    t = DraftTree(0, 0)
    x = int(torch.multinomial(q_child, 1, generator=g))
    c = t.add(0, x, "q", float(q_child[x]), 1.0, q=q_child)
    t.add(0, 1, "pld", 1.0, 1.0)
    t.add(c, 3, "pld", 1.0, 1.0)
    return t


def _first_two(rule, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    p_root = torch.tensor([0.05, 0.3, 0.1, 0.35, 0.15, 0.05])
    q = torch.tensor([0.3, 0.05, 0.3, 0.1, 0.05, 0.2])
    cfg = SamplingConfig(temperature=1.0)
    firsts, seconds = torch.zeros(V), torch.zeros(V)
    for _ in range(n):
        t = _sampling_tree(q, g)
        logits = torch.log(torch.stack([p_root, *[p_root.roll(i + 1) for i in range(len(t) - 1)]]))
        r = rule(t, logits, cfg, g)
        firsts[r.tokens[0]] += 1
        if len(r.path) > 1 and t.drafter[r.path[1]] == "q":  # second token from the sampled child's distribution
            seconds[r.tokens[1]] += 1
    return firsts / n, p_root, seconds / max(seconds.sum(), 1), p_root.roll(1)


def _tv(a, b):
    return 0.5 * float((a - b).abs().sum())


def _tolerance(n):
    return 3.0 * math.sqrt(V / n)  # shrinks as 1/sqrt(samples)


@pytest.mark.parametrize("n", [2000, 8000])
def test_rejection_sampling_reproduces_target_distribution(n):
    got, want, got2, want2 = _first_two(acc._accept_sampling, n)
    assert _tv(got, want) < _tolerance(n) * 0.5
    assert _tv(got2, want2) < _tolerance(n)


def test_a_broken_acceptance_rule_is_detected():
    def always_accept_first_child(t, logits, cfg, g):
        c = t.children[0][0]
        return acc.AcceptResult([0, c], [t.tokens[c], 0])

    got, want, _, _ = _first_two(always_accept_first_child, 8000)
    assert _tv(got, want) > _tolerance(8000) * 0.5


def test_residual_of_one_hot_removes_the_token():
    p = torch.tensor([0.5, 0.25, 0.25])
    torch.testing.assert_close(acc._residual(p, None, 0), torch.tensor([0.0, 0.5, 0.5]))


def test_coupled_acceptance_commits_the_targets_own_samples():
    """Rule "gumbel": along the accepted path each committed token is the target's coupled sample at that
    node's position, whatever was drafted; a draft equal to it is kept."""
    from casspec.verify.coupling import coupled_tokens

    cfg = SamplingConfig(temperature=1.0, seed=3)
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        logits = torch.randn(5, V, generator=g)
        base = 10 + trial
        first = coupled_tokens(logits[:1], cfg, [base + 1])[0]
        t = DraftTree(0, base)
        a = t.add(0, first, "d", 1, 1)  # the right token: kept
        t.add(0, (first + 1) % V, "d", 1, 1)  # a wrong sibling
        second = coupled_tokens(logits[1:2], cfg, [base + 2])[0]
        t.add(a, (second + 1) % V, "d", 1, 1)  # a wrong grandchild: the bonus token replaces it
        r = acc.accept(t, logits[:len(t)], cfg)
        assert r.path == [0, a] and r.tokens == [first, second]


@pytest.mark.parametrize("cfg", [SamplingConfig(), SamplingConfig(temperature=0.8, seed=1),
                                 SamplingConfig(temperature=0.8, seed=1, rule="rejection")],
                         ids=["greedy", "coupled", "rejection"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, "all -inf"])
@pytest.mark.parametrize("row", [0, 1])
def test_a_row_with_nan_or_inf_or_nothing_finite_is_refused_in_every_rule(cfg, bad, row):
    from casspec.errors import NonFiniteLogitsError
    from casspec.verify.coupling import coupled_tokens

    logits = torch.randn(2, 300)
    tree = DraftTree(0, 0, 8)  # the child is the root's coupled sample, so the walk samples its row too
    tree.add(0, coupled_tokens(logits[:1], cfg, [1])[0] if cfg.is_coupled else 3, "d", 1.0, 0.9)
    if bad == "all -inf":
        logits[row] = -math.inf
    else:
        logits[row, 17] = bad
    with pytest.raises(NonFiniteLogitsError):
        acc.accept(tree, logits, cfg, torch.Generator().manual_seed(0))
    logits[row] = torch.randn(300)
    logits[row, 5] = -math.inf  # -inf beside finite values is a masked token, not a fault
    acc.accept(tree, logits, cfg, torch.Generator().manual_seed(0))


def test_coupled_acceptance_reads_only_the_rows_it_samples():
    """Under the coupling the output is `ar`'s for the seed: a NaN in a node's row the walk never samples (a
    wrong draft's child) changes nothing and raises nothing."""
    from casspec.verify.coupling import coupled_tokens

    cfg = SamplingConfig(temperature=0.8, seed=1)
    logits = torch.randn(3, 300)
    first = coupled_tokens(logits[:1], cfg, [1])[0]
    tree = DraftTree(0, 0, 8)
    wrong = tree.add(0, (first + 1) % 300, "d", 1.0, 0.9)
    tree.add(wrong, 7, "d", 1.0, 0.8)
    expected = acc.accept(tree, logits, cfg)
    logits[1:] = math.nan
    assert acc.accept(tree, logits, cfg) == expected and expected.tokens == [first]
    logits[1] = torch.randn(300)
    logits[1, 5] = -math.inf  # -inf beside finite values is a masked token, not a fault
    acc.accept(tree, logits, cfg, torch.Generator().manual_seed(0))


@given(st.integers(1, 4), st.integers(8, 20), st.integers(0, 2 ** 31 - 1), st.sampled_from([0.0, 0.01, 0.3]))
@settings(max_examples=60, deadline=None)
def test_first_argmax_is_torchs_argmax_ties_nan_and_inf_included(rows, blocks, seed, special):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (rows, blocks * sampling.BLOCK), generator=g).float()  # many ties
    mask = torch.rand(x.shape, generator=g) < special
    x[mask] = torch.tensor([math.nan, math.inf, -math.inf])[torch.randint(0, 3, (int(mask.sum()),), generator=g)]
    assert torch.equal(sampling.first_argmax(x), x.argmax(-1))
