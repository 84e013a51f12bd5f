"""On-the-fly skip-set search (SWIFT-style, arXiv 2410.06916): no offline step, no training.

The context the model has already generated is the ground truth. A candidate skip set is scored by how
often the skipped model's argmax, teacher-forced over the last `window` committed tokens, equals the
next committed token. One forward per candidate runs in a scratch region of the KV cache past any
draft tree, so committed entries are never touched. The search starts with random sets at the target
sparsity over attention/MLP sub-layers (first and last layer kept), then refines the best set by
swapping one skipped and one kept sub-layer. It runs one candidate every `interval` decode steps
(bounded cost), stops after `max_evals`, and the best set is saved per model for the next load.
"""
from __future__ import annotations

import random
import time
from functools import partial
from pathlib import Path

import torch

from casspec.runtime import cache_files
from casspec.runtime.plans import ExecutionPlan, LayerSkip
from casspec.runtime.runner import TargetRunner
from casspec.sizes import SCRATCH_OFFSET, SEARCH_WINDOW
from casspec.state import DecodeState


class LayerSetSearch:
    """Finds a good skip set of a given sparsity from generated context, a little at a time."""

    def __init__(self, runner: TargetRunner, sparsity: float, *, base: ExecutionPlan | None = None,
                 window: int = SEARCH_WINDOW, interval: int = 4, max_evals: int = 200, seed: int = 0,
                 path: Path | None = None) -> None:
        self.runner, self.sparsity, self.base = runner, sparsity, base or ExecutionPlan()
        self.window, self.interval, self.max_evals = window, interval, max_evals
        self.rng, self.path = random.Random(seed), path
        n = runner.num_layers
        self.slots = [("attn", i) for i in range(1, n - 1)] + [("mlp", i) for i in range(1, n - 1)]
        self.num_skip = int(round(sparsity * 2 * n))
        self.best: frozenset = self._random_set()
        self.best_score = -1.0
        self.evals, self.seconds, self._steps = 0, 0.0, 0
        self._load()

    @property
    def plan(self) -> ExecutionPlan:
        attn = {i for kind, i in self.best if kind == "attn"}
        mlp = {i for kind, i in self.best if kind == "mlp"}
        return self.base | LayerSkip(attn=attn, mlp=mlp)

    @property
    def done(self) -> bool:
        return self.evals >= self.max_evals

    def maybe_step(self, state: DecodeState) -> bool:
        """Evaluate one candidate every `interval` calls, once enough context exists; True if improved."""
        self._steps += 1
        if self.done or self._steps % self.interval or state.cache.length < self.window + 1:
            return False
        t0 = time.perf_counter()
        if self.best_score < 0:  # score the incumbent on this context first
            self.best_score = self.score(state, self.plan_of(self.best))
        cand = self._random_set() if self.evals < self.max_evals // 4 else self._neighbour(self.best)
        score = self.score(state, self.plan_of(cand))
        self.evals += 1
        improved = score > self.best_score
        if improved:
            self.best, self.best_score = cand, score
            self._save()
        self.seconds += time.perf_counter() - t0
        return improved

    def plan_of(self, skip: frozenset) -> ExecutionPlan:
        return self.base | LayerSkip(attn={i for k, i in skip if k == "attn"}, mlp={i for k, i in skip if k == "mlp"})

    @torch.inference_mode()
    def score(self, state: DecodeState, plan: ExecutionPlan) -> float:
        """Teacher-forced top-1 agreement of `plan` with the committed continuation of the last window."""
        cache, w = state.cache, self.window
        start = cache.length - w  # window tokens: committed positions [start, length)
        scratch = cache.length + SCRATCH_OFFSET
        if scratch + w > cache.capacity:
            return 0.0
        ids = torch.tensor(state.tokens[start:cache.length])
        pos = torch.arange(start, cache.length)
        slots = torch.arange(scratch, scratch + w)
        kv_len = scratch + w
        allowed = torch.zeros(w, kv_len, dtype=torch.bool)
        allowed[:, :start] = True
        allowed[:, scratch:] = torch.tril(torch.ones(w, w, dtype=torch.bool))
        key_pos = torch.arange(kv_len)
        key_pos[scratch:] = pos
        logits = self.runner.forward(ids, pos, slots, cache, plan, allowed, key_pos)  # [w, V]
        target = torch.tensor(state.tokens[start + 1:cache.length + 1])
        cols = self.runner.token_ids(plan)  # a pruned-vocabulary plan's columns are a subset of tokens
        got = logits.argmax(-1) if cols is None else cols[logits.argmax(-1)]
        return float((got.cpu() == target).float().mean())

    def _random_set(self) -> frozenset:
        return frozenset(self.rng.sample(self.slots, min(self.num_skip, len(self.slots))))

    def _neighbour(self, skip: frozenset) -> frozenset:
        kept = [s for s in self.slots if s not in skip]
        if not skip or not kept:
            return skip
        return (skip - {self.rng.choice(sorted(skip))}) | {self.rng.choice(kept)}

    def _load(self) -> None:
        entry = self._read().get(f"{self.sparsity:.2f}")
        if entry:  # start from the cached set; it is re-scored on the new context before comparisons
            self.best = frozenset((k, int(i)) for k, i in entry["skip"])

    def _read(self) -> dict[str, dict]:
        """The cached sets by sparsity ({} where none is cached or the file is unreadable)."""
        return cache_files.read_json(self.path, partial(_layer_sets, self.slots), "the layer sets") or {}

    def _save(self) -> None:
        """Merge the best set into the cached file. Runs during decoding, so it never raises: concurrent
        processes (Ray replicas) each write through their own temporary name and the last rename wins."""
        if self.path is None:
            return
        data = self._read()
        data[f"{self.sparsity:.2f}"] = {"skip": sorted(self.best), "score": self.best_score}
        cache_files.write_json(self.path, data)


def _layer_sets(slots: list[tuple[str, int]], data: object) -> dict[str, dict]:
    """`data` checked to be {sparsity: {"skip": [[kind, layer], ...], "score": float}} over `slots`."""
    if not isinstance(data, dict):
        raise ValueError("layer sets must be a JSON object")
    valid = set(slots)
    for entry in data.values():
        skip = entry["skip"]
        if not isinstance(skip, list) or not all(
                isinstance(s, list) and len(s) == 2 and (s[0], s[1]) in valid for s in skip):
            raise ValueError("a layer set names sub-layers this model does not have")
        float(entry["score"])
    return data
