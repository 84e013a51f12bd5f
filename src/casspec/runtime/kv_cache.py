"""Preallocated, position-indexed KV cache shared by the target and every self-draft.

Slots [0, length) hold committed tokens. A forward writes its keys/values at explicit slots at or
past `length` (draft-tree nodes own slot `length + node_index`), so rollback is a length reset and
committing an accepted tree path is one gather per layer. Buffers are [H_kv, S, D] per layer: the
layout the attention kernel streams, one key after another.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    """KV buffers [H_kv, S, D] per layer, written at explicit slots by the runner's rope_kv op."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        shape = (num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0  # committed slots

    def check_slots(self, slots: torch.Tensor) -> int:
        """Raise on a write past the end; return kv_len = max slot + 1 (the keys a forward sees)."""
        end = int(slots.max()) + 1
        if end > self.capacity or int(slots.min()) < 0:
            raise RuntimeError(f"KV cache overflow: slot {end - 1} >= capacity {self.capacity}")
        return end

    def truncate(self, length: int) -> None:
        """Roll back to `length` committed slots (no allocation)."""
        self.length = min(self.length, length)

    def commit(self, src_slots: list[int]) -> None:
        """Append the tokens stored at `src_slots` (all >= length) as committed, in order."""
        n = len(src_slots)
        if n == 0:
            return
        if src_slots != list(range(self.length, self.length + n)):
            idx = torch.tensor(src_slots, dtype=torch.long, device=self.keys[0].device)
            for buf in (*self.keys, *self.values):
                buf[:, self.length:self.length + n] = buf.index_select(1, idx)
        self.length += n
