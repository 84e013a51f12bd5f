"""The speculative decoding step: plan -> draft -> verify -> accept -> commit (`decode_step`).

One skeleton for one request and for a batch: every method (plain decoding included: its tree is the root
alone) runs through `decode_step`, drafted by its scheduler for a single stream (`SpeculativeDecoder`) or by
the batch planner for a batch (batching/step.py).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from casspec.runtime.batch import Segment
from casspec.runtime.plans import FULL
from casspec.runtime.runner import TargetRunner
from casspec.scheduler.base import Scheduler
from casspec.scheduler.latency import GREEDY_VERIFY, ForwardTimes
from casspec.sizes import PREFILL_CHUNK, TREE_CAPACITY
from casspec.state import DecodeState
from casspec.tree import DraftTree
from casspec.verify.accept import AcceptResult, accept
from casspec.verify.logprobs import path_logprobs


def commit(state: DecodeState, tree: DraftTree, logits: torch.Tensor, result: AcceptResult) -> None:
    """Keep the accepted path's KV, append its tokens (and their logprobs when asked for)."""
    state.cache.commit([tree.base + i for i in result.path])
    state.tokens += result.tokens
    if state.logprobs is not None:
        state.token_logprobs += path_logprobs(logits, result.path, result.tokens, state.logprobs)


def record_step(state: DecodeState, tree: DraftTree, result: AcceptResult, t_draft: float, t_verify: float) -> None:
    """A step's counters in the request's stats (the single-stream and the batched step both record here)."""
    s = state.stats
    s.target_forwards += 1
    s.draft_time += t_draft
    s.verify_time += t_verify
    s.accept_lengths.append(len(result.tokens))
    for i in range(1, len(tree)):
        s.drafter(_drafter(tree, i)).proposed += 1
    for i in result.path[1:]:
        s.drafter(_drafter(tree, i)).accepted += 1


def _drafter(tree: DraftTree, i: int) -> str:
    name = tree.drafter[i]
    assert name is not None, "only the root has no drafter"
    return name


def take(state: DecodeState, tokens: list[int]) -> tuple[list[int], bool]:
    """The newly committed tokens that count, cut to the budget and after EOS; True when generation ends."""
    new = tokens[:state.remaining]
    eos = next((i for i, t in enumerate(new) if t in state.eos_ids), None)
    if eos is not None:
        new = new[:eos + 1]
        state.stats.finish_reason = "stop"
    state.remaining -= len(new)
    state.stats.new_tokens += len(new)
    return new, eos is not None or state.remaining <= 0


@dataclass
class PromptChunk:
    """Prompt tokens of a request still prefilling that ride in a step's verify forward (no logits)."""

    state: DecodeState
    ids: torch.Tensor  # [c]
    positions: torch.Tensor  # [c] (= the cache slots)


def prefill_segments(state: DecodeState, limit: int = PREFILL_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and positions (= slots) of the next prompt chunk not yet cached (the last token is the root)."""
    start = state.cache.length
    end = min(len(state.tokens) - 1, start + limit)
    return torch.tensor(state.tokens[start:end], dtype=torch.long), torch.arange(start, end)


class StepDrafts(Protocol):
    """The plan-and-draft half of one step over its requests (one, or a batch), and what it learns after."""

    def draft(self, times: ForwardTimes) -> list[DraftTree]:
        """1-2. Plan and draft: one tree per request, its forwards timed into `times`."""
        ...

    def observe(self, trees: list[DraftTree], results: list[AcceptResult], times: ForwardTimes) -> None:
        """Learn from the verdicts and from what the step's forwards and sampling cost."""
        ...


def decode_step(runner: TargetRunner, drafts: StepDrafts, states: list[DecodeState], times: ForwardTimes,
                chunks: Sequence[PromptChunk] = ()) -> list[AcceptResult]:
    """plan -> draft -> verify -> accept -> commit for every request of `states` (a single stream is a batch
    of one); prompt chunks of requests still prefilling ride in the verify forward. Commits >= 1 token each."""
    t0 = time.perf_counter()
    # 1-2. Plan and draft: which drafter drafts where, and how much; grow each request's tree.
    trees = drafts.draft(times)
    t1 = time.perf_counter()
    # 3. Verify: one target forward over every tree (tree attention) and the prompt chunks.
    logits = verify(runner, states, trees, chunks, times)  # [N_i, V] each
    t2 = time.perf_counter()
    # 4. Accept: greedy match or the sampling rule, per request with its own settings; >= 1 token each.
    results = [accept(tree, lg, s.sampling, s.generator) for s, tree, lg in zip(states, trees, logits)]
    sampled = sum(len(tree) for s, tree in zip(states, trees) if not s.sampling.is_greedy)
    if sampled:  # the sampling work over the trees, for the cost models
        times.record("sample:full", sampled, 0, time.perf_counter() - t2)
    # 5. Commit: keep each accepted path's KV and tokens, the chunks' KV; learn from the verdicts.
    for s, tree, lg, result in zip(states, trees, logits, results):
        commit(s, tree, lg, result)
        record_step(s, tree, result, t1 - t0, t2 - t1)
    for c in chunks:
        c.state.cache.length += len(c.ids)
    drafts.observe(trees, results, times)
    return results


def verify(runner: TargetRunner, states: list[DecodeState], trees: list[DraftTree], chunks: Sequence[PromptChunk],
           times: ForwardTimes) -> list[torch.Tensor]:
    """Target logits [N_i, V] of each tree from one forward, timed into `times`; chunks get no logits. When every
    request is greedy without logprobs, only each row's argmax is exact (runtime/argmax_head.py)."""
    segments = [tree.segment(s.cache) for s, tree in zip(states, trees)]
    segments += [Segment(c.state.cache, c.ids, c.positions, c.positions) for c in chunks]
    rows = [len(t) for t in trees]
    greedy = all(s.sampling.is_greedy and s.logprobs is None for s in states)  # only argmaxes are read
    t0 = time.perf_counter()
    logits = runner.forward_batch(segments, FULL, torch.arange(sum(rows)) if chunks else None,
                                  argmax_only=greedy)  # [sum(rows), V]
    runner.synchronize()
    key = GREEDY_VERIFY if greedy and runner.argmax_verifies() else "full"
    times.record(key, sum(len(s) for s in segments), mean_ctx(segments), time.perf_counter() - t0)
    return list(torch.split(logits, rows)) if trees else []


def mean_ctx(segments: list[Segment]) -> int:
    """Cached keys a forward's row sees on average (the latency model's ctx_len for a batch of segments)."""
    return sum(len(s) * s.cache.length for s in segments) // max(1, sum(len(s) for s in segments))


class SpeculativeDecoder:
    """Runs one generation with a given scheduler: the step over a batch of one, drafted by the scheduler."""

    def __init__(self, runner: TargetRunner, scheduler: Scheduler, tree_capacity: int = TREE_CAPACITY) -> None:
        self.runner, self.scheduler, self.tree_capacity = runner, scheduler, tree_capacity

    def step(self, state: DecodeState) -> AcceptResult:
        """One speculative step; commits at least one token. The drafters time their forwards into
        `state.times`, which the step then hands to the scheduler's `observe`."""
        try:
            return decode_step(self.runner, _SchedulerDrafts(self, state), [state], state.times)[0]
        finally:
            state.times.clear()

    def prefill(self, state: DecodeState) -> None:
        """Cache the prompt except its last token (the first tree root), chunk by chunk."""
        t0 = time.perf_counter()
        while state.cache.length < len(state.tokens) - 1:
            ids, pos = prefill_segments(state)
            self.runner.forward(ids, pos, pos, state.cache, logits_rows=torch.empty(0, dtype=torch.long))
            state.cache.length += len(ids)
        state.stats.prefill_time += time.perf_counter() - t0


@dataclass
class _SchedulerDrafts:
    """One request's step drafts: its scheduler grows the tree and learns from the verdict."""

    decoder: SpeculativeDecoder
    state: DecodeState

    def draft(self, times: ForwardTimes) -> list[DraftTree]:
        tree = DraftTree(self.state.tokens[-1], self.state.cache.length, self.decoder.tree_capacity)
        self.decoder.scheduler.draft(tree, self.state)  # its drafters record into state.times (= times)
        return [tree]

    def observe(self, trees: list[DraftTree], results: list[AcceptResult], times: ForwardTimes) -> None:
        self.decoder.scheduler.observe(trees[0], results[0], self.state, times)
