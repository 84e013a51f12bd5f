"""Method registry: a method name -> the scheduler (and drafters) that implement it, per engine.

Drafters are built once per engine (the int8 copy, layer searches) and shared by every method; each
method keeps its own scheduler, so adaptive methods keep learning across generate() calls.
"""
from __future__ import annotations

from collections.abc import Callable

from casspec.pool import DrafterPool
from casspec.scheduler.base import Scheduler
from casspec.scheduler.cascades import ConfidenceTree, HorizontalCascade, VerticalCascade, VerticalHorizontalCascade
from casspec.scheduler.static import LookupThenSelf, NoDraft, PromptLookup, SelfChain


def _hc(pool: DrafterPool) -> HorizontalCascade:
    stages = pool.self_levels()
    return HorizontalCascade(stages, pool.ngram, ks=[4 if i == 0 else 2 for i in range(len(stages))])


METHODS: dict[str, Callable[[DrafterPool], Scheduler]] = {
    "ar": lambda pool: NoDraft(),
    "pld": lambda pool: PromptLookup(pool.ngram),
    "self": lambda pool: SelfChain(pool.self_levels()[0]),
    "pld+self": lambda pool: LookupThenSelf(pool.ngram, pool.self_levels()[0]),
    "vc": lambda pool: VerticalCascade(pool.ngram, pool.self_levels()[0]),
    "hc": _hc,
    "vchc": lambda pool: VerticalHorizontalCascade(VerticalCascade(pool.ngram, pool.self_levels()[0]), _hc(pool)),
    "tree": lambda pool: ConfidenceTree(pool.self_levels()[0]),
    "casspec": lambda pool: pool.dytc(),
    # ablations of DyTC
    "casspec-nolat": lambda pool: pool.dytc(use_latency=False),
    "casspec-noema": lambda pool: pool.dytc(use_ema=False),
    "casspec-chain": lambda pool: pool.dytc(use_tree=False),
    "casspec-nopld": lambda pool: pool.dytc(tuple(d for d in pool.hierarchy if d != "pld") or ("int8",)),
    "casspec-noself": lambda pool: pool.dytc(("pld",)),
}
