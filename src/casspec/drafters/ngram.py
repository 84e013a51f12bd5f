"""Prompt lookup (n-gram) drafting: the near-free bottom drafter of the cascade.

find_ngram_continuation is pure: if tokens = [1, 2, 3, 4, 2, 3], max_n = 3, k = 2, the longest suffix
that occurred before is [2, 3] (n = 2, at index 1), so the proposal is [4, 2] with match length 2.
"""
from __future__ import annotations

import time

import numpy as np

from casspec.state import DecodeState
from casspec.tree import DraftTree


def find_ngram_match(tokens: np.ndarray, max_n: int, min_n: int) -> tuple[int, int]:
    """(start, n): the longest suffix n-gram (n in [min_n, max_n]) occurred before, latest first, and its
    continuation starts at tokens[start]; (-1, 0) when no suffix occurred before."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = tokens[size - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:size - 1], n)  # [size-n, n]
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            return int(hits[-1]) + n, n
    return -1, 0


def find_ngram_continuation(tokens: np.ndarray, max_n: int, min_n: int, k: int) -> tuple[list[int], int]:
    """Tokens after the latest earlier occurrence of the longest suffix n-gram (n in [min_n, max_n])."""
    start, n = find_ngram_match(tokens, max_n, min_n)
    return (tokens[start:start + k].tolist(), n) if n else ([], 0)


class NgramDrafter:
    """Prompt lookup over prompt + generated text + the path to the leaf."""

    def __init__(self, max_n: int = 3, min_n: int = 1, name: str = "pld") -> None:
        self.max_n, self.min_n, self.name = max_n, min_n, name
        self.cost = 1e-4  # seconds per lookup: an EMA of every lookup's measured time (DyTC, the batch planner)

    def lookup(self, tree: DraftTree, state: DecodeState, leaf: int, k: int) -> tuple[list[int], int]:
        """The continuation for `leaf` and its match length, without touching the tree (timed)."""
        draft, n, _ = self.locate(tree, state, leaf, k)
        return draft, n

    def locate(self, tree: DraftTree, state: DecodeState, leaf: int, k: int,
               source: int | None = None) -> tuple[list[int], int, int]:
        """lookup(), and where the continuation starts in the context (prompt + generated + path to `leaf`).
        `source`: continue from that position instead of searching (the next tokens of a copied stretch that
        the text has followed so far: a match as long as the stretch, counted as max_n)."""
        t0 = time.perf_counter()
        ctx = np.asarray(state.tokens + tree.path_tokens(leaf), dtype=np.int64)
        start, n = (source, self.max_n) if source is not None else find_ngram_match(ctx, self.max_n, self.min_n)
        draft = ctx[start:start + k].tolist() if n else []
        for i, t in enumerate(draft):  # nothing after EOS can be accepted
            if t in state.eos_ids:
                draft = draft[:i + 1]
                break
        seconds = time.perf_counter() - t0
        self.cost = 0.9 * self.cost + 0.1 * min(seconds, 1e-2)
        state.stats.drafter(self.name).time += seconds
        return draft, n, start

    def propose(self, tree: DraftTree, state: DecodeState, leaves: list[int], k: int) -> list[int]:
        new: list[int] = []
        for leaf in leaves:
            draft, n = self.lookup(tree, state, leaf, k)
            new += self.extend(tree, leaf, draft, n)
        return new

    def extend(self, tree: DraftTree, leaf: int, draft: list[int], n: int, p_first: float = 1.0,
               p_next: float | None = None) -> list[int]:
        """Append `draft` as a chain below `leaf`; confidence = match length / max_n. Each node's p_acc is its
        parent's times p_first (the first token) or p_next (each later one; default p_first)."""
        conf = n / self.max_n
        new, node = [], leaf
        for i, t in enumerate(draft):
            if tree.is_full:
                break
            p = p_first if i == 0 or p_next is None else p_next
            node = tree.add(node, t, self.name, conf, tree.p_acc[node] * p)
            new.append(node)
        return new
