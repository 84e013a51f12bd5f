"""Continuous batching: every request of a mixed batch decodes exactly as it would alone."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casspec.batching import BatchEngine, BatchPlanner
from casspec.batching.planner import Candidate, Choice
from casspec.config import SamplingConfig
from casspec.errors import InvalidRequestError
from casspec.scheduler.latency import LatencyModel
from casspec.verify.sampling import logits_to_probs

PROMPTS = ["the cat sat on the mat", "abcabcabc", "one two three one two three one two",
           "a quick brown fox jumps over the lazy dog and", "x"]


def _alone(engine, prompt, method, **kw):
    return engine.generate(prompt, method, **kw).token_ids


def _run(batch: BatchEngine, arrivals: dict[int, list[tuple]]) -> dict[int, list[int]]:
    """Step the batch; at step s submit arrivals[s] = [(key, prompt, method, kwargs)]. Returns key -> tokens."""
    out, keys, step = {}, {}, 0
    while batch.busy or any(s >= step for s in arrivals):
        for key, prompt, method, kw in arrivals.get(step, []):
            keys[id(batch.submit(prompt, method, **kw))] = key
        for gen, chunk in batch.step():
            if chunk.result is not None:
                out[keys[id(gen)]] = chunk.result.token_ids
        step += 1
    return out


def test_mixed_batch_equals_each_request_alone(engine):
    """Different prompts, budgets, methods, greedy and sampled (several settings), arriving at different
    steps: every request produces what `ar` produces for it alone (sampled: for its seed)."""
    settings = [dict(temperature=0.9, top_p=0.95), dict(temperature=1.2, top_k=30), dict(temperature=0.7, min_p=0.1)]
    requests = []
    for i, prompt in enumerate(PROMPTS):
        for j, method in enumerate(("ar", "pld", "self", "casspec")):
            kw = dict(max_new_tokens=8 + 5 * ((i + j) % 4))
            if (i + j) % 2 == 0:
                kw.update(seed=10 * i + j, **settings[(i + j) % 3])
            requests.append((f"{i}-{method}", prompt, method, kw))
    arrivals: dict[int, list[tuple]] = {}
    for n, r in enumerate(requests):
        arrivals.setdefault(n % 5, []).append(r)
    got = _run(BatchEngine(engine, max_batch=6), arrivals)
    for key, prompt, _method, kw in requests:
        assert got[key] == _alone(engine, prompt, "ar", **kw), (key, kw)


def test_sampled_requests_equal_ar_after_cancellations(llama_engine):
    """Cancelling requests mid-batch changes nothing for the seeded requests that go on."""
    batch = BatchEngine(llama_engine, max_batch=4)
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.9)
    victims = [batch.submit(p, "self", max_new_tokens=200, temperature=0.8, seed=9) for p in PROMPTS[3:]]
    keep = [(batch.submit(p, m, seed=s, **kw), p, s) for p, m, s in  # two wait until a victim leaves
            zip(PROMPTS, ("casspec", "self", "pld", "casspec"), (1, 2, 3, 4))]
    results = {}
    for step in range(200):
        if step in (2, 4):
            victims[step // 2 - 1].cancel.set()
        for gen, chunk in batch.step():
            if chunk.result is not None:
                results[id(gen)] = chunk.result
        if not batch.busy:
            break
    assert all(results[id(v)].stats.finish_reason == "cancelled" for v in victims)
    for gen, prompt, seed in keep:
        assert results[id(gen)].token_ids == _alone(llama_engine, prompt, "ar", seed=seed, **kw)


def test_sampling_in_a_batch_follows_the_target_distribution(llama_engine):
    cfg = SamplingConfig(temperature=1.5, top_k=6)
    ids = torch.tensor(llama_engine.encode_prompt("abcabcabc"))
    with torch.no_grad():
        want = logits_to_probs(llama_engine.hf_model(ids[None]).logits[0, -1], cfg)
    n = 400
    for method in ("self", "casspec"):
        batch = BatchEngine(llama_engine, max_batch=8)
        arrivals = {0: [(s, "abcabcabc", method, dict(max_new_tokens=3, temperature=1.5, top_k=6, seed=s))
                        for s in range(n)]}
        got = _run(batch, arrivals)
        counts = torch.zeros_like(want)
        for tokens in got.values():
            counts[tokens[0]] += 1
        tv = 0.5 * float((counts / n - want).abs().sum())
        assert tv < 2.0 * math.sqrt(6 / n), (method, tv)


def test_cancelled_request_frees_its_slots_and_others_go_on(llama_engine):
    batch = BatchEngine(llama_engine, max_batch=4)
    keep = [batch.submit(p, "casspec", max_new_tokens=24) for p in PROMPTS[:3]]
    victim = batch.submit(PROMPTS[3], "self", max_new_tokens=200)
    results = {}
    for step in range(100):
        if step == 3:
            victim.cancel.set()
        for gen, chunk in batch.step():
            if chunk.result is not None:
                results[id(gen)] = chunk.result
        if not batch.busy:
            break
    assert results[id(victim)].stats.finish_reason == "cancelled"
    assert victim.state.cache.released and batch.kv.used == 0
    for gen, prompt in zip(keep, PROMPTS):
        assert results[id(gen)].token_ids == _alone(llama_engine, prompt, "ar", max_new_tokens=24)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 12), st.booleans(), st.integers(0, 6)),
                min_size=1, max_size=10))
def test_pool_never_leaks_slots(llama_engine, events):
    """Random arrivals (step, budget, cancel?, cancel step) in a small pool: regions never overlap, all return."""
    batch = BatchEngine(llama_engine, max_batch=3, pool_tokens=1200)
    pending = sorted(events)
    gens, step = [], 0
    while pending or batch.busy:
        while pending and pending[0][0] <= step:
            _, budget, cancel, when = pending.pop(0)
            gens.append((batch.submit(PROMPTS[len(gens) % len(PROMPTS)], "casspec", max_new_tokens=budget),
                         cancel, step + when))
        for g, cancel, when in gens:
            if cancel and step >= when:
                g.cancel.set()
        batch.step()
        regions = batch.kv.regions()
        assert all(a + n <= b for (a, n), (b, _) in zip(regions, regions[1:]))
        assert batch.kv.used == sum(g.state.cache.capacity for g in batch.running)
        step += 1
    assert batch.kv.used == 0 and all(g.finished for g, _, _ in gens)


def test_bad_requests_are_refused_at_submit_and_change_nothing(llama_engine):
    batch = BatchEngine(llama_engine, max_batch=2, pool_tokens=400)
    for prompt, method, kw in [("", "casspec", {}), ("hi", "vchc", {}), ("hi", "casspec", {"temperature": -1}),
                               ("hi", "casspec", {"max_new_tokens": 10_000}), ("hi", "ar", {"logprobs": 99})]:
        with pytest.raises((InvalidRequestError, ValueError)):
            batch.submit(prompt, method, **kw)
    assert not batch.busy and batch.kv.used == 0
    assert batch.generate(["hi"], "ar", max_new_tokens=4)[0].token_ids == _alone(llama_engine, "hi", "ar",
                                                                                 max_new_tokens=4)


def test_logprobs_equal_the_hf_models_log_softmax(llama_engine):
    prompt = "the cat sat on the mat"
    for method in ("ar", "casspec"):
        res = llama_engine.generate(prompt, method, max_new_tokens=12, logprobs=3)
        batched = llama_engine.generate_batch([prompt, "abc"], method, max_new_tokens=12, logprobs=3)[0]
        ids = llama_engine.encode_prompt(prompt) + res.token_ids
        with torch.no_grad():
            lp = torch.log_softmax(llama_engine.hf_model(torch.tensor([ids])).logits[0].float(), -1)
        n = len(llama_engine.encode_prompt(prompt))
        want = [float(lp[n - 1 + j, t]) for j, t in enumerate(res.token_ids)]
        for out in (res, batched):
            assert [t.token for t in out.logprobs] == res.token_ids
            assert [t.logprob for t in out.logprobs] == pytest.approx(want, abs=1e-4)
            assert all(len(t.top) == 3 and t.top[0][1] >= t.logprob - 1e-5 for t in out.logprobs)


def _latency(verify_ms: dict[int, float], draft_ms: dict[int, float]) -> LatencyModel:
    lat = LatencyModel()
    for plan, table in (("full", verify_ms), ("int8", draft_ms)):
        for n, ms in table.items():
            for ctx in (64, 512):
                lat.observe(plan, n, ctx, ms / 1e3)
    return lat


def test_planner_drafts_long_under_light_load_and_nothing_when_rows_cost_full_price():
    rows = range(1, 65)
    flat = _latency({n: 20 + 0.2 * n for n in rows}, {n: 6 + 0.1 * n for n in rows})  # memory-bound: rows ~free
    steep = _latency({n: 20 * n for n in rows}, {n: 6 * n for n in rows})  # compute-bound: each row costs a step
    cands = [Candidate({"int8": 0.9, "pld": 0.5}, {"int8": 8, "pld": 3}) for _ in range(4)]
    light = BatchPlanner(flat, "int8").plan(cands, 200)
    assert all(c.source == "int8" and c.k >= 4 for c in light)
    assert BatchPlanner(steep, "int8").plan(cands, 200) == [Choice()] * 4
    fixed = [Candidate({}, {}, Choice("int8", 8)), Candidate({"int8": 0.9}, {"int8": 8})]
    assert BatchPlanner(steep, "int8").plan(fixed, 200)[0] == Choice("int8", 8)


def test_planner_terminates_when_the_latency_fit_is_not_monotone():
    """A prompt chunk bigger than the decode rows with t(rows) < t(chunk) once hung the planner."""
    bumpy = _latency({n: (30 if n == 64 else 20) + 0.1 * n for n in range(1, 80)}, {n: 6.0 for n in range(1, 80)})
    fixed = [Candidate({}, {}, Choice()) for _ in range(4)]
    assert BatchPlanner(bumpy, "int8").plan(fixed, 100, extra_rows=64) == [Choice()] * 4
    free = [Candidate({"int8": 0.9}, {"int8": 8}) for _ in range(4)]
    assert len(BatchPlanner(bumpy, "int8").plan(free, 100, extra_rows=64)) == 4
