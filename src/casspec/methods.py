"""Method registry: a method name -> the scheduler (and drafters) that implement it, per engine.

Drafters are built once per engine (the int8 copy, layer searches) and shared by every method; each
method keeps its own scheduler, so adaptive methods keep learning across generate() calls.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from casspec.drafters.layer_search import LayerSetSearch
from casspec.drafters.ngram import NgramDrafter
from casspec.drafters.self_draft import SelfDrafter
from casspec.scheduler.acceptance import AcceptanceEstimator
from casspec.scheduler.base import Scheduler
from casspec.scheduler.calibrate import load_or_calibrate, machine_key
from casspec.scheduler.cascades import ConfidenceTree, HorizontalCascade, VerticalCascade, VerticalHorizontalCascade
from casspec.scheduler.dytc import DyTC, DyTCConfig, Level
from casspec.scheduler.latency import LatencyModel
from casspec.scheduler.static import LookupThenSelf, NoDraft, PromptLookup, SelfChain
from casspec.runtime.plans import FULL, EarlyExit, Int8
from casspec.runtime.runner import TargetRunner

# Default draft hierarchies, strongest first, prompt lookup last. On this CPU (AVX2, fp32 target) only the
# int8 copy and prompt lookup pay (research/feasibility.md §4); on GPU layer sparsity is the paper's DSIA.
DEFAULT_HIERARCHY = {"cpu": ("int8", "pld"), "cuda": ("skip0.4", "skip0.6", "pld")}
DRAFTERS = ("int8", "int8+skip", "skip0.4", "skip0.6", "exit", "pld")
# Starting acceptance estimates (the EMA takes over after one window of verified tokens). A level is only
# tried while its estimate says it pays, so a pessimistic prior would never be corrected: these are the
# rates measured on SmolLM2 / Gemma-3-270M chat prompts (int8 0.93+, README "Measured"), rounded down.
PRIORS = {"int8": 0.9, "int8+skip": 0.75, "skip0.4": 0.7, "skip0.6": 0.5, "exit": 0.5, "pld": 0.4}


class DrafterPool:
    """Drafters built once per engine and shared by every method."""

    def __init__(self, runner: TargetRunner, model_name: str, cache_dir: Path | None = None,
                 hierarchy: tuple[str, ...] | None = None) -> None:
        self.runner, self.model_name, self.cache_dir = runner, model_name, cache_dir
        self.hierarchy = tuple(hierarchy or DEFAULT_HIERARCHY.get(runner.device.type, DEFAULT_HIERARCHY["cpu"]))
        unknown = [d for d in self.hierarchy if d not in DRAFTERS]
        if unknown or not self.hierarchy:
            raise ValueError(f"unknown drafters {unknown} in hierarchy; choose from {DRAFTERS}")
        self.ngram = NgramDrafter(name="pld")
        self._self: dict[str, SelfDrafter] = {}
        self.searches: dict[str, LayerSetSearch] = {}
        self._latency: LatencyModel | None = None

    def get(self, name: str) -> SelfDrafter | NgramDrafter:
        """A drafter by hierarchy name."""
        if name == "pld":
            return self.ngram
        if name not in self._self:
            self._self[name] = SelfDrafter(self.runner, self._plan(name), name=name)
        return self._self[name]

    def _plan(self, name: str):
        n = self.runner.num_layers
        if name == "int8":
            return Int8()
        if name == "exit":
            return EarlyExit(max(1, round(0.6 * n)))
        sparsity, base = {"skip0.4": (0.4, FULL), "skip0.6": (0.6, FULL), "int8+skip": (0.2, Int8())}[name]
        path = self.cache_dir / "layer_sets" / f"{self.model_name}-{name}.json" if self.cache_dir else None
        self.searches[name] = LayerSetSearch(self.runner, sparsity, base=base, path=path)
        return self.searches[name].plan

    def latency(self) -> LatencyModel:
        """The latency model, calibrated once per model and machine (cached on disk)."""
        if self._latency is None:
            plans = {"full": FULL, **{d: self.get(d).plan for d in DRAFTERS if d in self.hierarchy and d != "pld"}}
            path = self.cache_dir / "latency" / f"{machine_key(self.model_name)}.json" if self.cache_dir else None
            self._latency = load_or_calibrate(self.runner, plans, path)
        return self._latency

    def dytc(self, levels: tuple[str, ...] | None = None, **switches: bool) -> DyTC:
        names = levels or self.hierarchy
        lv = [Level(self.get(d), AcceptanceEstimator(prior=PRIORS[d]), self.searches.get(d)) for d in names]
        return DyTC(lv, self.latency(), replace(DyTCConfig(), **switches))

    def self_levels(self) -> list[SelfDrafter]:
        return [self.get(d) for d in self.hierarchy if d != "pld"] or [self.get("int8")]


def _hc(pool: DrafterPool) -> HorizontalCascade:
    stages = pool.self_levels()
    return HorizontalCascade(stages, pool.ngram, ks=[4, 2, 2][:len(stages)])


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
