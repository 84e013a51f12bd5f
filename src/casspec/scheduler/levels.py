"""DyTC's vocabulary: a level of the cascade with its acceptance estimates, the scheduler's knobs, and one
candidate expansion (scheduler/dytc.py grows the tree from these)."""
from __future__ import annotations

from dataclasses import dataclass, field

from casspec.drafters.layer_search import LayerSetSearch
from casspec.drafters.ngram import NgramDrafter
from casspec.drafters.self_draft import SelfDrafter
from casspec.scheduler.acceptance import GREEDY, AcceptanceEstimator, RatioEstimator
from casspec.sizes import MAX_EXPANSION


@dataclass
class Level:
    """One draft model of the hierarchy with its online acceptance estimate."""

    drafter: SelfDrafter | NgramDrafter
    estimator: AcceptanceEstimator = field(default_factory=AcceptanceEstimator)  # greedy; its prior starts the rest
    search: LayerSetSearch | None = None  # on-the-fly skip-set search refining this level's plan
    sampled: dict[str, AcceptanceEstimator] = field(default_factory=dict)  # regime -> estimate at T > 0
    sibling_ratios: dict[str, RatioEstimator] = field(default_factory=dict)  # regime -> runner-up correction

    def estimate(self, reg: str) -> AcceptanceEstimator:
        """This level's acceptance estimate in one regime (acceptance.regime); for prompt lookup, of the first
        token of a continuation (the next ones: NgramDrafter.next_estimate, per generation)."""
        if reg == GREEDY:
            return self.estimator
        if reg not in self.sampled:
            self.sampled[reg] = self.estimator.fresh()
        return self.sampled[reg]

    def sibling_ratio(self, reg: str) -> RatioEstimator | None:
        """Observed / heuristic acceptance of runner-up siblings at T > 0 (None: greedy keeps the heuristic)."""
        if reg == GREEDY:
            return None
        return self.sibling_ratios.setdefault(reg, RatioEstimator())

    @property
    def name(self) -> str:
        return self.drafter.name

    @property
    def is_lookup(self) -> bool:
        return isinstance(self.drafter, NgramDrafter)


@dataclass(frozen=True)
class DyTCConfig:
    """Knobs of the scheduler; the use_* switches are the ablations."""

    max_nodes: int = 40  # tree size cap, root included
    max_k: int = MAX_EXPANSION  # longest single expansion
    siblings: int = 1  # runner-up children added per self-draft step
    batch: int = 3  # leaves of one parent drafted together in one pass
    use_latency: bool = True  # False: fixed cost ratios (FIXED_COST)
    use_ema: bool = True  # False: fixed acceptance = the estimator's prior
    use_tree: bool = True  # False: a single chain
    max_draft_cost: float = 0.6  # T > 0: a self-draft step over this share of a plain step is left out
    lookup_depth: int = 4  # prompt lookup drafts no deeper than max(this, 2 x its last root run) (_lookup_room)
    guard: bool = True  # pause self levels while they measure slower than prompt lookup alone, and at T > 0
    # drafting while drafted rounds measure slower than plain ones (PayGuard;
    # it times rounds, so like the latency model it is off under use_latency=False, which decides by fixed costs)


@dataclass
class Option:
    level: Level
    k: int
    group: list[int]  # leaves drafted together
    rate: float  # predicted round EWIF after this expansion (tokens / s)
    score: float  # rate with the bottom-drafter tail heuristic, used for ranking
    min_p_acc: float = 0.0  # chains stop below this p_acc (marginal rule)
    min_sibling_p_acc: float = 1.0  # a runner-up sibling is kept only above this p_acc (marginal rule)
    lookup: tuple[list[int], int] = ([], 0)
