"""Speculative sampling through the whole engine: target distribution, reproducible seeds, and under the
coupled rule the same tokens as `ar` for a seed, for every method."""
from __future__ import annotations

import math

import pytest
import torch

from casspec.config import SamplingConfig
from casspec.methods import METHODS
from casspec.verify.sampling import logits_to_probs

PROMPT = "abcabcabc"
N = 600
LOOKUP_PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat"
SETTINGS = [dict(temperature=0.9, top_p=0.95), dict(temperature=1.0), dict(temperature=0.7, top_k=20, min_p=0.05),
            dict(temperature=1.3, top_p=0.8, top_k=100)]


def _target_next_token_probs(engine, cfg):
    ids = torch.tensor(engine.encode_prompt(PROMPT))
    with torch.no_grad():
        return logits_to_probs(engine.hf_model(ids[None]).logits[0, -1], cfg)


@pytest.mark.parametrize("rule", ["gumbel", "rejection"])
def test_speculative_sampling_matches_target_next_token_distribution(llama_engine, rule):
    cfg = SamplingConfig(temperature=1.5, top_k=6)
    want = _target_next_token_probs(llama_engine, cfg)
    from casspec.scheduler.dytc import DyTCConfig
    from test_dytc import make_dytc

    # fixed costs: timings on a random model (drafts that never pay) would leave DyTC drafting nothing to verify
    for method in ("ar", "vc", make_dytc(llama_engine, DyTCConfig(use_latency=False))):
        counts, accepted = torch.zeros_like(want), 0
        for seed in range(N):
            out = llama_engine.generate(PROMPT, method, max_new_tokens=3, temperature=1.5, top_k=6, seed=seed,
                                        sampling_rule=rule)
            counts[out.token_ids[0]] += 1
            accepted += sum(s.accepted for s in out.stats.drafters.values())
        tv = 0.5 * float((counts / N - want).abs().sum())
        assert tv < 2.0 * math.sqrt(6 / N), (method, tv)
        if method != "ar":
            assert accepted >= 5  # drafts were really verified and some accepted


@pytest.mark.parametrize("kw", SETTINGS)
def test_every_method_samples_what_ar_samples_for_a_seed(engine, kw):
    """Coupled sampling (the default rule): the tree, the drafter and the method change nothing."""
    accepted = 0
    for seed in (3, 12345):
        ref = engine.generate(LOOKUP_PROMPT, "ar", max_new_tokens=32, seed=seed, **kw).token_ids
        for method in METHODS:
            out = engine.generate(LOOKUP_PROMPT, method, max_new_tokens=32, seed=seed, **kw)
            assert out.token_ids == ref, (method, seed)
            accepted += sum(s.accepted for s in out.stats.drafters.values())
    assert accepted > 0  # drafts were verified and kept, not all rejected


def test_seeded_runs_reproduce_and_seeds_differ(llama_engine):
    """Same seed -> same output for every method, adaptive casspec included (its tree changes with live
    timings, its output does not). Under the rejection rule, the same drafting decisions reproduce."""
    from casspec.scheduler.dytc import DyTCConfig
    from test_dytc import make_dytc

    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.9)
    for method in ("ar", "vc", "tree", "casspec"):
        a = llama_engine.generate(PROMPT, method, seed=7, **kw).token_ids
        assert llama_engine.generate(PROMPT, method, seed=7, **kw).token_ids == a
    frozen = DyTCConfig(use_latency=False, use_ema=False)
    rej = dict(kw, sampling_rule="rejection")
    a = llama_engine.generate(PROMPT, make_dytc(llama_engine, frozen), seed=7, **rej).token_ids
    assert llama_engine.generate(PROMPT, make_dytc(llama_engine, frozen), seed=7, **rej).token_ids == a
    for method in ("ar", "vc"):
        others = {tuple(llama_engine.generate(PROMPT, method, seed=s, **kw).token_ids) for s in range(4)}
        assert len(others) > 1


def test_unseeded_requests_still_sample(llama_engine):
    """Without a seed each request draws its own: outputs differ between calls."""
    outs = {tuple(llama_engine.generate(PROMPT, "casspec", max_new_tokens=12, temperature=1.0).token_ids)
            for _ in range(4)}
    assert len(outs) > 1
