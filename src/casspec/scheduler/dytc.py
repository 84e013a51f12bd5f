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
drafter's confidence. Prompt lookup keeps two: one for a continuation's first token and one for each
next token given the one before it, so a k-token continuation is worth a1 (1 + an + ... + an^(k-1)):
a copied stretch is mostly taken whole or left at its first token, which alpha^k cannot express.
Costs come from the calibrated, online-updated latency model.

At temperature > 0:
- each level keeps one acceptance estimate per regime (acceptance.regime: greedy, or sampling rule and
  temperature bucket), so sampled outcomes never move the greedy estimate, nor greedy the sampled ones;
- the sampling work enters every cost: a draft step adds the measured seconds of sampling its rows
  ("sample:<level>" in the latency model), verification adds the target's sampling over the tree
  ("sample:full"); both are timed where they happen (decoder.step, SelfDrafter.propose);
- runner-up siblings' heuristic p_acc is corrected per regime by their observed acceptance (RatioEstimator);
- a self-draft level costing more than `max_draft_cost` of a plain sampled step, sampling included, is
  left out (as DrafterPool.paying leaves such levels out at build time, measured greedy);
- a PayGuard times whole rounds and pauses drafting while drafted rounds yield fewer tokens per second
  than plain ones: what no model predicts (scheduler overhead, mis-estimates) cannot keep casspec slower
  than `ar` for long. Under coupled sampling none of this changes the output: the tokens are `ar`'s for
  the seed. Greedy decoding keeps the siblings' heuristic as it is.

In every regime a second PayGuard holds the cascade to its bottom level: rounds that may use the self-draft
levels are timed against rounds restricted to prompt lookup (it pauses to measure those once it has timed
8 rounds that may use them), and the self levels
pause while they measure slower. The cost model predicts; the guard makes sure that a wrong prediction (a
tree that costs more to verify than it gains) cannot leave casspec behind prompt lookup alone for long.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from casspec.drafters.ngram import NgramDrafter
from casspec.drafters.self_draft import SelfDrafter
from casspec.scheduler.acceptance import regime
from casspec.scheduler.guard import PayGuard
from casspec.scheduler.latency import GREEDY_VERIFY, ForwardTimes, LatencyModel, verify_key
from casspec.scheduler.levels import DyTCConfig, Level, Option
from casspec.state import DecodeState
from casspec.tree import DraftTree
from casspec.verify.accept import AcceptResult

FIXED_COST = {"full": 1.0, "lookup": 0.002, "self": 0.5, "sample": 0.03}  # cost ratios without a latency model
DEFAULTS = DyTCConfig()
SAMPLE = "sample:"  # latency-model key prefix of the sampling work on a plan's logits ("sample:full", ...)


class DyTC:
    """Adaptive routing of drafters and draft lengths over a token tree."""

    name = "casspec"

    def __init__(self, levels: list[Level], latency: LatencyModel, config: DyTCConfig = DEFAULTS) -> None:
        self.levels, self.latency, self.cfg = levels, latency, config
        self.by_name = {lv.name: lv for lv in levels}
        self.bottom = levels[-1]
        self.guards: dict[str, PayGuard] = {}  # regime -> drafting vs plain decoding (sampled regimes)
        self.self_guards: dict[str, PayGuard] = {}  # regime -> self-draft levels vs the bottom level alone
        self._active = levels  # the levels this round may use
        self._round: _Round | None = None  # the round being timed

    # ---- plan + draft -------------------------------------------------------------------------------
    def draft(self, tree: DraftTree, state: DecodeState) -> None:
        guard, lone = self._guards(state)
        root, source = self._root_lookup(state)
        self._round = _Round(tree, time.perf_counter(), guard, None, root, source)
        if guard is not None and not guard.allows():
            return
        self._round.lone = lone
        self._active = self.levels if lone is None or lone.allows() else [self.bottom]
        spent = 0.0
        closed: set[int] = set()
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
        n, ctx, sampled = len(tree), state.ctx_len, not state.sampling.is_greedy
        expected = 1.0 + sum(tree.p_acc[1:])
        rate0 = expected / (spent + self._t_verify(n, ctx, sampled))
        best: Option | None = None
        for level in self._active:
            for opt in self._options(tree, state, leaf, level, spent, expected):
                if opt.rate > rate0 and (best is None or opt.score > best.score):
                    best = opt
        if best is not None and not best.level.is_lookup:
            g = len(best.group)
            step = self._t_draft(best.level, g, ctx, g if sampled else 0)
            dv = (self._t_verify(n + best.k * g, ctx, sampled) - self._t_verify(n, ctx, sampled)) / best.k
            best.min_p_acc = rate0 * (step + dv) / max(self._alpha(best.level, None, state), 1e-3)
            best.min_sibling_p_acc = rate0 * max(dv, 0.0)  # a sibling costs one more verified node
        return best

    def _options(self, tree: DraftTree, state: DecodeState, leaf: int, level: Level, spent: float,
                 expected: float) -> list[Option]:
        """(S, k) candidates for one level at one leaf with their predicted round rates."""
        n, ctx, kmax = len(tree), state.ctx_len, min(self.cfg.max_k, state.max_depth() - tree.depth[leaf])
        sampled = not state.sampling.is_greedy
        room = min(self.cfg.max_nodes, tree.capacity) - n  # nodes the budget still allows
        drafter = level.drafter
        if isinstance(drafter, NgramDrafter):  # (level.is_lookup)
            draft, match = self._lookup(drafter, tree, state, leaf, min(kmax, room, self._lookup_room(tree, state, leaf)))
            if not draft:
                return []
            chained = self._chained(tree, leaf, level, state)
            (a, a_next), group, lookup = self._lookup_alphas(level, match, state, chained), [leaf], (draft, match)
            kmax, per_step, first = len(draft), 0.0, self._t_lookup()
        else:
            if sampled and not self._pays(level, ctx):
                return []
            group, lookup = self._group(tree, leaf), ([], 0)
            kmax = min(kmax, room // (len(group) * (1 + self._siblings())))
            a = a_next = self._alpha(level, None, state)
            lacking = sum(1 for i in tree.path(leaf) if not drafter.kv_layers <= tree.kv_layers[i])
            rows = len(group) if sampled else 0  # positions sampled per draft step
            per_step = self._t_draft(level, len(group), ctx, rows)
            first = self._t_draft(level, len(group) + max(lacking - 1, 0), ctx, rows)
        p_group = sum(tree.p_acc[g] for g in group)
        tail = self._alpha(self.bottom, None, state) if level is not self.bottom else 0.0
        out, geo, reach = [], 0.0, 1.0
        for k in range(1, kmax + 1):
            reach *= a if k == 1 else a_next  # P(the chain's first k tokens accepted | leaf accepted)
            geo += reach
            cost = spent + first + (k - 1) * per_step + self._t_verify(n + k * len(group), ctx, sampled)
            gain = p_group * geo
            out.append(Option(level, k, group, (expected + gain) / cost,
                              (expected + gain + p_group * reach * tail) / cost, lookup=lookup))
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
        drafter = level.drafter
        if isinstance(drafter, NgramDrafter):  # (level.is_lookup)
            draft, match = opt.lookup
            chained = self._chained(tree, opt.group[0], level, state)
            drafter.extend(tree, opt.group[0], draft[:opt.k], match, *self._lookup_alphas(level, match, state, chained))
            return
        est = level.estimate(regime(state.sampling))
        score = est.token_prob if self.cfg.use_ema else (lambda _c: est.prior)
        ratio = level.sibling_ratio(regime(state.sampling)) if self.cfg.use_ema else None
        scale = max(ratio.ratio, 1e-6) if ratio is not None else 1.0
        new = drafter.propose(tree, state, opt.group, opt.k, siblings=self._siblings(),
                                    min_p_acc=opt.min_p_acc, min_sibling_p_acc=opt.min_sibling_p_acc / scale,
                                    score=score)
        if scale != 1.0:  # runner-ups: the heuristic p_acc times what this regime measured of it
            for node in new:
                if not _is_first_choice(tree, node):
                    parent = tree.parents[node]
                    main = next(c for c in tree.children[parent] if tree.drafter[c] == tree.drafter[node])
                    tree.p_acc[node] = min(tree.p_acc[node] * scale, tree.p_acc[parent] - tree.p_acc[main])

    def _siblings(self) -> int:
        return self.cfg.siblings if self.cfg.use_tree else 0

    def _root_lookup(self, state: DecodeState) -> tuple[tuple[list[int], int] | None, int]:
        """Prompt lookup's continuation of the committed tokens (the tree is the root alone), once a round, at the
        longest length any expansion of the root asks for: `_options` cuts it (a continuation does not depend on
        its length), and `observe` scores it against the committed tokens whether or not the round drafted with
        it (`_observe_shadow`); inside a copied stretch it is the stretch's next tokens (NgramDrafter.continuation).
        Returns the continuation with its match length, and where it starts in the tokens."""
        bottom = self.bottom.drafter
        if not isinstance(bottom, NgramDrafter):
            return None, -1
        draft, n, start = bottom.continuation(state, min(self.cfg.max_k, state.max_depth()))
        return (draft, n), start

    def _lookup_room(self, tree: DraftTree, state: DecodeState, leaf: int) -> int:
        """Lookup tokens a leaf may still take: none deeper than max(cfg.lookup_depth, 2 x the tokens the root
        continuations of the copied stretch the text is in got committed, `state.lookup_run`). One acceptance rate
        per match length cannot tell a continuation that copies a loop the text is in (all of it accepted) from
        one that leaves the text after two tokens; with the estimate high from a loop, DyTC drafted 23-token chains
        that got 2 accepted, each verified row costing ~2 ms of Gemma's 262k head. What this generation's lookups
        achieved in the stretch bounds the next one, and grows while they keep being accepted (`_learn_lookup`)."""
        return max(self.cfg.lookup_depth, 2 * state.lookup_run) - tree.depth[leaf]

    def _learn_lookup(self, tree: DraftTree, result: AcceptResult, state: DecodeState,
                      root: tuple[list[int], int]) -> None:
        """What the root lookups achieved: the tokens they got committed (`state.lookup_run`, which bounds the next
        round's reach: `_lookup_room`), this round's from its accepted chain where the round drafted with it, else
        from its continuation scored against the committed tokens (the shadow, `_observe_shadow`), summed over the
        rounds of one copied stretch. Summed, not the last round's alone: a round that drafted 2 of a loop's tokens
        (all committed) left a reach of 4, where the cost model's best was 2 again, and Gemma copied a loop 3
        tokens a round for 70 rounds while fixed 10-token lookups took 11."""
        assert isinstance(self.bottom.drafter, NgramDrafter)  # a root lookup comes from prompt lookup at the bottom
        rnd, chained = self._round, state.lookup_streak  # whether the round began inside a copied stretch
        copied = self.bottom.drafter.follow(state, root[0], rnd.source if rnd is not None else -1, result.tokens)
        before = state.lookup_run if chained and state.lookup_streak else 0  # the stretch goes on: its runs add up
        if any(tree.drafter[c] == self.bottom.name for c in tree.children[0]):
            state.lookup_run = before + self._lookup_run(tree, result)
            return
        state.lookup_run = before + copied
        self._observe_shadow(root, copied, chained, result, state)

    def _lookup_run(self, tree: DraftTree, result: AcceptResult) -> int:
        """Tokens of the accepted path drafted by prompt lookup from the root on."""
        run = 0
        for node in result.path[1:]:
            if tree.drafter[node] != self.bottom.name:
                break
            run += 1
        return run

    def _lookup(self, drafter: NgramDrafter, tree: DraftTree, state: DecodeState, leaf: int,
                k: int) -> tuple[list[int], int]:
        """Prompt lookup's continuation at `leaf`, up to k tokens; the root's is the round's own."""
        rnd = self._round
        if leaf == 0 and rnd is not None and rnd.tree is tree and rnd.root is not None:
            draft, match = rnd.root
            return draft[:k], match
        return drafter.lookup(tree, state, leaf, k)

    def _observe_shadow(self, shadow: tuple[list[int], int], matched: int, chained: bool, result: AcceptResult,
                        state: DecodeState) -> None:
        """Score the root's lookup, whose first `matched` tokens the round committed, against the committed tokens
        as verification would have (each token observed only if the ones before it matched; none beyond what was
        committed; `chained`: the round began inside a copied stretch, so its first token is a next one). It keeps
        the bottom level's estimate measured while other levels win every expansion: otherwise a pessimistic
        estimate is never corrected, and a8 chains costing half a step each run where prompt lookup would copy ten
        tokens at once. Exact for greedy and coupled sampling, where a draft token is accepted iff it equals the
        committed one."""
        sampling = state.sampling
        if not self.cfg.use_ema or not (sampling.is_greedy or sampling.is_coupled):
            return
        draft, match = shadow
        bottom = self.bottom.drafter
        assert isinstance(bottom, NgramDrafter)  # a shadow comes from prompt lookup at the bottom
        reg, conf = regime(state.sampling), match / bottom.max_n
        seen = matched + (matched < min(len(draft), len(result.tokens)))  # and the first token that differs
        for i in range(seen):
            est = bottom.next_estimate(state) if i or chained else self.bottom.estimate(reg)
            est.observe(i < matched, conf)

    def _guards(self, state: DecodeState) -> tuple[PayGuard | None, PayGuard | None]:
        """This round's guards: drafting vs plain (sampled regimes) and self levels vs the bottom alone (a
        hierarchy with both; it probes the bottom alone, whose rate has no prediction)."""
        if not (self.cfg.guard and self.cfg.use_latency):
            return None, None
        reg = regime(state.sampling)
        guard = None if state.sampling.is_greedy else self.guards.setdefault(reg, PayGuard())
        lone = None
        if self.bottom.is_lookup and len(self.levels) > 1:
            lone = self.self_guards.setdefault(reg, PayGuard(probe=True))
        return guard, lone

    # ---- estimates ----------------------------------------------------------------------------------
    def _alpha(self, level: Level, confidence: float | None, state: DecodeState) -> float:
        est = level.estimate(regime(state.sampling))
        return est.token_prob(confidence) if self.cfg.use_ema else est.prior

    def _lookup_alphas(self, level: Level, match: int, state: DecodeState, chained: bool) -> tuple[float, float]:
        """Prompt lookup's acceptance estimates of a continuation's first token and of each next one (given the
        one before it); the confidence is the match length over the longest n-gram. `chained`: the first token
        goes on a copied stretch already accepted (`_chained`), so it is a next token too."""
        assert isinstance(level.drafter, NgramDrafter)  # a lookup level
        if not self.cfg.use_ema:
            return level.estimator.prior, level.estimator.prior
        return level.drafter.acceptance(state, level.estimate(regime(state.sampling)), match, chained)

    @staticmethod
    def _chained(tree: DraftTree, leaf: int, level: Level, state: DecodeState) -> bool:
        """Whether a lookup below `leaf` continues a copied stretch: the leaf is this level's own token, or the
        root while the text is in a copy (the last round committed nothing but its lookup's continuation; the
        round's lookup learns its outcome only after every node's, so during a round this is its start's)."""
        return tree.drafter[leaf] == level.name if leaf else state.lookup_streak

    def _t_verify(self, n_query: int, ctx: int, sampled: bool = False) -> float:
        """Seconds to verify n_query tree nodes; sampled: with the target's sampling over them."""
        if not self.cfg.use_latency or not self.latency.knows("full"):
            t = FIXED_COST["full"]
        else:
            t = self.latency.predict(verify_key(self.latency, not sampled), n_query, ctx)
        return t + self._t_sample("full", n_query) if sampled else t

    def _t_draft(self, level: Level, n_query: int, ctx: int, sampled_rows: int = 0) -> float:
        """Seconds of one draft forward over n_query rows, plus sampling `sampled_rows` of its positions."""
        if self.cfg.use_latency and self.latency.knows(level.name):
            t = self.latency.predict(level.name, n_query, ctx)
        else:
            t = FIXED_COST["self"] * self._t_verify(1, ctx)
        return t + self._t_sample(level.name, sampled_rows)

    def _t_sample(self, plan: str, rows: int) -> float:
        """Seconds of the sampling work (filters, coupled noise) over `rows` positions of a plan's logits:
        measured per plan, else the target's measured cost, else a fixed share of a target step."""
        if rows <= 0:
            return 0.0
        if self.cfg.use_latency:
            for key in (SAMPLE + plan, SAMPLE + "full"):
                if self.latency.knows(key):
                    return self.latency.predict(key, rows, 0)
        return FIXED_COST["sample"] * rows * self._t_verify(1, 0)

    def _pays(self, level: Level, ctx: int) -> bool:
        """Whether a self-draft step, sampling included, costs at most max_draft_cost of a plain sampled step."""
        return self._t_draft(level, 1, ctx, 1) <= self.cfg.max_draft_cost * self._t_verify(1, ctx, True)

    def _t_lookup(self) -> float:
        """Seconds per prompt lookup: the drafter's own measured EMA."""
        bottom = self.bottom.drafter
        if self.cfg.use_latency and isinstance(bottom, NgramDrafter):  # (self.bottom.is_lookup)
            return bottom.cost
        return FIXED_COST["lookup"] * self._t_verify(1, 0)

    # ---- learn --------------------------------------------------------------------------------------
    def _learns(self, plan: str) -> bool:
        """Whether a timing of this plan key feeds the latency model: the target, the levels, sampling work."""
        return plan in ("full", GREEDY_VERIFY) or plan in self.by_name or plan.startswith(SAMPLE)

    def observe(self, tree: DraftTree, result: AcceptResult, state: DecodeState, times: ForwardTimes) -> None:
        on_path, reg = set(result.path), regime(state.sampling)
        ratios = {lv.name: (r, r.ratio) for lv in self.levels
                  if self.cfg.use_ema and (r := lv.sibling_ratio(reg)) is not None}
        for node in range(1, len(tree)):
            name = tree.drafter[node]  # (None only at the root)
            level = self.by_name.get(name) if name is not None else None
            parent = tree.parents[node]
            if level is None or parent not in on_path:
                continue
            if _is_first_choice(tree, node):  # runner-ups get their p_acc from the first choice's
                chained = level.is_lookup and self._chained(tree, parent, level, state)  # a continuation's next token
                est = NgramDrafter.next_estimate(state) if chained else level.estimate(reg)
                est.observe(node in on_path, tree.confidence[node])
            elif level.name in ratios:  # a runner-up: how its heuristic p_acc (before correction) fared
                ratio, scale = ratios[level.name]
                ratio.observe(node in on_path, tree.p_acc[node] / max(tree.p_acc[parent], 1e-9) / max(scale, 1e-6))
        self.latency.observe_all(times, self._learns)
        if self._round is not None and self._round.tree is tree:
            rnd, seconds = self._round, time.perf_counter() - self._round.t0
            if rnd.guard is not None:
                plain = 1.0 / self._t_verify(1, state.ctx_len, True)
                rnd.guard.record(len(tree) > 1, len(result.tokens), seconds, plain)
            if rnd.lone is not None:  # whether the round could use the self levels, not whether DyTC did: unbiased
                rnd.lone.record(self._active is self.levels, len(result.tokens), seconds, 0.0)
            if rnd.root and rnd.root[0]:
                self._learn_lookup(tree, result, state, rnd.root)
            else:
                state.lookup_streak, state.lookup_source = False, -1
        self._round = None
        for level in self.levels:
            if level.search is not None and level.search.maybe_step(state):
                assert isinstance(level.drafter, SelfDrafter)  # a skip-set search refines a self-draft level
                level.drafter.set_plan(level.search.plan)


@dataclass
class _Round:
    """The round being timed: its tree, start, guards, and prompt lookup's continuation at the root."""

    tree: DraftTree
    t0: float
    guard: PayGuard | None
    lone: PayGuard | None
    root: tuple[list[int], int] | None
    source: int = -1  # where the root continuation starts in the tokens


def _is_first_choice(tree: DraftTree, node: int) -> bool:
    """True for the first child its drafter put under the parent (its argmax), not a runner-up."""
    parent, drafter = tree.parents[node], tree.drafter[node]
    return next(c for c in tree.children[parent] if tree.drafter[c] == drafter) == node
