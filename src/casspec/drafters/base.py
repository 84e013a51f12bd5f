"""Drafter interface: grow a DraftTree below given leaves."""
from __future__ import annotations

from typing import Protocol

from casspec.state import DecodeState
from casspec.tree import DraftTree


class Drafter(Protocol):
    """Proposes draft tokens below tree nodes. An empty proposal is a normal outcome."""

    name: str

    def propose(self, tree: DraftTree, state: DecodeState, leaves: list[int], k: int) -> list[int]:
        """Draft up to `k` tokens below each leaf; return the new node ids (deepest last per chain)."""
        ...
