"""StaticKVCache: truncate/commit round trips equal a cache built token by token."""
from __future__ import annotations

import pytest
import torch

from casspec.runtime.kv_cache import StaticKVCache


def _write(cache: StaticKVCache, slots: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Write random k, v [H_kv, len(slots), D] at `slots` of every layer, as the runner's rope_kv does."""
    torch.manual_seed(seed)
    k, v = torch.randn(2, len(slots), 4), torch.randn(2, len(slots), 4)
    idx = torch.tensor(slots)
    cache.check_slots(idx)
    for layer in range(len(cache.keys)):
        cache.keys[layer].index_copy_(1, idx, k)
        cache.values[layer].index_copy_(1, idx, v)
    return k, v


def test_check_slots_returns_keys_visible_through_last_slot():
    c = StaticKVCache(2, 2, 4, capacity=16)
    assert c.check_slots(torch.tensor([3, 1, 7])) == 8


def test_commit_non_contiguous_path_equals_sequential_cache():
    tree = StaticKVCache(2, 2, 4, capacity=16)
    _write(tree, [0, 1], 0)
    tree.length = 2
    kt, vt = _write(tree, [2, 3, 4, 5, 6], 1)  # five tree nodes; accept nodes at offsets 0, 2, 4
    tree.commit([2, 4, 6])
    seq = StaticKVCache(2, 2, 4, capacity=16)
    _write(seq, [0, 1], 0)
    for layer in range(2):
        seq.keys[layer][:, 2:5] = kt[:, [0, 2, 4]]
        seq.values[layer][:, 2:5] = vt[:, [0, 2, 4]]
    assert tree.length == 5
    for layer in range(2):
        assert torch.equal(tree.keys[layer][:, :5], seq.keys[layer][:, :5])
        assert torch.equal(tree.values[layer][:, :5], seq.values[layer][:, :5])


def test_truncate_is_a_length_reset_and_rewrite_overwrites():
    c = StaticKVCache(2, 2, 4, capacity=8)
    _write(c, [0, 1, 2, 3], 0)
    c.length = 4
    c.truncate(2)
    assert c.length == 2
    k, _ = _write(c, [2], 5)
    assert torch.equal(c.keys[1][:, 2:3], k)


@pytest.mark.parametrize("slots", [[3, 4], [-1, 0]])
def test_out_of_range_slots_raise(slots):
    c = StaticKVCache(1, 1, 4, capacity=4)
    with pytest.raises(RuntimeError, match="overflow"):
        c.check_slots(torch.tensor(slots))


def test_single_stream_generations_reuse_one_pool_and_match_fresh_output():
    """A generation's KV region returns to the runner's pool when it ends; the next one reuses it, stale
    slots included, with the output a fresh engine gives; live generations share it while it has room, and one that
    finds too little gets a private cache."""
    from casspec.testing import tiny_engine

    engine, fresh = tiny_engine(), tiny_engine()
    engine.prefix_cache = fresh.prefix_cache = None  # every prompt token is computed, none copied
    long, short = "the cat sat on the mat and then", "a dog"
    engine.generate(long, method="casspec", max_new_tokens=40)  # fills the pool with its KV
    pool = engine.runner._stream_pool
    assert pool is not None and pool.used == 0  # region freed at the end
    for method in ("ar", "casspec"):
        assert engine.generate(short, method=method, max_new_tokens=12).token_ids == \
            fresh.generate(short, method=method, max_new_tokens=12).token_ids
    assert engine.runner._stream_pool is pool and pool.used == 0
    live = engine.start(short, "ar", max_new_tokens=4)
    assert live.state.cache.pool is pool and pool.used > 0
    both = engine.start(short, "ar", max_new_tokens=4)  # room left: a region of its own in the same pool
    assert both.state.cache.pool is pool and both.state.cache.base != live.state.cache.base
    fits = pool.capacity - engine.cache_size(len(engine.encode_prompt(short)), 1)  # new tokens of a full-pool request
    other = engine.start(short, "ar", max_new_tokens=fits)  # it would fit the pool, not the room left: private
    assert other.state.cache.pool is not pool and engine.runner._stream_pool is pool
    assert engine.generate(short, method="ar", max_new_tokens=12).token_ids == \
        fresh.generate(short, method="ar", max_new_tokens=12).token_ids


@pytest.mark.parametrize("method", ["ar", "casspec"])
def test_interleaved_single_stream_generations_in_one_pool_match_their_outputs_alone(method):
    """Two generations stepped in turn hold regions of the same pool (the second at a non-zero base); each
    produces what it produces alone."""
    from casspec.testing import tiny_engine

    engine, fresh = tiny_engine(), tiny_engine()
    engine.prefix_cache = fresh.prefix_cache = None
    prompts = ["the cat sat on the mat and then the cat", "a dog ran"]
    alone = [fresh.generate(p, method=method, max_new_tokens=24).token_ids for p in prompts]
    streams = [engine.iter_generate(p, method, max_new_tokens=24) for p in prompts]
    ids: list[list[int]] = [[], []]
    live, shared = [True, True], 0
    while any(live):
        for i, s in enumerate(streams):
            if live[i]:
                chunk = next(s, None)
                live[i] = chunk is not None
                if chunk is not None:
                    ids[i] += chunk.token_ids
        pool = engine.runner._stream_pool
        shared = max(shared, len(pool.regions()) if pool is not None else 0)
    assert ids == alone and shared == 2
    assert engine.runner._stream_pool is not None and engine.runner._stream_pool.used == 0
