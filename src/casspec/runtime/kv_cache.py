"""KV cache: one pool of slots per engine, a contiguous region of it per sequence.

A `KVPool` holds the key/value buffers [H_kv, S, D] of every layer. A running sequence owns a region
[base, base + capacity) of the S slots (first-fit allocation, freed when the sequence ends), which a
`SeqCache` addresses with slots relative to its base. Inside a region, slots [0, length) hold committed
tokens; a forward writes at explicit slots at or past `length` (draft-tree node i owns slot length + i),
so rollback is a length reset and committing an accepted tree path is one gather per layer. The target
and every self-draft share these buffers. Buffers are head-major: the layout the attention kernel streams.
"""
from __future__ import annotations

import threading

import torch


class KVPool:
    """Key/value buffers shared by sequences, each in its own contiguous region of slots."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        shape = (num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self._regions: dict[int, int] = {}  # base -> size of every allocated region
        self._lock = threading.Lock()

    def alloc(self, size: int) -> SeqCache | None:
        """A region of `size` slots (first fit), or None when no free run is that long."""
        cache = self.reserve(size)
        return cache if self.place(cache) else None

    def reserve(self, size: int) -> SeqCache:
        """A cache of `size` slots with no region yet (`place` gives it one when there is room)."""
        if size < 1:
            raise ValueError(f"region size must be >= 1, got {size}")
        return SeqCache(self, -1, size)

    def place(self, cache: SeqCache) -> bool:
        """Give a reserved cache the first free run of its size; False when none is that long."""
        if cache.placed:
            return True
        with self._lock:
            start = 0
            for base, n in sorted(self._regions.items()):
                if base - start >= cache.capacity:
                    break
                start = base + n
            if start + cache.capacity > self.capacity:
                return False
            self._regions[start] = cache.capacity
        cache.base = start
        return True

    def free(self, cache: SeqCache) -> None:
        """Return a region to the pool (idempotent)."""
        with self._lock:
            if cache.placed and self._regions.get(cache.base) == cache.capacity:
                del self._regions[cache.base]
        cache.released = True

    @property
    def used(self) -> int:
        """Slots held by live regions."""
        return sum(self._regions.values())

    def regions(self) -> list[tuple[int, int]]:
        """(base, size) of every live region, in slot order."""
        return sorted(self._regions.items())


class SeqCache:
    """One sequence's region of a KVPool: relative slots [0, capacity), committed ones [0, length)."""

    def __init__(self, pool: KVPool, base: int, capacity: int) -> None:
        self.pool, self.base, self.capacity = pool, base, capacity
        self.length = 0  # committed slots
        self.released = False

    @property
    def placed(self) -> bool:
        """Whether the cache holds a region of the pool (and has not released it)."""
        return self.base >= 0 and not self.released

    @property
    def keys(self) -> list[torch.Tensor]:
        """Every layer's key buffer [H_kv, S, D] of the whole pool (index with base + slot)."""
        return self.pool.keys

    @property
    def values(self) -> list[torch.Tensor]:
        return self.pool.values

    def check_slots(self, slots: torch.Tensor) -> int:
        """Raise on a write outside the region; return kv_len = max slot + 1 (relative keys a forward sees)."""
        if not self.placed:
            raise RuntimeError("this sequence's KV cache has no region of the pool (not admitted, or freed)")
        end = int(slots.max()) + 1
        if end > self.capacity or int(slots.min()) < 0:
            raise RuntimeError(f"KV cache overflow: slot {end - 1} >= capacity {self.capacity}")
        return end

    def truncate(self, length: int) -> None:
        """Roll back to `length` committed slots (no allocation)."""
        self.length = min(self.length, length)

    def commit(self, src_slots: list[int]) -> None:
        """Append the tokens stored at relative `src_slots` (all >= length) as committed, in order."""
        n = len(src_slots)
        if n == 0:
            return
        if src_slots != list(range(self.length, self.length + n)):
            idx = torch.tensor(src_slots, dtype=torch.long, device=self.keys[0].device) + self.base
            dst = slice(self.base + self.length, self.base + self.length + n)
            for buf in (*self.keys, *self.values):
                buf[:, dst] = buf.index_select(1, idx)
        self.length += n


def StaticKVCache(num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,  # noqa: N802
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> SeqCache:
    """A private pool holding a single sequence (one generation)."""
    cache = KVPool(num_layers, num_kv_heads, head_dim, capacity, dtype, device).alloc(capacity)
    assert cache is not None
    return cache
