"""The speculative decoding loop: plan -> draft -> verify -> accept -> commit, one step at a time.

Every method (plain decoding included: its tree is the root alone) runs through `SpeculativeDecoder.step`.
"""
from __future__ import annotations

import time

import torch

from casspec.runtime.runner import TargetRunner
from casspec.scheduler.base import Scheduler
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


def prefill_segments(state: DecodeState, limit: int = PREFILL_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and positions (= slots) of the next prompt chunk not yet cached (the last token is the root)."""
    start = state.cache.length
    end = min(len(state.tokens) - 1, start + limit)
    return torch.tensor(state.tokens[start:end], dtype=torch.long), torch.arange(start, end)


class SpeculativeDecoder:
    """Runs one generation with a given scheduler."""

    def __init__(self, runner: TargetRunner, scheduler: Scheduler, tree_capacity: int = TREE_CAPACITY) -> None:
        self.runner, self.scheduler, self.tree_capacity = runner, scheduler, tree_capacity

    def step(self, state: DecodeState) -> AcceptResult:
        """One speculative step; commits at least one token."""
        tree = DraftTree(state.tokens[-1], state.cache.length, self.tree_capacity)
        t0 = time.perf_counter()
        # 1-2. Plan and draft: the scheduler picks drafter and length per expansion and grows the tree.
        self.scheduler.draft(tree, state)
        t1 = time.perf_counter()
        # 3. Verify: one target forward over the whole tree (tree attention).
        logits = self.verify(tree, state)  # [N, V]
        self.runner.synchronize()
        t2 = time.perf_counter()
        # 4. Accept: greedy match or recursive rejection sampling; always yields >= 1 token.
        result = accept(tree, logits, state.sampling, state.generator)
        times = state.times  # the drafters' timings of this step, then the target's
        if not state.sampling.is_greedy:  # the sampling work over the tree, for DyTC's cost model
            times.record("sample:full", len(tree), 0, time.perf_counter() - t2)
        # 5. Commit: keep the accepted path's KV, append tokens, feed back the verdict and the timings.
        commit(state, tree, logits, result)
        times.record("full", len(tree), tree.base, t2 - t1)
        self.scheduler.observe(tree, result, state, times)
        times.clear()
        record_step(state, tree, result, t1 - t0, t2 - t1)
        return result

    def verify(self, tree: DraftTree, state: DecodeState) -> torch.Tensor:
        """Target logits [N, V] for every tree node."""
        return self.runner.forward_batch([tree.segment(state.cache)])

    def prefill(self, state: DecodeState) -> None:
        """Cache the prompt except its last token (the first tree root), chunk by chunk."""
        t0 = time.perf_counter()
        while state.cache.length < len(state.tokens) - 1:
            ids, pos = prefill_segments(state)
            self.runner.forward(ids, pos, pos, state.cache, logits_rows=torch.empty(0, dtype=torch.long))
            state.cache.length += len(ids)
        state.stats.prefill_time += time.perf_counter() - t0

