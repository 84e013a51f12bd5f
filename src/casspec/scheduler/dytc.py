"""DyTC, the Dynamic Tree Cascade of CAS-Spec (arXiv 2510.26843, §4), as implemented here.

Each step grows a draft tree best-first. It picks the open leaf with the highest estimated
probability of acceptance p_acc. For that leaf it chooses the draft model S from the hierarchy, and
the draft length k, that maximise the expected tokens per second of the *whole round*:

    EWIF(S, k) = (1 + E + P * sum_{i=1..k} alpha_S^i) / (T_draft + k * t_S + t_verify(N + k))

Here E = sum of p_acc over the tree's nodes so far and T_draft = the drafting time already spent.
The paper's per-step objective as reported has no verification term. Taken literally, that always
favours the near-free prompt lookup, so verification is included here (see README, "DyTC").
Ranking also adds the paper's A*-style tail P * alpha_S^k * alpha_bottom (the bottom drafter can
continue). Growth stops when no expansion raises the round's EWIF. Inside a chosen expansion, a
chain stops as soon as its next token's marginal gain rate falls below the round's rate.
alpha comes from per-drafter EMA estimates (lambda 0.7, window 20), refined per token by the
drafter's confidence. Costs come from the calibrated, online-updated latency model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from casspec.drafters.layer_search import LayerSetSearch
from casspec.drafters.ngram import NgramDrafter
from casspec.drafters.self_draft import SelfDrafter
from casspec.scheduler.acceptance import AcceptanceEstimator
from casspec.scheduler.latency import LatencyModel
from casspec.state import DecodeState
from casspec.tree import DraftTree
from casspec.verify.accept import AcceptResult

FIXED_COST = {"full": 1.0, "lookup": 0.002, "self": 0.5}  # cost ratios for the no-latency-model ablation


@dataclass
class Level:
    """One draft model of the hierarchy with its online acceptance estimate."""

    drafter: SelfDrafter | NgramDrafter
    estimator: AcceptanceEstimator = field(default_factory=AcceptanceEstimator)
    search: LayerSetSearch | None = None  # on-the-fly skip-set search refining this level's plan

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
    max_k: int = 8  # longest single expansion
    siblings: int = 1  # runner-up children added per self-draft step
    batch: int = 3  # leaves of one parent drafted together in one pass
    use_latency: bool = True  # False: fixed cost ratios (FIXED_COST)
    use_ema: bool = True  # False: fixed acceptance = the estimator's prior
    use_tree: bool = True  # False: a single chain


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


class DyTC:
    """Adaptive routing of drafters and draft lengths over a token tree."""

    name = "casspec"

    def __init__(self, levels: list[Level], latency: LatencyModel, config: DyTCConfig = DyTCConfig()) -> None:
        self.levels, self.latency, self.cfg = levels, latency, config
        self.by_name = {lv.name: lv for lv in levels}
        self.bottom = levels[-1]

    # ---- plan + draft -------------------------------------------------------------------------------
    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        spent, closed = 0.0, set()
        while len(tree) < min(self.cfg.max_nodes, tree.capacity):
            leaf = self._best_leaf(tree, state, closed)
            if leaf is None:
                return
            option = self._best_option(tree, state, leaf, spent)
            if option is None:
                if not self.cfg.use_tree:
                    return
                closed.add(leaf)
                continue
            t0, size = time.perf_counter(), len(tree)
            self._expand(tree, state, option)
            spent += time.perf_counter() - t0
            if len(tree) == size:
                closed.add(leaf)

    def _best_leaf(self, tree: DraftTree, state: DecodeState, closed: set[int]) -> int | None:
        if not self.cfg.use_tree:  # chain: only the deepest node may grow
            last = max(range(len(tree)), key=lambda i: (tree.depth[i], -i))
            return None if last in closed or not self._open(tree, state, last) else last
        leaves = [i for i in tree.leaves() if i not in closed and self._open(tree, state, i)]
        return max(leaves, key=lambda i: tree.p_acc[i], default=None)

    @staticmethod
    def _open(tree: DraftTree, state: DecodeState, node: int) -> bool:
        return tree.depth[node] < state.max_depth() and (node == 0 or tree.tokens[node] not in state.eos_ids)

    def _best_option(self, tree: DraftTree, state: DecodeState, leaf: int, spent: float) -> Option | None:
        n, ctx = len(tree), state.ctx_len
        expected = 1.0 + sum(tree.p_acc[1:])
        rate0 = expected / (spent + self._t_verify(n, ctx))
        best: Option | None = None
        for level in self.levels:
            for opt in self._options(tree, state, leaf, level, spent, expected):
                if opt.rate > rate0 and (best is None or opt.score > best.score):
                    best = opt
        if best is not None and not best.level.is_lookup:
            step = self._t_draft(best.level, len(best.group), ctx)
            dv = (self._t_verify(n + best.k * len(best.group), ctx) - self._t_verify(n, ctx)) / best.k
            best.min_p_acc = rate0 * (step + dv) / max(self._alpha(best.level, None), 1e-3)
            best.min_sibling_p_acc = rate0 * max(dv, 0.0)  # a sibling costs one more verified node
        return best

    def _options(self, tree: DraftTree, state: DecodeState, leaf: int, level: Level, spent: float,
                 expected: float) -> list[Option]:
        """(S, k) candidates for one level at one leaf with their predicted round rates."""
        n, ctx, kmax = len(tree), state.ctx_len, min(self.cfg.max_k, state.max_depth() - tree.depth[leaf])
        room = min(self.cfg.max_nodes, tree.capacity) - n  # nodes the budget still allows
        if level.is_lookup:
            draft, match = level.drafter.lookup(tree, state, leaf, min(kmax, room))
            if not draft:
                return []
            a, group, lookup = self._lookup_alpha(level, match), [leaf], (draft, match)
            kmax, per_step, first = len(draft), 0.0, self._t_lookup()
        else:
            group, lookup = self._group(tree, leaf), ([], 0)
            kmax = min(kmax, room // (len(group) * (1 + self._siblings())))
            a = self._alpha(level, None)
            lacking = sum(1 for i in tree.path(leaf) if not level.drafter.kv_layers <= tree.kv_layers[i])
            per_step = self._t_draft(level, len(group), ctx)
            first = self._t_draft(level, len(group) + max(lacking - 1, 0), ctx)
        p_group = sum(tree.p_acc[g] for g in group)
        tail = self._alpha(self.bottom, None) if level is not self.bottom else 0.0
        out, geo = [], 0.0
        for k in range(1, kmax + 1):
            geo += a ** k
            cost = spent + first + (k - 1) * per_step + self._t_verify(n + k * len(group), ctx)
            gain = p_group * geo
            out.append(Option(level, k, group, (expected + gain) / cost,
                              (expected + gain + p_group * a ** k * tail) / cost, lookup=lookup))
        return out

    def _group(self, tree: DraftTree, leaf: int) -> list[int]:
        """The leaf and its best open sibling leaves, drafted in one batched pass."""
        if not self.cfg.use_tree or leaf == 0:
            return [leaf]
        sibs = [c for c in tree.children[tree.parents[leaf]] if c != leaf and not tree.children[c]
                and tree.p_acc[c] >= 0.25 * tree.p_acc[leaf]]
        return [leaf] + sorted(sibs, key=lambda c: -tree.p_acc[c])[:self.cfg.batch - 1]

    def _expand(self, tree: DraftTree, state: DecodeState, opt: Option) -> None:
        level = opt.level
        if level.is_lookup:
            draft, match = opt.lookup
            level.drafter.extend(tree, opt.group[0], draft[:opt.k], match, self._lookup_alpha(level, match))
            return
        score = level.estimator.token_prob if self.cfg.use_ema else (lambda _c: level.estimator.prior)
        level.drafter.propose(tree, state, opt.group, opt.k, siblings=self._siblings(), min_p_acc=opt.min_p_acc,
                              min_sibling_p_acc=opt.min_sibling_p_acc, score=score)

    def _siblings(self) -> int:
        return self.cfg.siblings if self.cfg.use_tree else 0

    # ---- estimates ----------------------------------------------------------------------------------
    def _alpha(self, level: Level, confidence: float | None) -> float:
        return level.estimator.token_prob(confidence) if self.cfg.use_ema else level.estimator.prior

    def _lookup_alpha(self, level: Level, match: int) -> float:
        """Prompt lookup's acceptance estimate; its confidence is the match length over the longest n-gram."""
        return self._alpha(level, match / level.drafter.max_n)

    def _t_verify(self, n_query: int, ctx: int) -> float:
        if not self.cfg.use_latency or not self.latency.knows("full"):
            return FIXED_COST["full"]
        return self.latency.predict("full", n_query, ctx)

    def _t_draft(self, level: Level, n_query: int, ctx: int) -> float:
        if self.cfg.use_latency and self.latency.knows(level.name):
            return self.latency.predict(level.name, n_query, ctx)
        return FIXED_COST["self"] * self._t_verify(1, ctx)

    def _t_lookup(self) -> float:
        """Seconds per prompt lookup: the drafter's own measured EMA."""
        if self.cfg.use_latency and self.bottom.is_lookup:
            return self.bottom.drafter.cost
        return FIXED_COST["lookup"] * self._t_verify(1, 0)

    # ---- learn --------------------------------------------------------------------------------------
    def observe(self, tree: DraftTree, result: AcceptResult, state: DecodeState) -> None:
        on_path = set(result.path)
        for node in range(1, len(tree)):
            level = self.by_name.get(tree.drafter[node])
            if level is not None and tree.parents[node] in on_path:
                if _is_first_choice(tree, node):  # runner-ups get their p_acc from the first choice's
                    level.estimator.observe(node in on_path, tree.confidence[node])
        for plan, n_query, ctx, seconds in state.forward_log:
            if plan == "full" or plan in self.by_name:
                self.latency.observe(plan, n_query, ctx, seconds)
        for level in self.levels:
            if level.search is not None and level.search.maybe_step(state):
                level.drafter.set_plan(level.search.plan)


def _is_first_choice(tree: DraftTree, node: int) -> bool:
    """True for the first child its drafter put under the parent (its argmax), not a runner-up."""
    parent, drafter = tree.parents[node], tree.drafter[node]
    return next(c for c in tree.children[parent] if tree.drafter[c] == drafter) == node
