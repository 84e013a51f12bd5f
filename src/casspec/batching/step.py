"""One batched speculative step over every running generation: the single-stream step (decoder.decode_step:
plan -> draft -> verify -> accept -> commit) over a list of requests, drafted for the batch.

Self-drafts of all requests run together, one forward per depth (each request's chain node at that
depth is one row); prompt lookups are per request; every request's tree, plus a chunk of a newly
arrived prompt, is verified in one target forward; acceptance and commit are per request, with its
own sampling settings and seed. Sampled draft rows of one depth are drawn in one call per sampling
setting (drafters/self_draft.pick_drafts); under the default coupled rule each request's output is
token-identical to its `ar` output for the seed, whatever the batch. A lone running request takes the
single-stream step of its method's scheduler (the DyTC tree for casspec), so one client is served exactly
as `generate` serves.

Speculation must never make a loaded batch slower than batched `ar`: a casspec request the planner gave no
draft sits out the next planning steps (1, 2, 4, ... up to BACKOFF_MAX steps, back to every step once it
drafts again), with no prompt lookup and no planning: it costs what an `ar` row costs. The decoder
measures its own planning time (lookups + planner) per step: `planner_stats()`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from casspec.batching.planner import MAX_DRAFT, BatchPlanner, Candidate, Choice
from casspec.decoder import PromptChunk, SpeculativeDecoder, decode_step, mean_ctx, prefill_segments
from casspec.drafters.self_draft import pick_drafts
from casspec.errors import InvalidRequestError
from casspec.generation import Generation
from casspec.pool import PRIORS, DrafterPool
from casspec.prompt import Prompt
from casspec.runtime.batch import Segment
from casspec.runtime.runner import TargetRunner
from casspec.scheduler.acceptance import AcceptanceEstimator
from casspec.scheduler.base import FixedPolicy, Scheduler
from casspec.scheduler.latency import ForwardTimes
from casspec.scheduler.static import PLD_LENGTH
from casspec.sizes import PREFILL_RIDE, TREE_CAPACITY
from casspec.tree import DraftTree
from casspec.verify.accept import AcceptResult

BATCH_METHODS = ("ar", "pld", "self", "casspec")  # fixed policies, and the load-aware planner
BACKOFF_MAX = 32  # most steps a casspec request whose drafts did not pay sits out before it is planned again
Lookup = tuple[list[int], int, int]  # prompt lookup's continuation: tokens, match length, start in the tokens (-1)


class BatchHost(Protocol):
    """What the batch code uses of an Engine (api.Engine is one)."""

    runner: TargetRunner
    pool: DrafterPool

    def scheduler(self, method: str) -> Scheduler: ...

    def start(self, prompt: Prompt, *args: Any, **kwargs: Any) -> Generation: ...  # as api.Engine.start


class BatchDecoder:
    """Steps a batch of generations of one engine; adaptive state (acceptance per request) lives here."""

    def __init__(self, engine: BatchHost, prefill_chunk: int = PREFILL_RIDE) -> None:
        self.engine, self.runner, self.pool = engine, engine.runner, engine.pool
        self.prefill_chunk = prefill_chunk
        self.level = self.pool.self_names()[0]  # the self-draft level batched chains use
        self.drafter = self.pool.self_level(self.level)
        self.planner = BatchPlanner(self.pool.latency(), self.level, self.pool.ngram)
        self.global_alpha = {s: AcceptanceEstimator(prior=PRIORS[s]) for s in (self.level, "pld")}
        self._alpha: dict[int, dict[str, AcceptanceEstimator]] = {}  # id(generation) -> source -> estimate
        self._idle: dict[int, tuple[int, int]] = {}  # id(generation) -> (steps left out still, last wait)
        self._plan_totals = {"steps": 0, "seconds": 0.0, "planned": 0, "left_out": 0}

    @staticmethod
    def check_method(method: str) -> None:
        if method not in BATCH_METHODS:
            raise InvalidRequestError(f"method {method!r} does not batch; batched methods: {', '.join(BATCH_METHODS)}")

    def step(self, gens: list[Generation]) -> dict[Generation, list[int]]:
        """One step; returns the tokens each decoding generation committed (prefilling ones: none)."""
        decoding = [g for g in gens if not g.prefilling]
        if len(gens) == 1 and decoding:  # alone: the method's own single-stream scheduler
            g = gens[0]
            return {g: SpeculativeDecoder(self.runner, self.engine.scheduler(g.method)).step(g.state).tokens}
        chunks = self._prefill_chunks([g for g in gens if g.prefilling], bool(decoding))
        t0 = time.perf_counter()
        times = ForwardTimes()  # this step's draft and target forwards
        drafts = _BatchDrafts(self, decoding, sum(len(c.ids) for c in chunks))
        results = decode_step(self.runner, drafts, [g.state for g in decoding], times, chunks)
        self.planner.observe_overhead(time.perf_counter() - t0 - times.total())
        return {g: r.tokens for g, r in zip(decoding, results)}

    def forget(self, gen: Generation) -> None:
        """Drop a finished generation's estimates."""
        self._alpha.pop(id(gen), None)
        self._idle.pop(id(gen), None)

    def planner_stats(self) -> dict:
        """Planning (lookups + planner) over the batched steps so far: steps, seconds, ms per step, and
        request-steps planned or left out (drafts that did not pay)."""
        t = dict(self._plan_totals)
        t["ms_per_step"] = 1000 * t["seconds"] / t["steps"] if t["steps"] else 0.0
        return t

    # ---- 1. plan --------------------------------------------------------------------------------------
    def plan(self, gens: list[Generation], extra_rows: int) -> tuple[list[Choice], list[Lookup]]:
        """Each request's Choice, and its prompt-lookup continuation (tokens, match length, start). Requests
        sitting out (their drafts did not pay) are neither looked up nor planned: they take no draft."""
        t0 = time.perf_counter()
        active = [self._planned(g) for g in gens]
        lookups = [self._lookup(g) if a else ([], 0, -1) for g, a in zip(gens, active)]
        choices = [Choice()] * len(gens)
        if any(a and g.method != "ar" for g, a in zip(gens, active)):
            candidates = [self._candidate(g, lk) if a else Candidate({}, {}, Choice())
                          for g, lk, a in zip(gens, lookups, active)]
            ctx = sum(g.state.cache.length for g in gens) // max(1, len(gens))
            greedy = all(g.state.sampling.is_greedy and g.state.logprobs is None for g in gens)
            choices = self.planner.plan(candidates, ctx, extra_rows, greedy)
        for g, a, c in zip(gens, active, choices):
            if a and g.method == "casspec":
                self._back_off(g, c)
        totals = self._plan_totals
        totals["steps"] += 1
        totals["seconds"] += time.perf_counter() - t0
        totals["planned"] += sum(active)
        totals["left_out"] += len(gens) - sum(active)
        return choices, lookups

    def _planned(self, g: Generation) -> bool:
        """Whether this step looks up and plans `g` (a casspec request may be sitting out)."""
        if g.method != "casspec":
            return g.method != "ar"
        left, wait = self._idle.get(id(g), (0, 0))
        if left > 0:
            self._idle[id(g)] = (left - 1, wait)
            return False
        return True

    def _back_off(self, g: Generation, choice: Choice) -> None:
        """No draft: sit out twice as long as last time (at most BACKOFF_MAX steps); a draft: plan every step."""
        if choice.k > 0:
            self._idle.pop(id(g), None)
            return
        wait = min(BACKOFF_MAX, 2 * self._idle.get(id(g), (0, 0))[1] or 1)
        self._idle[id(g)] = (wait, wait)

    def _lookup(self, g: Generation) -> Lookup:
        if g.method == "ar":
            return [], 0, -1
        k = min(max(PLD_LENGTH.values()), g.state.max_depth())
        if g.method == "casspec":  # inside a copied stretch, its next tokens (NgramDrafter.continuation)
            return self.pool.ngram.continuation(g.state, k)
        draft, n = self.pool.ngram.lookup(DraftTree(g.state.tokens[-1], 0, 2), g.state, 0, k)
        return draft, n, -1

    def _candidate(self, g: Generation, lookup: Lookup) -> Candidate:
        """A fixed method's chain is its scheduler's own batch choice; casspec's is planned for the batch."""
        policy = self.engine.scheduler(g.method)
        draft, n, _ = lookup
        if isinstance(policy, FixedPolicy):
            source, k = policy.batch_choice(g.state, (draft, n))
            return Candidate({}, {}, Choice(source, k))
        depth = min(MAX_DRAFT, g.state.max_depth())
        est = self._estimates(g)
        first, then = self.pool.ngram.acceptance(g.state, est["pld"], n, g.state.lookup_streak)
        return Candidate({self.level: est[self.level].alpha, "pld": first}, {self.level: depth, "pld": len(draft)},
                         next={"pld": then})

    def _estimates(self, g: Generation) -> dict[str, AcceptanceEstimator]:
        if id(g) not in self._alpha:
            self._alpha[id(g)] = {s: AcceptanceEstimator(prior=e.alpha) for s, e in self.global_alpha.items()}
        return self._alpha[id(g)]

    # ---- 2. draft -------------------------------------------------------------------------------------
    def draft(self, gens: list[Generation], choices: list[Choice], lookups: list[Lookup],
              times: ForwardTimes) -> list[DraftTree]:
        """Each request's tree: its lookup chain, or its self-draft chain (forwards timed into `times`)."""
        trees = [DraftTree(g.state.tokens[-1], g.state.cache.length, TREE_CAPACITY) for g in gens]
        chains = []
        for g, tree, c, (draft, n, _) in zip(gens, trees, choices, lookups):
            if c.source == "pld":
                self.pool.ngram.extend(tree, 0, draft[:c.k], n)
            elif c.source is not None and c.k > 0:
                chains.append((g, tree, c.k))
        for depth in range(max((k for _, _, k in chains), default=0)):
            live = [(g, t) for g, t, k in chains if depth < k and len(t) == depth + 1 and self._goes_on(g, t)]
            if not live:
                break
            self._draft_depth(live, depth, times)
        return trees

    def _goes_on(self, g: Generation, tree: DraftTree) -> bool:
        """Whether a chain continues below its last node (not EOS, within budget, confident for `self`)."""
        last = len(tree) - 1
        if last == 0:
            return True
        policy = self.engine.scheduler(g.method)
        low = isinstance(policy, FixedPolicy) and not policy.chain_goes_on(tree.confidence[last])
        return not low and tree.tokens[last] not in g.state.eos_ids and tree.depth[last] < g.state.max_depth()

    def _draft_depth(self, live: list[tuple[Generation, DraftTree]], depth: int, times: ForwardTimes) -> None:
        """One self-draft forward: the depth-`depth` node of every live chain is a row."""
        for g, _ in live:
            self.drafter.token_ids(g.state)  # pruned heads learn every context's tokens first
        ids = self.runner.token_ids(self.drafter.plan)
        segments = [Segment(g.state.cache, torch.tensor([t.tokens[depth]]), torch.tensor([t.base + depth]),
                            torch.tensor([t.base + depth])) for g, t in live]
        t0 = time.perf_counter()
        logits = self.runner.forward_batch(segments, self.drafter.plan)  # [len(live), V] (pruned: V')
        self.runner.synchronize()
        seconds = time.perf_counter() - t0
        times.record(self.level, len(live), mean_ctx(segments), seconds)
        picks = pick_drafts(logits, [g.state for g, _ in live], [t.base + depth + 1 for _, t in live], ids, 0,
                            self.runner.vocab_size)
        for (g, tree), pick in zip(live, picks):
            self.drafter.expand(tree, depth, pick, ids, 0, lambda c: c)
            stats = g.state.stats.drafter(self.level)
            stats.forwards += 1
            stats.time += seconds / len(live)

    # ---- prompt chunks ---------------------------------------------------------------------------------
    def _prefill_chunks(self, gens: list[Generation], others_decoding: bool) -> list[PromptChunk]:
        """Prompt chunks for this step, first come first served: a chunk's worth while others stream,
        more when nobody waits on the forward."""
        budget = self.prefill_chunk if others_decoding else 4 * self.prefill_chunk
        out = []
        for g in gens:
            if budget <= 0:
                break
            ids, pos = prefill_segments(g.state, budget)
            out.append(PromptChunk(g.state, ids, pos))
            budget -= len(ids)
        return out

    # ---- learn ----------------------------------------------------------------------------------------
    def learn(self, g: Generation, tree: DraftTree, result: AcceptResult, choice: Choice, lookup: Lookup) -> None:
        """Acceptance estimates (the request's and the batch's) from one verdict on its chain; a lookup chain's
        first token and its later ones apart (a first token inside a copied stretch counts as a later one)."""
        on_path = set(result.path)
        est = self._estimates(g) if g.method == "casspec" else {}
        for node in range(1, len(tree)):
            if tree.parents[node] not in on_path or choice.source not in self.global_alpha:
                continue
            if choice.source == "pld" and (tree.parents[node] or g.state.lookup_streak):  # a later token
                self.pool.ngram.next_estimate(g.state).observe(node in on_path, tree.confidence[node])
                continue
            for e in (est.get(choice.source), self.global_alpha[choice.source]):
                if e is not None:
                    e.observe(node in on_path, tree.confidence[node])
        draft, _, start = lookup
        self.pool.ngram.follow(g.state, draft, start, result.tokens)


@dataclass
class _BatchDrafts:
    """A batched step's drafts: planned for the batch's goodput, self-draft chains one forward per depth."""

    decoder: BatchDecoder
    gens: list[Generation]
    extra_rows: int  # prompt rows riding in the verify forward
    choices: list[Choice] = field(default_factory=list)
    lookups: list[Lookup] = field(default_factory=list)

    def draft(self, times: ForwardTimes) -> list[DraftTree]:
        self.choices, self.lookups = self.decoder.plan(self.gens, self.extra_rows)
        return self.decoder.draft(self.gens, self.choices, self.lookups, times)

    def observe(self, trees: list[DraftTree], results: list[AcceptResult], times: ForwardTimes) -> None:
        self.decoder.planner.latency.observe_all(times, _forwards)
        for g, tree, result, choice, lookup in zip(self.gens, trees, results, self.choices, self.lookups):
            self.decoder.learn(g, tree, result, choice, lookup)


def _forwards(plan: str) -> bool:
    """The batch planner learns forward times only (DyTC's sampling costs are single-stream ones)."""
    return not plan.startswith("sample:")
