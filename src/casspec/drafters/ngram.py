"""Prompt lookup (n-gram) drafting: the near-free bottom drafter of the cascade.

find_ngram_continuation is pure: if tokens = [1, 2, 3, 4, 2, 3], max_n = 3, k = 2, the longest suffix
that occurred before is [2, 3] (n = 2, at index 1), so the proposal is [4, 2] with match length 2.
"""
from __future__ import annotations

import time

import numpy as np

from casspec.runtime.prefix_cache import common_prefix
from casspec.scheduler.acceptance import AcceptanceEstimator
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


class NgramIndex:
    """Where the latest occurrence of every n-gram (n <= max_n) of a growing text is followed: find_ngram_match as a
    few dict reads. The scan reads the whole text each lookup (~0.1 ms at 900 tokens, several a step); this index
    adds each committed token's n-grams once and scans only the draft path past the committed text."""

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self.grams: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]  # n -> gram -> start
        self.size = 0  # tokens indexed: every gram followed by a token at c < size is in

    def update(self, tokens: list[int]) -> None:
        """Index the grams the tokens added since the last call end (tokens only grow)."""
        for c in range(max(self.size, 1), len(tokens)):
            for n in range(1, min(self.max_n, c) + 1):
                self.grams[n][tuple(tokens[c - n:c])] = c
        self.size = max(self.size, len(tokens))

    def match(self, tokens: list[int], path: list[int], min_n: int) -> tuple[int, int]:
        """find_ngram_match(tokens + path, max_n, min_n): (start, n) or (-1, 0)."""
        self.update(tokens)
        size, base = len(tokens) + len(path), len(tokens)
        tail = tokens[max(0, base - self.max_n):] + path  # ctx[size - len(tail):]
        off = size - len(tail)
        for n in range(min(self.max_n, size - 1), min_n - 1, -1):
            suffix = tail[len(tail) - n:]
            for c in range(size - 1, max(base, n) - 1, -1):  # occurrences followed by a path token, latest first
                if tail[c - n - off:c - off] == suffix:
                    return c, n
            start = self.grams[n].get(tuple(suffix), -1)
            if start >= 0:
                return start, n
        return -1, 0


def find_ngram_continuation(tokens: np.ndarray, max_n: int, min_n: int, k: int) -> tuple[list[int], int]:
    """Tokens after the latest earlier occurrence of the longest suffix n-gram (n in [min_n, max_n])."""
    start, n = find_ngram_match(tokens, max_n, min_n)
    return (tokens[start:start + k].tolist(), n) if n else ([], 0)


# Prior acceptance of a continuation's token once the one before it was accepted: following each continuation
# through the greedy race outputs (prompt + answer, Spec-Bench 5 per category), P(next | previous) was 0.97
# (Gemma-3-270M) and 0.88 (SmolLM2), against 0.32 and 0.28 for a continuation's first token.
NEXT_PRIOR = 0.9


class NgramDrafter:
    """Prompt lookup over prompt + generated text + the path to the leaf."""

    def __init__(self, max_n: int = 3, min_n: int = 1, name: str = "pld") -> None:
        self.max_n, self.min_n, self.name = max_n, min_n, name
        self.cost = 1e-4  # seconds per lookup: an EMA of every lookup's measured time (DyTC, the batch planner)

    def lookup(self, tree: DraftTree, state: DecodeState, leaf: int, k: int) -> tuple[list[int], int]:
        """The continuation for `leaf` and its match length, without touching the tree (timed)."""
        draft, n, _ = self._locate(state, tree.path_tokens(leaf), k, None)
        return draft, n

    def continuation(self, state: DecodeState, k: int) -> tuple[list[int], int, int]:
        """The continuation of the committed tokens (up to k), its match length, and where it starts in
        state.tokens. While the text follows a copied stretch (`follow`) it is the stretch's next tokens (a match
        as long as the stretch, counted as max_n), not those after the latest occurrence of the last max_n
        tokens: inside a stretch that occurrence is often another copy (a list counted digit by digit re-matches
        the wrong number where the stretch's own position copies ten tokens at once)."""
        go_on = state.lookup_streak and 0 <= state.lookup_source < len(state.tokens)
        return self._locate(state, [], k, state.lookup_source if go_on else None)

    def acceptance(self, state: DecodeState, first: AcceptanceEstimator, match: int,
                   chained: bool) -> tuple[float, float]:
        """Acceptance of a continuation's first token (estimated by `first`) and of each next one given the one
        before it, at this match length; `chained`: the first token goes on a copied stretch (`follow`), so it is
        a next one too."""
        conf = match / self.max_n
        then = self.next_estimate(state).token_prob(conf)
        return (then if chained else first.token_prob(conf)), then

    @staticmethod
    def next_estimate(state: DecodeState) -> AcceptanceEstimator:
        """This generation's acceptance of a continuation's token once the one before it was accepted. Kept per
        text, from NEXT_PRIOR: whether a text copies is its own; learnt across requests, a code edit that kept
        breaking its continuations left the next request, copying a function whole, drafting one token a step."""
        if state.lookup_next is None:
            state.lookup_next = AcceptanceEstimator(prior=NEXT_PRIOR)
        return state.lookup_next

    @staticmethod
    def follow(state: DecodeState, draft: list[int], start: int, committed: list[int]) -> int:
        """After a round whose committed-token continuation was `draft` (from `start`): how many of the
        committed tokens it predicted; when all of them, the text stays in the copied stretch (once a continuation's
        first token is right, its next ones are right 0.88-0.97 of the time: NEXT_PRIOR; start < 0: a
        continuation whose start is not known)."""
        copied = common_prefix(draft, committed)
        state.lookup_streak = start >= 0 and 0 < copied == len(committed)
        state.lookup_source = start + copied if state.lookup_streak else -1
        return copied

    def _locate(self, state: DecodeState, path: list[int], k: int,
                source: int | None) -> tuple[list[int], int, int]:
        """(continuation of prompt + generated + path, match length, its start); `source`: continue from there."""
        t0 = time.perf_counter()
        tokens = state.tokens
        if source is not None:
            start, n = source, self.max_n
        else:
            index = state.ngram_index.get(self.max_n)
            if index is None:
                index = state.ngram_index[self.max_n] = NgramIndex(self.max_n)
            start, n = index.match(tokens, path, self.min_n)
        draft: list[int] = []
        if n:  # the continuation of tokens + path from `start`
            after = tokens[start:start + k] + path if start < len(tokens) else path[start - len(tokens):]
            draft = after[:k]
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
