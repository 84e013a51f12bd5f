"""Fixed-policy schedulers: plain decoding, prompt lookup, a self-draft chain, and a two-branch tree."""
from __future__ import annotations

from casspec.drafters.ngram import NgramDrafter
from casspec.drafters.self_draft import SelfDrafter
from casspec.scheduler.base import FixedPolicy
from casspec.sizes import MAX_CHAIN
from casspec.state import DecodeState
from casspec.tree import DraftTree

# prompt-lookup draft length by n-gram match length: a unigram match is a weak signal
PLD_LENGTH = {1: 2, 2: 6, 3: 10}


class NoDraft(FixedPolicy):
    """Plain autoregressive decoding: the tree is the root alone (`ar`)."""

    name = "ar"

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        pass


class PromptLookup(FixedPolicy):
    """Prompt lookup decoding with the draft length gated by match length (`pld`)."""

    name = "pld"

    def __init__(self, ngram: NgramDrafter, lengths: dict[int, int] = PLD_LENGTH) -> None:
        self.ngram, self.lengths = ngram, lengths

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        k = min(max(self.lengths.values()), state.max_depth())
        draft, n = self.ngram.lookup(tree, state, 0, k)
        self.ngram.extend(tree, 0, draft[:self.lengths.get(n, 0)], n)

    def batch_choice(self, state: DecodeState, lookup: tuple[list[int], int]) -> tuple[str | None, int]:
        draft, n = lookup
        return "pld", min(len(draft), self.lengths.get(n, 0))


class SelfChain(FixedPolicy):
    """A chain from one self-draft plan, stopped early on low confidence (`self`)."""

    name = "self"

    def __init__(self, drafter: SelfDrafter, k: int = MAX_CHAIN, min_conf: float = 0.3) -> None:
        self.drafter, self.k, self.min_conf = drafter, k, min_conf

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        self.drafter.propose(tree, state, [0], self.k, min_conf=self.min_conf)

    def batch_choice(self, state: DecodeState, lookup: tuple[list[int], int]) -> tuple[str | None, int]:
        return self.drafter.name, min(self.k, state.max_depth())

    def chain_goes_on(self, confidence: float) -> bool:
        return confidence >= self.min_conf


class LookupThenSelf(FixedPolicy):
    """Two branches from the root: prompt lookup (when the match is long enough) and a self-draft chain."""

    name = "pld+self"

    def __init__(self, ngram: NgramDrafter, drafter: SelfDrafter, k: int = 6, min_match: int = 2,
                 min_conf: float = 0.3) -> None:
        self.ngram, self.drafter, self.k, self.min_match, self.min_conf = ngram, drafter, k, min_match, min_conf

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        draft, n = self.ngram.lookup(tree, state, 0, min(PLD_LENGTH[3], state.max_depth()))
        if n >= self.min_match:
            self.ngram.extend(tree, 0, draft[:PLD_LENGTH.get(n, 0)], n)
        self.drafter.propose(tree, state, [0], self.k, min_conf=self.min_conf)
