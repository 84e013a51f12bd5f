"""Scheduler interface: plan and grow the step's draft tree, then learn from the verdict."""
from __future__ import annotations

from typing import Protocol

from casspec.scheduler.latency import ForwardTimes
from casspec.state import DecodeState
from casspec.tree import DraftTree
from casspec.verify.accept import AcceptResult


class Scheduler(Protocol):
    """Decides which drafter drafts where, and how much, each step."""

    name: str

    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        """Grow `tree` (rooted at the last committed token) with draft tokens."""
        ...

    def observe(self, tree: DraftTree, result: AcceptResult, state: DecodeState, times: ForwardTimes) -> None:
        """Feed back what verification accepted, and what the step's forwards (and sampling work) cost."""
        ...


class FixedPolicy:
    """Base of schedulers that do not learn: observing is a no-op. In a batch (batching/step.py) each
    request's draft for a step is a single chain, which the policy itself chooses: `batch_choice`."""

    name = "static"

    def observe(self, tree: DraftTree, result: AcceptResult, state: DecodeState, times: ForwardTimes) -> None:
        pass

    def batch_choice(self, state: DecodeState, lookup: tuple[list[int], int]) -> tuple[str | None, int]:
        """(draft source, length) of this request's chain in a batched step, given its prompt-lookup
        continuation (tokens, match length); (None, 0): no draft."""
        return None, 0

    def chain_goes_on(self, confidence: float) -> bool:
        """Whether a batched self-draft chain continues below a node drafted with this confidence."""
        return True
