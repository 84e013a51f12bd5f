"""Method registry: a method name -> the scheduler (and drafters) that implement it, per engine."""
from __future__ import annotations

from collections.abc import Callable

from casspec.drafters.ngram import NgramDrafter
from casspec.drafters.self_draft import SelfDrafter
from casspec.scheduler.base import Scheduler
from casspec.scheduler.static import LookupThenSelf, NoDraft, PromptLookup, SelfChain
from casspec.target.plans import Int8
from casspec.target.runner import TargetRunner


class DrafterPool:
    """Drafters built once per engine and shared by every method."""

    def __init__(self, runner: TargetRunner) -> None:
        self.runner = runner
        self.ngram = NgramDrafter()
        self._self: dict[str, SelfDrafter] = {}

    def int8(self) -> SelfDrafter:
        if "int8" not in self._self:
            self._self["int8"] = SelfDrafter(self.runner, Int8(), name="int8")
        return self._self["int8"]


METHODS: dict[str, Callable[[DrafterPool], Scheduler]] = {
    "ar": lambda pool: NoDraft(),
    "pld": lambda pool: PromptLookup(pool.ngram),
    "self": lambda pool: SelfChain(pool.int8()),
    "casspec": lambda pool: LookupThenSelf(pool.ngram, pool.int8()),
}
