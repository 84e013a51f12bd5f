"""Prefix cache: the trie and its refcounts on synthetic KV, then cache hit == miss on tiny engines.

a) Synthetic: the KV of token i is a function of tokens [0, i] (as a model's is), so a restored region must
   hold exactly the values a fresh computation writes; random arrivals, finishes, cancellations and
   evictions never evict a pinned block, never leak one, and leave every refcount at zero.
b) Engines: a conversation's later turns reuse the earlier turns' KV and produce the same tokens as
   without the cache (greedy, every method; seeded coupled sampling of the fixed methods), single-stream
   and batched.
"""
from __future__ import annotations

import random
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casspec.batching import BatchEngine
from casspec.runtime.kv_cache import KVPool
from casspec.runtime.prefix_cache import PrefixCache

LAYERS, HEADS, DIM = 2, 2, 3


def _kv(tokens: list[int], i: int) -> float:
    """The synthetic 'KV' of position i: a function of tokens[:i + 1] only."""
    return float(zlib.crc32(bytes(str(tokens[:i + 1]), "ascii")) % 100003)


def _compute(cache, tokens: list[int], start: int, end: int) -> None:
    """Write positions [start, end) of `tokens` into the cache, as a prefill would."""
    for layer in range(LAYERS):
        for i in range(start, end):
            cache.keys[layer][:, cache.base + i] = _kv(tokens, i)
            cache.values[layer][:, cache.base + i] = -_kv(tokens, i)
    cache.length = max(cache.length, end)


def _assert_region(cache, tokens: list[int], n: int) -> None:
    for layer in range(LAYERS):
        want = torch.tensor([_kv(tokens, i) for i in range(n)])
        assert torch.equal(cache.keys[layer][0, cache.base:cache.base + n, 0], want)
        assert torch.equal(cache.values[layer][1, cache.base:cache.base + n, 2], -want)


def _pc(max_tokens: int, block: int = 4) -> PrefixCache:
    return PrefixCache(LAYERS, HEADS, DIM, max_tokens, block)


def test_restore_copies_the_longest_prefix_down_to_one_token():
    pool, pc = KVPool(LAYERS, HEADS, DIM, 128), _pc(64)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    c = pool.alloc(20)
    _compute(c, a, 0, 10)
    assert pc.insert(a, c) == 10  # two full blocks and a tail of 2
    pool.free(c)
    pc.check()
    # b) shares 6 tokens (one full block, two of the next): the lookup ends inside a block
    b = [1, 2, 3, 4, 5, 6, 0, 0, 0]
    d = pool.alloc(20)
    pin = pc.restore(b, d)
    assert d.length == 6 and [n.ref for n in pin] == [1, 1]
    _assert_region(d, b, 6)
    pc.release(pin)
    # c) the whole cached sequence and more: all but the last prompt token is reused at most
    e = pool.alloc(20)
    pc.release(pc.restore(a + [11], e))
    assert e.length == 10
    f = pool.alloc(20)
    pc.release(pc.restore(a, f))
    assert f.length == 9  # tokens[-1] is the first tree root: never taken from the cache
    assert all(n.ref == 0 for n in pc._nodes)


def test_a_longer_sequence_replaces_its_partial_tail_block():
    pool, pc = KVPool(LAYERS, HEADS, DIM, 64), _pc(64)
    a = [1, 2, 3, 4, 5, 6]
    c = pool.alloc(16)
    _compute(c, a, 0, 6)
    pc.insert(a, c)
    assert pc.stats()["blocks"] == 2
    b = a + [7, 8, 9]
    _compute(c, b, 6, 9)
    assert pc.insert(b, c) == 5  # the block [5, 6] gives way to [5, 6, 7, 8], and [9] follows
    assert pc.stats()["blocks"] == 3 and pc.stats()["tokens"] == 9
    pc.check()
    assert pc.insert(b[:7], c) == 0  # a prefix of what is cached adds nothing


def test_pinned_blocks_survive_any_pressure_and_lru_goes_first():
    pool, pc = KVPool(LAYERS, HEADS, DIM, 256), _pc(16)  # four blocks of four
    shared = [9, 9, 9, 9, 8, 8, 8, 8]
    c = pool.alloc(32)
    _compute(c, shared + [1], 0, 9)
    pc.insert(shared + [1], c)  # blocks: shared[0:4], shared[4:8], [1]
    d = pool.alloc(32)
    pin = pc.restore(shared + [5, 5], d)  # a running request holds the shared blocks
    assert d.length == 8
    for k in range(10):  # other prompts fill the store again and again
        other = [k + 20] * 8
        c2 = pool.alloc(16)
        _compute(c2, other, 0, 8)
        pc.insert(other, c2)
        pool.free(c2)
        pc.check()
        assert pc.match(shared)[1][:2] == [4, 4]
    assert pc.counters["evicted_blocks"] > 0
    pc.release(pin)
    newest = [29] * 8
    assert sum(pc.match(newest)[1]) == 8  # the latest insert is still there
    pc.clear()
    assert pc.stats()["blocks"] == 0 and pc.used_blocks == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_traffic_keeps_kv_exact_and_refcounts_balanced(data):
    """Arrivals restore, finishes insert and release, cancellations release; the store is tiny, so blocks
    are evicted all the time. A restored region always equals what computing the prompt writes."""
    block = data.draw(st.sampled_from([1, 2, 4]))
    pool, pc = KVPool(LAYERS, HEADS, DIM, 4096), _pc(data.draw(st.integers(0, 24)), block)
    stems = [[1, 2, 3, 4, 5, 6], [1, 2, 7, 7], [3]]
    running: list[tuple] = []
    for _ in range(data.draw(st.integers(1, 25))):
        op = data.draw(st.sampled_from(["arrive", "arrive", "finish", "cancel"]))
        if op == "arrive" or not running:
            tokens = data.draw(st.sampled_from(stems)) + data.draw(st.lists(st.integers(0, 3), max_size=7))
            cache = pool.alloc(len(tokens) + 4)
            pin = pc.restore(tokens, cache)
            n = cache.length
            assert n <= len(tokens) - 1
            _assert_region(cache, tokens, n)
            assert all(node.ref > 0 for node in pin or [])
            _compute(cache, tokens, n, len(tokens) - 1)
            running.append((tokens, cache, pin))
        else:
            tokens, cache, pin = running.pop(data.draw(st.integers(0, len(running) - 1)))
            if op == "finish":
                pc.insert(tokens, cache)
            pc.release(pin)
            pool.free(cache)
        pc.check()
        pinned = {id(node) for _, _, pin in running for node in pin or []}
        assert pinned <= {id(node) for node in pc._nodes}  # a running request's blocks are never evicted
    for _, cache, pin in running:
        pc.release(pin)
        pool.free(cache)
    assert all(node.ref == 0 for node in pc._nodes)
    assert pool.used == 0
    pc.clear()
    assert pc.used_blocks == 0
    pc.check()


# ---- engines ----------------------------------------------------------------------------------------------

def _turns(engine, rng: random.Random, n: int) -> list[list[int]]:
    """User turns as token ids (byte tokens of random words)."""
    words = ["alpha", "beta", "cache", "delta", "the", "of", "KV", "prefix", "turn", "again"]
    return [engine.encode_prompt(" ".join(rng.choice(words) for _ in range(rng.randint(2, 12))) + ".")
            for _ in range(n)]


def _conversation(engine, turns: list[list[int]], cached: bool, **kw) -> list[tuple[list[int], int]]:
    """Each turn's prompt is the conversation so far; returns (output ids, cached prompt tokens) per turn."""
    ids: list[int] = []
    out = []
    for t in turns:
        if not cached:
            engine.prefix_cache.clear()
        ids = ids + t
        r = engine.generate(ids, **kw)
        out.append((r.token_ids, r.stats.cached_tokens))
        ids = ids + r.token_ids
    return out


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000))
def test_conversation_hit_equals_miss_greedy_every_method(engine, seed):
    rng = random.Random(seed)
    turns = _turns(engine, rng, 3)
    for method in engine.methods:
        kw = dict(method=method, max_new_tokens=rng.randint(3, 12))
        engine.prefix_cache.clear()
        miss = _conversation(engine, turns, False, **kw)
        engine.prefix_cache.clear()
        hit = _conversation(engine, turns, True, **kw)
        assert [t for t, _ in hit] == [t for t, _ in miss], method
        assert all(c == 0 for _, c in miss)
        prompt = 0
        for i, ((out, cached), t) in enumerate(zip(hit, turns)):
            if i:  # every earlier token is reused, but the last one generated when its KV was never computed
                assert prompt - 1 <= cached <= prompt, (method, i)  # (it was when a step accepted past EOS)
            prompt += len(t) + len(out)
        engine.prefix_cache.check()
        assert all(n.ref == 0 for n in engine.prefix_cache._nodes)


@pytest.mark.parametrize("method", ["ar", "pld", "self", "casspec"])
def test_conversation_hit_equals_miss_seeded_coupled_sampling(llama_engine, method):
    rng = random.Random(7)
    turns = _turns(llama_engine, rng, 3)
    kw = dict(method=method, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=11)
    llama_engine.prefix_cache.clear()
    miss = _conversation(llama_engine, turns, False, **kw)
    hit = _conversation(llama_engine, turns, True, **kw)
    assert [t for t, _ in hit] == [t for t, _ in miss]
    assert hit[-1][1] > 0


def test_batched_requests_share_a_system_prompt_and_match_unbatched(llama_engine):
    """Requests arriving together with one system prompt: the first computes it, the others copy it."""
    e = llama_engine
    system = e.encode_prompt("You are a careful assistant. Answer briefly and exactly. " * 3)
    prompts = [system + e.encode_prompt(f" Question {i}: what is {i} + {i}?") for i in range(5)]
    e.prefix_cache.clear()
    want = []
    for p in prompts:
        e.prefix_cache.clear()
        want.append(e.generate(p, "ar", max_new_tokens=8).token_ids)
    e.prefix_cache.clear()
    batch = BatchEngine(e, max_batch=4, pool_tokens=4096)
    results = batch.generate(prompts, "casspec", max_new_tokens=8)
    assert [r.token_ids for r in results] == want
    assert results[0].stats.cached_tokens == 0
    assert all(r.stats.cached_tokens >= len(system) - 16 for r in results[1:])
    assert batch.kv.used == 0 and all(n.ref == 0 for n in e.prefix_cache._nodes)
    e.prefix_cache.check()


def test_batch_with_cancellations_and_a_tiny_store_never_leaks(llama_engine):
    e = llama_engine
    saved = e.prefix_cache
    e.prefix_cache = PrefixCache.for_runner(e.runner, max_tokens=64, block=8)  # constant eviction
    try:
        rng = random.Random(3)
        stems = [e.encode_prompt("Shared start of a prompt, "), e.encode_prompt("Another one: ")]
        batch = BatchEngine(e, max_batch=3, pool_tokens=4096)
        gens = []
        for _ in range(40):
            if rng.random() < 0.4 and len(gens) < 12:
                ids = rng.choice(stems) + e.encode_prompt(f"item {rng.randint(0, 5)}")
                gens.append(batch.submit(ids, "casspec", max_new_tokens=rng.randint(1, 10)))
            if gens and rng.random() < 0.15:
                rng.choice(gens).cancel.set()
            batch.step()
            e.prefix_cache.check()
        while batch.busy:
            batch.step()
        assert batch.kv.used == 0
        assert all(n.ref == 0 for n in e.prefix_cache._nodes)
        assert e.prefix_cache.stats()["hits"] > 0
    finally:
        e.prefix_cache = saved


def test_cancelled_stream_releases_its_pin(llama_engine):
    e = llama_engine
    ids = e.encode_prompt("A prompt that will be cut short by the client going away.")
    e.prefix_cache.clear()
    e.generate(ids, "ar", max_new_tokens=4)
    it = e.iter_generate(ids + [32, 33], "casspec", max_new_tokens=50)
    next(it)
    assert any(n.ref for n in e.prefix_cache._nodes)
    it.close()
    assert all(n.ref == 0 for n in e.prefix_cache._nodes)
    e.prefix_cache.check()
