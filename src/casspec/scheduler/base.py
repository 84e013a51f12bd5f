"""Scheduler interface: plan and grow the step's draft tree, then learn from the verdict."""
from __future__ import annotations

from typing import Protocol

from casspec.state import DecodeState
from casspec.tree import DraftTree
from casspec.verify.accept import AcceptResult


class Scheduler(Protocol):
    """Decides which drafter drafts where, and how much, each step."""

    name: str

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        """Grow `tree` (rooted at the last committed token) with draft tokens."""
        ...

    def observe(self, tree: DraftTree, result: AcceptResult, state: DecodeState) -> None:
        """Feed back what verification accepted; `state.forward_log` holds what every forward cost."""
        ...


class FixedPolicy:
    """Base of schedulers that do not learn: observing is a no-op."""

    name = "static"

    def observe(self, tree: DraftTree, result: AcceptResult, state: DecodeState) -> None:
        pass
