"""One batched speculative step over every running generation: plan -> draft -> verify -> accept -> commit.

Self-drafts of all requests run together, one forward per depth (each request's chain node at that
depth is one row); prompt lookups are per request; every request's tree, plus a chunk of a newly
arrived prompt, is verified in one target forward; acceptance and commit are per request, with its
own sampling settings and seed. Sampled draft rows of one depth are drawn in one call per sampling
setting (drafters/self_draft.pick_drafts); under the default coupled rule each request's output is
token-identical to its `ar` output for the seed, whatever the batch. A lone running request takes the
single-stream step of its method's scheduler (the DyTC tree for casspec), so one client is served exactly
as `generate` serves.
"""
from __future__ import annotations

import time

import torch

from casspec.batching.planner import MAX_DRAFT, BatchPlanner, Candidate, Choice
from casspec.decoder import TREE_CAPACITY, SpeculativeDecoder, commit, prefill_segments
from casspec.drafters.pool import PRIORS
from casspec.drafters.self_draft import pick_drafts
from casspec.errors import InvalidRequestError
from casspec.generation import Generation
from casspec.runtime.batch import Segment
from casspec.runtime.plans import FULL
from casspec.scheduler.acceptance import AcceptanceEstimator
from casspec.scheduler.static import PLD_LENGTH
from casspec.tree import DraftTree
from casspec.verify.accept import AcceptResult, accept

BATCH_METHODS = ("ar", "pld", "self", "casspec")  # fixed policies, and the load-aware planner
SELF_MIN_CONF = 0.3  # the `self` method's chain stops below this draft confidence (as SelfChain)
PREFILL_CHUNK = 64  # prompt tokens riding in a step's verify forward while other requests stream


class BatchDecoder:
    """Steps a batch of generations of one engine; adaptive state (acceptance per request) lives here."""

    def __init__(self, engine: object, prefill_chunk: int = PREFILL_CHUNK) -> None:
        self.engine, self.runner, self.pool = engine, engine.runner, engine.pool
        self.prefill_chunk = prefill_chunk
        self.level = self.pool.self_names()[0]  # the self-draft level batched chains use
        self.drafter = self.pool.get(self.level)
        self.planner = BatchPlanner(self.pool.latency(), self.level, self.pool.ngram)
        self.global_alpha = {s: AcceptanceEstimator(prior=PRIORS[s]) for s in (self.level, "pld")}
        self._alpha: dict[int, dict[str, AcceptanceEstimator]] = {}  # id(generation) -> source -> estimate
        self._forward_seconds = 0.0  # forward time within the current step

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
        self._forward_seconds = 0.0
        # 1. Plan: each request's draft source and length, for the batch's goodput.
        choices, lookups = self.plan(decoding, sum(len(ids) for _, ids, _ in chunks))
        # 2. Draft: lookups per request, self-drafts one batched forward per depth.
        trees = self.draft(decoding, choices, lookups)
        t1 = time.perf_counter()
        # 3. Verify: every tree and the prompt chunks in one target forward.
        logits = self.verify(decoding, trees, chunks)
        t2 = time.perf_counter()
        out = {}
        for g, tree, lg, choice in zip(decoding, trees, logits, choices):
            # 4. Accept per request (its own sampling settings and generator); 5. commit.
            result = accept(tree, lg, g.state.sampling, g.state.generator)
            commit(g.state, tree, lg, result)
            self._observe(g, tree, result, choice, t1 - t0, t2 - t1)
            out[g] = result.tokens
        for g, ids, _ in chunks:
            g.state.cache.length += len(ids)
        self.planner.observe_overhead(time.perf_counter() - t0 - self._forward_seconds)
        return out

    def forget(self, gen: Generation) -> None:
        """Drop a finished generation's estimates."""
        self._alpha.pop(id(gen), None)

    # ---- 1. plan --------------------------------------------------------------------------------------
    def plan(self, gens: list[Generation], extra_rows: int) -> tuple[list[Choice], list[tuple[list[int], int]]]:
        """Each request's Choice, and its prompt-lookup continuation (tokens, match length)."""
        lookups = [self._lookup(g) for g in gens]
        candidates = [self._candidate(g, lk) for g, lk in zip(gens, lookups)]
        ctx = sum(g.state.cache.length for g in gens) // max(1, len(gens))
        return self.planner.plan(candidates, ctx, extra_rows) if gens else [], lookups

    def _lookup(self, g: Generation) -> tuple[list[int], int]:
        if g.method == "ar":
            return [], 0
        k = min(max(PLD_LENGTH.values()), g.state.max_depth())
        return self.pool.ngram.lookup(DraftTree(g.state.tokens[-1], 0, 2), g.state, 0, k)

    def _candidate(self, g: Generation, lookup: tuple[list[int], int]) -> Candidate:
        draft, n = lookup
        depth = min(MAX_DRAFT, g.state.max_depth())
        if g.method == "ar":
            return Candidate({}, {}, Choice())
        if g.method == "pld":
            return Candidate({}, {}, Choice("pld", min(len(draft), PLD_LENGTH.get(n, 0))))
        if g.method == "self":
            return Candidate({}, {}, Choice(self.level, depth))
        est = self._estimates(g)
        alphas = {self.level: est[self.level].alpha, "pld": est["pld"].token_prob(n / self.pool.ngram.max_n)}
        return Candidate(alphas, {self.level: depth, "pld": len(draft)})

    def _estimates(self, g: Generation) -> dict[str, AcceptanceEstimator]:
        if id(g) not in self._alpha:
            self._alpha[id(g)] = {s: AcceptanceEstimator(prior=e.alpha) for s, e in self.global_alpha.items()}
        return self._alpha[id(g)]

    # ---- 2. draft -------------------------------------------------------------------------------------
    def draft(self, gens: list[Generation], choices: list[Choice],
              lookups: list[tuple[list[int], int]]) -> list[DraftTree]:
        trees = [DraftTree(g.state.tokens[-1], g.state.cache.length, TREE_CAPACITY) for g in gens]
        chains = []
        for g, tree, c, (draft, n) in zip(gens, trees, choices, lookups):
            if c.source == "pld":
                self.pool.ngram.extend(tree, 0, draft[:c.k], n)
            elif c.source is not None and c.k > 0:
                chains.append((g, tree, c.k))
        for depth in range(max((k for _, _, k in chains), default=0)):
            live = [(g, t) for g, t, k in chains if depth < k and len(t) == depth + 1 and self._goes_on(g, t)]
            if not live:
                break
            self._draft_depth(live, depth)
        return trees

    def _goes_on(self, g: Generation, tree: DraftTree) -> bool:
        """Whether a chain continues below its last node (not EOS, within budget, confident for `self`)."""
        last = len(tree) - 1
        if last == 0:
            return True
        low = g.method == "self" and tree.confidence[last] < SELF_MIN_CONF
        return not low and tree.tokens[last] not in g.state.eos_ids and tree.depth[last] < g.state.max_depth()

    def _draft_depth(self, live: list[tuple[Generation, DraftTree]], depth: int) -> None:
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
        self._forward_seconds += seconds
        self.planner.latency.observe(self.level, len(live), _mean_ctx(segments), seconds)
        picks = pick_drafts(logits, [g.state for g, _ in live], [t.base + depth + 1 for _, t in live], ids, 0,
                            self.runner.vocab_size)
        for (g, tree), pick in zip(live, picks):
            self.drafter.expand(tree, depth, pick, ids, 0, lambda c: c)
            stats = g.state.stats.drafter(self.level)
            stats.forwards += 1
            stats.time += seconds / len(live)

    # ---- 3. verify ------------------------------------------------------------------------------------
    def verify(self, gens: list[Generation], trees: list[DraftTree],
               chunks: list[tuple[Generation, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Target logits [N_i, V] of each tree; prompt chunks ride along without logits."""
        segments = []
        for g, tree in zip(gens, trees):
            x = tree.forward_inputs(list(range(len(tree))))
            segments.append(Segment(g.state.cache, x.input_ids, x.positions, x.slots, x.allowed, x.key_positions))
        segments += [Segment(g.state.cache, ids, pos, pos) for g, ids, pos in chunks]
        n = sum(len(t) for t in trees)
        t0 = time.perf_counter()
        logits = self.runner.forward_batch(segments, FULL, torch.arange(n))  # [n, V]
        self.runner.synchronize()
        seconds = time.perf_counter() - t0
        self._forward_seconds += seconds
        self.planner.latency.observe("full", sum(len(s) for s in segments), _mean_ctx(segments), seconds)
        return list(torch.split(logits, [len(t) for t in trees])) if trees else []

    def _prefill_chunks(self, gens: list[Generation], others_decoding: bool
                        ) -> list[tuple[Generation, torch.Tensor, torch.Tensor]]:
        """Prompt chunks for this step, first come first served: a chunk's worth while others stream,
        more when nobody waits on the forward."""
        budget = self.prefill_chunk if others_decoding else 4 * self.prefill_chunk
        out = []
        for g in gens:
            if budget <= 0:
                break
            ids, pos = prefill_segments(g.state, budget)
            out.append((g, ids, pos))
            budget -= len(ids)
        return out

    # ---- learn ----------------------------------------------------------------------------------------
    def _observe(self, g: Generation, tree: DraftTree, result: AcceptResult, choice: Choice,
                 t_draft: float, t_verify: float) -> None:
        s = g.state.stats
        s.target_forwards += 1
        s.draft_time += t_draft
        s.verify_time += t_verify
        s.accept_lengths.append(len(result.tokens))
        on_path = set(result.path)
        est = self._estimates(g) if g.method == "casspec" else {}
        for node in range(1, len(tree)):
            s.drafter(tree.drafter[node]).proposed += 1
            s.drafter(tree.drafter[node]).accepted += node in on_path
            if tree.parents[node] in on_path and choice.source in self.global_alpha:
                for e in (est.get(choice.source), self.global_alpha[choice.source]):
                    if e is not None:
                        e.observe(node in on_path, tree.confidence[node])


def _mean_ctx(segments: list[Segment]) -> int:
    """Keys a row sees on average (what the latency model's ctx_len stands for in a batch)."""
    rows = sum(len(s) for s in segments)
    return sum(len(s) * (s.cache.length + len(s)) for s in segments) // max(1, rows)
