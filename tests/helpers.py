"""Test-only schedulers: drafters that are always right, always wrong, or shape random trees."""
from __future__ import annotations

import random

import torch

from casspec.drafters.self_draft import SelfDrafter
from casspec.runtime.plans import FULL
from casspec.state import DecodeState
from casspec.tree import DraftTree


class _Base:
    name = "test"

    def observe(self, tree, result, state) -> None:
        pass


class AlwaysRight(_Base):
    """Drafts with the full model itself: every greedy draft token is accepted."""

    name = "always-right"

    def __init__(self, engine, k: int = 4) -> None:
        self.drafter, self.k = SelfDrafter(engine.runner, FULL, name="full"), k

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        self.drafter.propose(tree, state, [0], self.k)


class AlwaysWrong(_Base):
    """Proposes the target's runner-up token at every position: every draft is rejected."""

    name = "always-wrong"

    def __init__(self, engine, k: int = 3) -> None:
        self.drafter, self.k = SelfDrafter(engine.runner, FULL, name="full"), k

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        node = 0
        for _ in range(min(self.k, state.max_depth())):
            logits = self.drafter._forward(tree, state, [node])[0]  # [V]
            second = int(torch.topk(logits, 2).indices[1])
            node = tree.add(node, second, "wrong", 0.0, 0.0)


class RandomTree(_Base):
    """Random tree shapes mixing correct (full-model) branches and random tokens, non-contiguous paths included."""

    name = "random-tree"

    def __init__(self, engine, seed: int = 0, nodes: int = 12) -> None:
        self.drafter = SelfDrafter(engine.runner, FULL, name="full")
        self.rng, self.nodes, self.vocab = random.Random(seed), nodes, engine.runner.vocab_size

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        for _ in range(self.nodes):
            leaf = self.rng.randrange(len(tree))
            if tree.depth[leaf] >= state.max_depth():
                continue
            if self.rng.random() < 0.5:
                self.drafter.propose(tree, state, [leaf], self.rng.randint(1, 3))
            else:
                tree.add(leaf, self.rng.randrange(self.vocab), "random", 0.0, 0.0)
