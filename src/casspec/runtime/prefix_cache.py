"""Prefix cache: the KV of committed tokens outlives its request and is found again by prefix.

A chat client sends the whole conversation every turn, agents send the same system prompt again and again;
a request whose prompt starts with tokens some earlier request computed takes their KV instead of
recomputing it (vLLM's automatic prefix caching, SGLang's radix cache, llama.cpp's slot reuse).

Layout. A running sequence's KV is one contiguous region of a KVPool (kv_cache.py) and the attention
kernels read one key range per row, so running requests cannot share blocks in place. The cache keeps a
store of its own: fixed blocks of `block` slots, [H_kv, blocks * block, D] per layer like the pool, made
with `torch.empty` on first use (pages never written cost no memory). On a hit the matched tokens' KV is
copied into the new request's region, one gather per layer: copying KV is a memory copy, recomputing it is
a forward over every token. Requests with the same prefix read the same cached blocks (each copies them).
A request offers its committed tokens' KV back when its prompt is computed and when it ends (one scatter
per layer for the blocks not cached yet).

Index. A trie of token blocks: vLLM's chained block hash made exact (a node's key is its parent node and
its tokens, so no two prefixes collide). A node holds `block` tokens, except a leaf that may hold fewer (a
sequence's tail), so the next turn of a conversation finds every committed token. A lookup may end inside
a node, as in SGLang's radix tree: the KV of token i depends on tokens [0, i] only.

Refcounts and eviction. A request pins the nodes it matched (ref += 1) until it ends, so a prefix in use
(a shared system prompt) stays cached while other requests come and go. When the store is full, leaves
with ref 0 are evicted least recently used first (a pinned node's ancestors have children, so they are
never leaves). The store's size is a token budget: memory is bounded whatever the traffic.
"""
from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from casspec.runtime.kv_cache import SeqCache

if TYPE_CHECKING:
    from casspec.runtime.runner import TargetRunner

BLOCK = 16  # tokens per block (vLLM's default)
DEFAULT_BYTES = 1 << 30  # default store size: 1 GiB of KV, at most DEFAULT_MAX_TOKENS tokens
DEFAULT_MAX_TOKENS = 65536


class _Node:
    """One block of tokens in the trie; `block` is its slot block in the store (-1 for the root)."""

    __slots__ = ("parent", "tokens", "block", "children", "ref", "last_used")

    def __init__(self, parent: _Node | None, tokens: tuple[int, ...], block: int) -> None:
        self.parent, self.tokens, self.block = parent, tokens, block
        self.children: dict[int, list[_Node]] = {}  # first token -> nodes starting with it
        self.ref = 0  # running requests that matched this node (never evicted while > 0)
        self.last_used = 0

    def kids(self) -> list[_Node]:
        return [c for group in self.children.values() for c in group]


Pin = list[_Node]  # the nodes one request holds


class PrefixCache:
    """Cached KV of token prefixes, in blocks, for the sequences of one model. Thread-safe."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_tokens: int, block: int = BLOCK,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if block < 1 or max_tokens < 0:
            raise ValueError(f"block must be >= 1 and max_tokens >= 0, got {block}, {max_tokens}")
        self.block, self.num_blocks = block, max_tokens // block
        self._shape = (num_layers, num_kv_heads, self.num_blocks * block, head_dim)
        self._dtype, self._device = dtype, torch.device(device)
        self.keys: list[torch.Tensor] = []  # [H_kv, blocks * block, D] per layer, made on first insert
        self.values: list[torch.Tensor] = []
        self.root = _Node(None, (), -1)
        self._free = list(range(self.num_blocks - 1, -1, -1))  # block ids, next to use last
        self._nodes: set[_Node] = set()
        self._clock = itertools.count(1)
        self._lock = threading.RLock()
        self.counters = {"lookups": 0, "hits": 0, "hit_tokens": 0, "stored_tokens": 0, "evicted_blocks": 0}

    @classmethod
    def for_runner(cls, runner: TargetRunner, max_tokens: int | None = None, block: int = BLOCK) -> PrefixCache:
        """A cache for a TargetRunner's KV layout; default size: DEFAULT_BYTES of KV (at most DEFAULT_MAX_TOKENS)."""
        a = runner.adapter
        if max_tokens is None:
            width = torch.empty(0, dtype=runner.dtype).element_size()
            per_token = 2 * a.num_layers * a.num_kv_heads * a.head_dim * width
            max_tokens = min(DEFAULT_MAX_TOKENS, DEFAULT_BYTES // per_token)
        return cls(a.num_layers, a.num_kv_heads, a.head_dim, max_tokens, block, runner.dtype, runner.device)

    @property
    def max_tokens(self) -> int:
        return self.num_blocks * self.block

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    # ---- lookup -----------------------------------------------------------------------------------------
    def match(self, tokens: list[int], limit: int | None = None) -> tuple[Pin, list[int]]:
        """The nodes of the longest cached prefix of `tokens[:limit]` and the tokens used of each (the last
        node may match only in part)."""
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        path: Pin = []
        used: list[int] = []
        node, pos, b = self.root, 0, self.block
        with self._lock:
            while pos < limit:
                want = tokens[pos:min(limit, pos + b)]
                best, k = None, 0
                for c in node.children.get(want[0], ()):
                    j = common_prefix(c.tokens, want)
                    if j > k:
                        best, k = c, j
                if best is None:
                    break
                path.append(best)
                used.append(k)
                pos += k
                if k < b:
                    break
                node = best
        return path, used

    def restore(self, tokens: list[int], cache: SeqCache, pin: Pin | None = None) -> Pin | None:
        """Copy the KV of the longest cached prefix of `tokens` (all but the last: it is the first tree root)
        into `cache` when it is longer than what the cache holds, and pin its nodes.

        Returns the request's pin (the new one on a hit, else `pin` unchanged); release it when the request ends.
        """
        with self._lock:
            self.counters["lookups"] += 1
            path, used = self.match(tokens, min(len(tokens) - 1, cache.capacity))
            n = sum(used)
            if n <= cache.length or not cache.placed:
                return pin
            src = torch.cat([torch.arange(u) + node.block * self.block for node, u in zip(path, used)])
            src = src.to(self._device)
            dst = slice(cache.base, cache.base + n)
            for store, buf in zip((*self.keys, *self.values), (*cache.keys, *cache.values)):
                buf[:, dst] = store.index_select(1, src)
            cache.length = n
            now = next(self._clock)
            for node in path:
                node.ref += 1
                node.last_used = now
            self.release(pin)
            self.counters["hits"] += 1
            self.counters["hit_tokens"] += n
            return path

    def release(self, pin: Pin | None) -> None:
        """Unpin a request's nodes (idempotent per pin: pass each pin once)."""
        if not pin:
            return
        with self._lock:
            for node in pin:
                node.ref -= 1
                assert node.ref >= 0, "prefix cache refcount below zero"

    # ---- insert -----------------------------------------------------------------------------------------
    def insert(self, tokens: list[int], cache: SeqCache) -> int:
        """Cache the KV of `tokens[:cache.length]` (held in `cache`'s committed slots); returns tokens added.

        Blocks already cached are only touched; new ones take free blocks, evicting unpinned LRU leaves
        when the store is full (what does not fit is not cached).
        """
        n = min(cache.length, len(tokens))
        if n == 0 or self.num_blocks == 0 or not cache.placed:
            return 0
        b = self.block
        with self._lock:
            node, pos, now = self.root, 0, next(self._clock)
            while pos < n:  # walk the blocks already cached
                want = tuple(tokens[pos:min(n, pos + b)])
                group = node.children.get(want[0], ())
                same = next((c for c in group if c.tokens == want), None)
                if same is None and len(want) < b:  # a tail some longer cached block already covers
                    same = next((c for c in group if c.tokens[:len(want)] == want), None)
                    if same is not None:
                        same.last_used = now
                        return 0
                if same is None:
                    break
                same.last_used = now
                if len(want) < b:
                    return 0
                node, pos = same, pos + b
            if pos >= n:
                return 0
            blocks = self._take_blocks(-(-(n - pos) // b), keep=node)
            if not blocks:
                return 0
            end = min(n, pos + len(blocks) * b)
            self._ensure_store()
            dst = torch.cat([torch.arange(min(b, end - p)) + blk * b for blk, p in zip(blocks, range(pos, end, b))])
            dst = dst.to(self._device)
            src = slice(cache.base + pos, cache.base + end)
            for store, buf in zip((*self.keys, *self.values), (*cache.keys, *cache.values)):
                store.index_copy_(1, dst, buf[:, src])
            for blk, p in zip(blocks, range(pos, end, b)):
                child = _Node(node, tuple(tokens[p:min(end, p + b)]), blk)
                child.last_used = now
                self._add(node, child)
                node = child
            self.counters["stored_tokens"] += end - pos
            return end - pos

    def _add(self, parent: _Node, child: _Node) -> None:
        """Link a new node; unpinned partial siblings it extends are dropped (it holds their tokens)."""
        for old in [c for c in parent.children.get(child.tokens[0], ()) if len(c.tokens) < len(child.tokens)
                    and child.tokens[:len(c.tokens)] == c.tokens and c.ref == 0 and not c.children]:
            self._remove(old)
        parent.children.setdefault(child.tokens[0], []).append(child)
        self._nodes.add(child)

    def _remove(self, node: _Node) -> None:
        parent = node.parent
        assert parent is not None  # the root is never removed
        group = parent.children[node.tokens[0]]
        group.remove(node)
        if not group:
            del parent.children[node.tokens[0]]
        self._nodes.discard(node)
        self._free.append(node.block)

    def _take_blocks(self, want: int, keep: _Node) -> list[int]:
        """Up to `want` free block ids, evicting unpinned leaves LRU-first (never `keep` or its ancestors)."""
        if len(self._free) < want:
            keep.ref += 1  # the insertion point: its ancestors have children, so only it could be a leaf
            try:
                self._evict(want - len(self._free))
            finally:
                keep.ref -= 1
        take = min(want, len(self._free))
        return [self._free.pop() for _ in range(take)]

    def _evict(self, blocks: int) -> None:
        """Free up to `blocks` blocks: leaves with ref 0, least recently used first (parents join once bare)."""
        heap = [(n.last_used, id(n), n) for n in self._nodes if n.ref == 0 and not n.children]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < blocks:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None  # a node in the heap is never the root
            self._remove(node)
            freed += 1
            if parent is not self.root and parent.ref == 0 and not parent.children:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        self.counters["evicted_blocks"] += freed

    def _ensure_store(self) -> None:
        if not self.keys:
            layers, *shape = self._shape
            make = lambda: torch.empty(shape, dtype=self._dtype, device=self._device)  # noqa: E731
            self.keys = [make() for _ in range(layers)]
            self.values = [make() for _ in range(layers)]

    # ---- upkeep -----------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Drop every unpinned block (pinned ones stay until released)."""
        with self._lock:
            self._evict(len(self._nodes))

    def stats(self) -> dict:
        """Counters and occupancy: lookups, hits, hit_tokens, stored_tokens, evicted_blocks, tokens, max_tokens."""
        with self._lock:
            cached = sum(len(n.tokens) for n in self._nodes)
            pinned = sum(1 for n in self._nodes if n.ref)
            return {**self.counters, "tokens": cached, "blocks": len(self._nodes), "pinned_blocks": pinned,
                    "max_tokens": self.max_tokens}

    def check(self) -> None:
        """Raise if the trie and the free list disagree (tests): every block is free or held by one node."""
        with self._lock:
            held = [n.block for n in self._nodes]
            assert len(set(held)) == len(held), "a block is held by two nodes"
            assert not set(held) & set(self._free), "a held block is on the free list"
            assert len(held) + len(self._free) == self.num_blocks, "blocks leaked"
            seen = set()
            stack = [self.root]
            while stack:
                node = stack.pop()
                for c in node.kids():
                    assert c.parent is node and 0 < len(c.tokens) <= self.block and c.ref >= 0
                    assert not c.children or len(c.tokens) == self.block, "a partial block has children"
                    seen.add(c)
                    stack.append(c)
            assert seen == self._nodes, "nodes unreachable from the root"


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of a and b."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
