"""DraftTree: the token tree drafted in one step and verified in one target forward.

Node 0 is the root: the last committed token, whose KV is not yet cached. Node i owns cache slot
`base + i` and sits at position `base + depth[i]`, where `base` is the committed cache length.
A node attends to the committed prefix and to its own ancestors (tree attention).
"""
from __future__ import annotations

import torch

from casspec.runtime.batch import Segment
from casspec.runtime.kv_cache import SeqCache


class DraftTree:
    """Tokens, parents, depth, drafter and confidence per node, plus the ancestor closure."""

    def __init__(self, root_token: int, base: int, capacity: int = 128) -> None:
        self.base = base
        self.capacity = capacity
        self.tokens: list[int] = [root_token]
        self.parents: list[int] = [-1]
        self.depth: list[int] = [0]
        self.drafter: list[str | None] = [None]
        self.confidence: list[float] = [1.0]  # drafter's own confidence in the token
        self.p_acc: list[float] = [1.0]  # estimated probability the path to this node is accepted
        self.q: list[torch.Tensor | None] = [None]  # [V] distribution the token was sampled from; None = one-hot
        self.children: list[list[int]] = [[]]
        self.kv_layers: list[frozenset[int]] = [frozenset()]  # layers whose KV for this node is in the cache
        self._anc = torch.zeros(capacity, capacity, dtype=torch.bool)  # [C, C] ancestor-or-self
        self._anc[0, 0] = True

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_full(self) -> bool:
        return len(self.tokens) >= self.capacity

    def add(self, parent: int, token: int, drafter: str, confidence: float, p_acc: float,
            q: torch.Tensor | None = None) -> int:
        """Add a child of `parent`; a one-hot duplicate of an existing sibling returns that sibling."""
        if q is None:
            for c in self.children[parent]:
                if self.tokens[c] == token and self.q[c] is None:
                    return c
        if self.is_full:
            raise IndexError("draft tree is full")
        i = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depth.append(self.depth[parent] + 1)
        self.drafter.append(drafter)
        self.confidence.append(confidence)
        self.p_acc.append(p_acc)
        self.q.append(q)
        self.children.append([])
        self.kv_layers.append(frozenset())
        self.children[parent].append(i)
        self._anc[i] = self._anc[parent]
        self._anc[i, i] = True
        return i

    def truncate(self, size: int) -> None:
        """Drop the nodes added last, keeping the first `size` (they must be leaves of what remains)."""
        for i in range(len(self.tokens) - 1, size - 1, -1):
            self.children[self.parents[i]].remove(i)
            self._anc[i] = False
        for column in (self.tokens, self.parents, self.depth, self.drafter, self.confidence, self.p_acc, self.q,
                       self.children, self.kv_layers):
            del column[size:]

    def path(self, node: int) -> list[int]:
        """Node ids from the root to `node`, inclusive."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def path_tokens(self, node: int) -> list[int]:
        """Draft tokens on the path below the root (the root token is already committed)."""
        return [self.tokens[i] for i in self.path(node)[1:]]

    def subtree(self, node: int) -> list[int]:
        """`node` and every node below it, ascending (from the ancestor-or-self closure)."""
        return self._anc[:len(self.tokens), node].nonzero()[:, 0].tolist()

    def leaves(self) -> list[int]:
        return [i for i, c in enumerate(self.children) if not c]

    def num_drafts(self) -> int:
        return len(self.tokens) - 1

    def segment(self, cache: SeqCache | None, rows: list[int] | None = None) -> Segment:
        """The forward segment running nodes `rows` (ascending ids; all by default) of this tree on top of the
        committed KV of `cache` (None: the inputs alone, for inspection)."""
        rows = list(range(len(self))) if rows is None else rows
        idx = torch.tensor(rows, dtype=torch.long)
        last = rows[-1] + 1
        depth = torch.tensor(self.depth[:last], dtype=torch.long)
        committed = torch.ones(len(rows), self.base, dtype=torch.bool)
        return Segment(
            cache=cache,  # type: ignore[arg-type]  # None only when inspected, never run
            input_ids=torch.tensor([self.tokens[i] for i in rows], dtype=torch.long),
            positions=self.base + depth[idx],
            slots=self.base + idx,
            allowed=torch.cat([committed, self._anc[idx, :last]], dim=1),
            key_positions=torch.cat([torch.arange(self.base), self.base + depth]),
        )
