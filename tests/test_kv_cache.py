"""StaticKVCache: truncate/commit round trips equal a cache built token by token."""
from __future__ import annotations

import torch

from casspec.target.kv_cache import StaticKVCache


def _write(cache, slots, seed):
    torch.manual_seed(seed)
    k = torch.randn(1, 2, len(slots), 4)
    v = torch.randn(1, 2, len(slots), 4)
    cache.set_write_slots(torch.tensor(slots))
    for layer in range(2):
        cache.update(k, v, layer)
    return k, v


def test_update_returns_prefix_through_last_slot():
    c = StaticKVCache(2, 2, 4, capacity=16)
    k, _ = _write(c, [0, 1, 2], 0)
    keys, _ = c.update(k, k, 0)
    assert keys.shape == (1, 2, 3, 4)


def test_commit_non_contiguous_path_equals_sequential_cache():
    tree = StaticKVCache(2, 2, 4, capacity=16)
    k0, v0 = _write(tree, [0, 1], 0)
    tree.length = 2
    kt, vt = _write(tree, [2, 3, 4, 5, 6], 1)  # five tree nodes; accept nodes at offsets 0, 2, 4
    tree.commit([2, 4, 6])
    seq = StaticKVCache(2, 2, 4, capacity=16)
    _write(seq, [0, 1], 0)
    seq.set_write_slots(torch.tensor([2, 3, 4]))
    for layer in range(2):
        seq.update(kt[:, :, [0, 2, 4]], vt[:, :, [0, 2, 4]], layer)
    assert tree.length == 5
    for layer in range(2):
        assert torch.equal(tree.keys[layer][:, :, :5], seq.keys[layer][:, :, :5])
        assert torch.equal(tree.values[layer][:, :, :5], seq.values[layer][:, :, :5])


def test_truncate_is_a_length_reset_and_rewrite_overwrites():
    c = StaticKVCache(2, 2, 4, capacity=8)
    _write(c, [0, 1, 2, 3], 0)
    c.length = 4
    c.truncate(2)
    assert c.length == 2
    k, _ = _write(c, [2], 5)
    assert torch.equal(c.keys[1][:, :, 2:3], k)


def test_overflow_raises():
    c = StaticKVCache(1, 1, 4, capacity=4)
    try:
        c.set_write_slots(torch.tensor([3, 4]))
    except RuntimeError as e:
        assert "overflow" in str(e)
    else:
        raise AssertionError("expected overflow")
