"""Prompt lookup (n-gram) drafting: the near-free bottom drafter of the cascade.

find_ngram_continuation is pure: if tokens = [1, 2, 3, 4, 2, 3], max_n = 3, k = 2, the longest suffix
that occurred before is [2, 3] (n = 2, at index 1), so the proposal is [4, 2] with match length 2.
"""
from __future__ import annotations

import time

import numpy as np

from casspec.state import DecodeState
from casspec.tree import DraftTree


def find_ngram_continuation(tokens: np.ndarray, max_n: int, min_n: int, k: int) -> tuple[list[int], int]:
    """Tokens after the latest earlier occurrence of the longest suffix n-gram (n in [min_n, max_n])."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = tokens[size - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:size - 1], n)  # [size-n, n]
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist(), n
    return [], 0


class NgramDrafter:
    """Prompt lookup over prompt + generated text + the path to the leaf."""

    def __init__(self, max_n: int = 3, min_n: int = 1, name: str = "pld") -> None:
        self.max_n, self.min_n, self.name = max_n, min_n, name
        self.cost = 1e-4  # seconds per lookup: an EMA of every lookup's measured time (DyTC, the batch planner)

    def lookup(self, tree: DraftTree, state: DecodeState, leaf: int, k: int) -> tuple[list[int], int]:
        """The continuation for `leaf` and its match length, without touching the tree (timed)."""
        t0 = time.perf_counter()
        ctx = np.asarray(state.tokens + tree.path_tokens(leaf), dtype=np.int64)
        draft, n = find_ngram_continuation(ctx, self.max_n, self.min_n, k)
        for i, t in enumerate(draft):  # nothing after EOS can be accepted
            if t in state.eos_ids:
                draft = draft[:i + 1]
                break
        seconds = time.perf_counter() - t0
        self.cost = 0.9 * self.cost + 0.1 * min(seconds, 1e-2)
        state.stats.drafter(self.name).time += seconds
        return draft, n

    def propose(self, tree: DraftTree, state: DecodeState, leaves: list[int], k: int) -> list[int]:
        new: list[int] = []
        for leaf in leaves:
            draft, n = self.lookup(tree, state, leaf, k)
            new += self.extend(tree, leaf, draft, n)
        return new

    def extend(self, tree: DraftTree, leaf: int, draft: list[int], n: int, p_token: float = 1.0) -> list[int]:
        """Append `draft` as a chain below `leaf`; confidence = match length / max_n."""
        conf = n / self.max_n
        new, node = [], leaf
        for t in draft:
            if tree.is_full:
                break
            node = tree.add(node, t, self.name, conf, tree.p_acc[node] * p_token)
            new.append(node)
        return new
