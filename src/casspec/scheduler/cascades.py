"""Baselines on the same code path as DyTC: vertical and horizontal cascades and a static tree.

vc    vertical cascade (CS-Drafting): prompt lookup drafts, the self-draft reviews and corrects it in one
      forward (the draft model as a reviewer, not a generator), then continues k tokens itself.
hc    horizontal cascade: the stronger drafter takes the first positions, the cheaper ones the later ones.
vchc  both: the first stage drafts by vertical cascade, later positions by the cheaper drafter.
tree  SWIFT-style confidence-aware tree on the best self-draft: more siblings where confidence is low.
"""
from __future__ import annotations

from casspec.drafters.ngram import NgramDrafter
from casspec.drafters.self_draft import SelfDrafter
from casspec.scheduler.base import FixedPolicy
from casspec.state import DecodeState
from casspec.tree import DraftTree


def _room(tree: DraftTree, state: DecodeState, node: int, k: int) -> int:
    return max(0, min(k, state.max_depth() - tree.depth[node]))


def _lookup_chain(ngram: NgramDrafter, tree: DraftTree, state: DecodeState, node: int, k: int) -> list[int]:
    draft, n = ngram.lookup(tree, state, node, _room(tree, state, node, k))
    return ngram.extend(tree, node, draft, n)


class VerticalCascade(FixedPolicy):
    """Lookup -> reviewed by the self-draft -> the self-draft continues."""

    name = "vc"

    def __init__(self, ngram: NgramDrafter, drafter: SelfDrafter, k_lookup: int = 8, k_self: int = 4) -> None:
        self.ngram, self.drafter, self.k_lookup, self.k_self = ngram, drafter, k_lookup, k_self

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        end = self.stage(tree, state, 0)
        self.drafter.propose(tree, state, [end], _room(tree, state, end, self.k_self))

    def stage(self, tree: DraftTree, state: DecodeState, node: int) -> int:
        chain = _lookup_chain(self.ngram, tree, state, node, self.k_lookup)
        return self.drafter.review(tree, state, chain) if chain else node


class HorizontalCascade(FixedPolicy):
    """Stage i of the hierarchy drafts k_i positions, strongest first; lookup takes the tail."""

    name = "hc"

    def __init__(self, stages: list[SelfDrafter], ngram: NgramDrafter, ks: list[int], k_tail: int = 6) -> None:
        if len(stages) != len(ks) or any(k < 1 for k in ks):
            raise ValueError(f"one draft length >= 1 per stage: {len(stages)} stages, ks={ks}")
        self.stages, self.ngram, self.ks, self.k_tail = stages, ngram, ks, k_tail

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        end = self.head(tree, state, 0)
        _lookup_chain(self.ngram, tree, state, end, self.k_tail)

    def head(self, tree: DraftTree, state: DecodeState, node: int) -> int:
        for drafter, k in zip(self.stages, self.ks):
            new = drafter.propose(tree, state, [node], _room(tree, state, node, k))
            if not new:
                break
            node = new[-1]
        return node


class VerticalHorizontalCascade(FixedPolicy):
    """The first position block by vertical cascade, later blocks by cheaper drafters."""

    name = "vchc"

    def __init__(self, vc: VerticalCascade, hc: HorizontalCascade) -> None:
        self.vc, self.hc = vc, hc

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        end = self.vc.stage(tree, state, 0)
        if end == 0:  # no lookup match: the self-draft leads
            end = self.hc.head(tree, state, 0)
        _lookup_chain(self.hc.ngram, tree, state, end, self.hc.k_tail)


class ConfidenceTree(FixedPolicy):
    """SWIFT-style static tree: the self-draft's chain plus runner-up siblings sized by confidence."""

    name = "tree"
    WIDTH = ((0.5, 3), (0.8, 2), (1.01, 1))  # top-1 prob below bound -> that many candidates

    def __init__(self, drafter: SelfDrafter, depth: int = 8, min_conf: float = 0.3) -> None:
        self.drafter, self.depth, self.min_conf = drafter, depth, min_conf

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        node = 0
        for _ in range(_room(tree, state, 0, self.depth)):
            before = len(tree)
            new = self.drafter.propose(tree, state, [node], 1, siblings=2)
            if not new:
                return
            conf = tree.confidence[new[0]]
            width = next(w for bound, w in self.WIDTH if conf < bound)
            tree.truncate(before + width)  # keep `width` candidates, best first
            node = new[0]
            if conf < self.min_conf or tree.tokens[node] in state.eos_ids:
                return
