"""Preallocated, position-indexed KV cache shared by the target and every self-draft.

Slots [0, length) hold committed tokens. A forward writes its keys/values at explicit slots at or
past `length` (draft-tree nodes own slot `length + node_index`), so rollback is a length reset and
committing an accepted tree path is one gather per layer. Implements the `update()` contract HF
attention modules call, so the HF modules write into it unmodified.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    """KV buffers [1, H_kv, S, D] per layer, written at explicit slots."""

    is_compileable = False

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        shape = (1, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.length = 0  # committed slots
        self._slots: torch.Tensor | None = None  # [q] write slots of the running forward
        self._start = 0  # == slots[0] when the slots are contiguous
        self._contiguous = True
        self._kv_len = 0  # keys visible to the running forward

    def set_write_slots(self, slots: torch.Tensor) -> None:
        """Declare where the next forward's q tokens go; they see keys [0, max(slots)]."""
        start, end = int(slots[0]), int(slots[-1]) + 1
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: slot {end - 1} >= capacity {self.capacity}")
        self._slots = slots
        self._start = start
        self._contiguous = end - start == slots.numel()
        self._kv_len = int(slots.max()) + 1

    @property
    def kv_len(self) -> int:
        return self._kv_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """HF Cache contract: store [1, H, q, D] at the write slots, return [1, H, kv_len, D] views."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._contiguous:
            q = key_states.shape[2]
            k[:, :, self._start:self._start + q] = key_states
            v[:, :, self._start:self._start + q] = value_states
        else:
            k.index_copy_(2, self._slots, key_states)
            v.index_copy_(2, self._slots, value_states)
        return k[:, :, :self._kv_len], v[:, :, :self._kv_len]

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
                buf[:, :, self.length:self.length + n] = buf.index_select(2, idx)
        self.length += n

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length
